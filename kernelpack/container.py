"""The .kpk container: byte layout, atomic writer, validating reader (spec/FORMAT.md).

Layout::

    0   8   magic b"\\x89KPK\\r\\n\\x1a\\n"
    8   2   format major (uint16 LE)      10  2   format minor (uint16 LE)
    12  4   header length H (uint32 LE)   16  32  SHA-256 of bytes 0..16 and the header
    48  H   header (msgpack map; since 1.4 it may be one zstd frame of it)
        ... zero bytes up to a multiple of 64: the data area starts there
        payloads in order, zero gaps: each at the first 64-aligned offset after the previous
        one (since 1.4: a compressed or empty payload right after it, unaligned)

The reader checks the whole header (every field, limits, layout) before it reads
or allocates any payload; every payload is checked against its SHA-256 before it
is decompressed; nothing is unpickled.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import os
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Sequence

import msgpack
import numpy as np

from kernelpack import entropy
from kernelpack._backend import NUMPY_DTYPES, NumpyOps, Ops, get_ops
from kernelpack._parallel import blas_limit_for, map_in_order
from kernelpack._progress import progress as progress_bar
from kernelpack.errors import KernelpackError
from kernelpack.forms import FORMS, Encoded
from kernelpack.forms._base import (ELEMENT_WORK, ArraySpec, Cost, Stored, key_shown, need, need_int, need_name,
                                    need_shape, need_step, shown)
from kernelpack.forms.basis import MAX_BANK, check_bank, check_bank_values
from kernelpack.limits import MAX_HEADER, Budget, Limits

MAGIC = b"\x89KPK\r\n\x1a\n"
VERSION = (1, 6)
PREAMBLE = 48
ALIGN = 64
CODECS = ("none", "zstd", "zstd-shuffle", "rans", "rans-ctx")
#: Codecs added by a minor version (1.2: ``zstd-shuffle``, byte planes before zstd; 1.3:
#: ``rans``, interleaved rANS with a table per array; 1.5: ``rans-ctx``, rANS of hybrid-integer
#: tokens with a table per class of rows; both kernelpack/entropy.py).
ADDED_CODECS = {2: frozenset({"zstd-shuffle"}), 3: frozenset({"rans"}), 5: frozenset({"rans-ctx"})}
#: What the writer tries unless told otherwise: not ``rans`` or ``rans-ctx``, opt-in (``codecs=CODECS``):
#: ``rans-ctx`` is 2-5% smaller than zstd-shuffle on quantised real models but decodes at 65-165 MB/s
#: with numba (``kernelpack[fast]``), 1-15 MB/s without, against zstd's 600-1800 (benchmarks/README.md).
#: Measured on the suite's real models at NNCodec's steps (benchmarks/entropy.py) it is 0.97 to
#: 1.07 times the size of the better zstd codec and decodes some 100 times slower in numpy, so
#: by default it would make files 1.3 (unreadable by 1.2 readers) for about 1%.
DEFAULT_CODECS = ("none", "zstd", "zstd-shuffle")
#: A header stored as a Zstandard frame (since 1.4) starts with the frame's magic number, which
#: no msgpack map starts with (0x28 is a msgpack positive integer).
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: The minor version that added compact files: compressed headers, unaligned compressed payloads.
COMPACT = 4
#: The minor version since which a compressed header is a frame against the header dictionary.
DICTIONARY = 6
#: What the header dictionary holds (spec/FORMAT.md section 2.2; its bytes, the msgpack of this
#: map, are spec/header-dictionary.bin, fixed forever): the keys and common values of a header,
#: so that the header of a model of a few tensors, too short for zstd to learn its own keys,
#: still stores each in a byte or two (LeNet-5, 10 tensors: 911 -> 748 header bytes).
_DICTIONARY_MAP: dict[str, Any] = {"metadata": {}, "banks": {}, "tensors": {
    name: {"form": form, "shape": shape, "dtype": "float32", "digest": b"", "fields": fields,
           "arrays": {"data": {"dtype": dtype, "shape": shape, "codec": codec, "length": 1, "step": 0.5, "offset": 0}}}
    for name, form, dtype, codec, shape, fields in [
        ("features.0.conv.weight", "dense", "int8", "rans-ctx", [64, 3, 3, 3], {}),
        ("features.0.bn.bias", "dense", "float16", "none", [64], {}),
        ("layer1.0.bn1.running_mean", "dense", "int16", "zstd-shuffle", [128], {}),
        ("layer1.0.bn1.running_var", "dense", "uint8", "zstd", [256], {}),
        ("onnx::Conv_123", "dct", "bfloat16", "rans", [1], {"axes": [], "boundary": 1}),
        ("fc.weight", "series", "uint16", "rans-ctx", [1], {"family": "chebyshev", "harmonics": [], "points": "cgl"}),
        ("classifier.1.weight", "basis", "float16", "zstd-shuffle", [1], {"bank": "bank0"}),
        ("x.num_batches_tracked", "linear", "int64", "none", [], {})]},
    "groups": [{"offset": 0, "length": 1, "sha256": b""}], "attachments": {"onnx.graph": {}}}
TOP_KEYS = frozenset({"metadata", "banks", "tensors"})
#: The minor version that added hash groups (spec section 2.4): small payloads sharing one SHA-256.
GROUPED = 6
#: Top-level keys added by a minor version: a file of an older minor version may not use them.
ADDED_KEYS = {1: frozenset({"attachments"}), GROUPED: frozenset({"groups"})}
GROUP_KEYS = frozenset({"offset", "length", "sha256"})
#: The writer's hash groups: payloads of fewer than GROUP_PAYLOAD bytes, in runs spanning at
#: most GROUP_SPAN bytes (so a lazy read of one small tensor hashes at most 64 KiB, some 40 us).
#: Why 4 KiB: a payload of that size spends 0.8% of its bytes on its own SHA-256; on the suite's
#: real models 88-95% of the arrays are smaller, and their hashes were 64 of the header's 80
#: bytes per tensor (benchmarks/header_bytes.py).
GROUP_PAYLOAD, GROUP_SPAN = 4096, 64 << 10
#: The largest group a reader accepts (section 5): what reading one allocates.
MAX_GROUP = 1 << 20
#: Verified groups a reader keeps, in bytes, when they are not views of the preloaded file.
GROUP_CACHE = 4 << 20
TENSOR_KEYS = frozenset({"form", "shape", "dtype", "digest", "fields", "arrays"})
ARRAY_KEYS = frozenset({"dtype", "shape", "offset", "length", "codec", "sha256"})
#: Array-ref keys added by a minor version (1.2: ``step``, quantised numbers).
ADDED_ARRAY_KEYS = {2: frozenset({"step"})}
#: Maps and arrays in a header, in all, and how deep they may nest (spec/FORMAT.md, "Limits").
MAX_CONTAINERS = 1 << 20
MAX_DEPTH = 32
#: A whole-file load (``Container(..., preload=True)``) reads everything after the header with
#: one read when that is at most this many bytes (and within ``Limits.max_decoded_bytes``),
#: instead of one read per payload and per padding gap: measured on 2 cores, PP-OCRv4 det
#: (2.2 MB, 124 tensors) loads 14% faster, while a 20 MB ResNet-18 loaded 5 to 10% slower
#: (a fresh 20 MB buffer to fault in). Bigger files are read payload by payload, so that a
#: load never holds the whole file beside the decoded tensors.
PRELOAD_MAX = 8 << 20


class _HeaderBuilder:
    """msgpack hooks that refuse, as the header is built, what could exhaust a reader: more
    than MAX_CONTAINERS maps and arrays (an empty one costs some 70 bytes of memory for 1
    byte of header) and a repeated key (readers would disagree on which one counts). What
    costs no memory (nesting depth, timestamps) is checked once the header is built, by
    :func:`_check_tree`: hooks doing that work for every map and array made parsing 3 times
    slower, and the header of a model with many small tensors holds thousands of them."""

    def __init__(self) -> None:
        self.count = 0

    def counted(self) -> None:
        self.count += 1
        if self.count > MAX_CONTAINERS:
            raise ValueError(f"more than {MAX_CONTAINERS} maps and arrays")

    def map(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        self.counted()
        value = dict(pairs)
        if len(value) != len(pairs):
            raise ValueError("a map repeats a key")
        return value

    def list(self, items: list[Any]) -> list[Any]:
        self.counted()
        return items

    @staticmethod
    def ext(code: int, data: bytes) -> Any:
        raise ValueError("extension types are not allowed")


def _check_tree(root: Any) -> None:
    """No nesting deeper than MAX_DEPTH (code that walks a value recursively would overflow)
    and no extension type (msgpack makes its timestamp extension a Timestamp without asking
    ext_hook). Level by level, without recursion: the values are at most MAX_CONTAINERS."""
    level, depth = [root], 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise ValueError(f"maps and arrays nest deeper than {MAX_DEPTH}")
        below = []
        for value in level:
            for child in value.values() if type(value) is dict else value:
                kind = type(child)
                if kind is dict or kind is list:
                    below.append(child)
                elif kind is msgpack.Timestamp:
                    raise ValueError("extension types are not allowed")
        level = below


def parse_header(head: bytes) -> Any:
    """The header's msgpack object, within the structure limits; ValueError if it is not one."""
    builder = _HeaderBuilder()
    header = msgpack.unpackb(head, raw=False, strict_map_key=True, use_list=True,
                             object_pairs_hook=builder.map, list_hook=builder.list, ext_hook=builder.ext)
    if type(header) is dict or type(header) is list:
        _check_tree(header)
    return header


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def digest(array: np.ndarray, dtype: str) -> bytes:
    """SHA-256 of a decoded tensor: its little-endian C-order bytes in ``dtype``.

    A bfloat16 tensor decoded by numpy arrives widened to float32; its digest is
    taken over the bfloat16 bits (the upper halves), which the widening kept.
    """
    if dtype == "bfloat16" and array.dtype == np.float32:
        array = (np.asarray(array, order="C").view(np.uint32) >> 16).astype(np.uint16)
    return hashlib.sha256(np.asarray(array, dtype=NUMPY_DTYPES[dtype], order="C").tobytes()).digest()


# --- writing --------------------------------------------------------------------------
def _shuffle(raw: bytes, dtype: np.dtype) -> bytes:
    """Byte planes (``zstd-shuffle``): byte j of every element, plane after plane. The
    planes of little-endian numbers differ (exponents and high bytes of codes repeat, low
    bytes do not), and zstd's literal coding compresses each plane far better alone.
    Signed integers are zigzag-mapped first (0, -1, 1, -2 -> 0, 1, 2, 3): otherwise their
    high plane is mostly the sign, 0x00 or 0xFF, which the low plane already tells."""
    values = np.frombuffer(raw, dtype=dtype)
    if dtype.kind == "i":  # (q << 1) ^ (q >> N-1), arithmetic shift; wraps, so it is a bijection
        values = ((values << 1) ^ (values >> (8 * dtype.itemsize - 1))).astype(dtype, copy=False)
    return values.view(np.uint8).reshape(-1, dtype.itemsize).T.tobytes()


#: Elements per block of ``_unshuffle``: a block of every plane and of the result stay in
#: the core's L2 cache.
UNSHUFFLE_BLOCK = 1 << 16


def _unshuffle(planes: bytes, dtype: np.dtype) -> np.ndarray:
    """The elements back from their byte planes: the inverse of ``_shuffle``.

    Each plane is shifted into place with unsigned integer operations (2-4x faster than a
    strided byte transpose, benchmarks/README.md), block by block and in place in the
    result: no temporary the size of the array, and 1.5-3x faster than whole-array passes."""
    unsigned = np.dtype(f"<u{dtype.itemsize}")
    plane = np.frombuffer(planes, dtype=np.uint8).reshape(dtype.itemsize, -1)
    out = np.empty(plane.shape[1], dtype=unsigned)
    eight, one = unsigned.type(8), unsigned.type(1)
    for start in range(0, len(out), UNSHUFFLE_BLOCK):
        block = out[start:start + UNSHUFFLE_BLOCK]
        np.copyto(block, plane[-1, start:start + UNSHUFFLE_BLOCK])
        for j in range(dtype.itemsize - 2, -1, -1):
            block <<= eight
            block |= plane[j, start:start + UNSHUFFLE_BLOCK]
        if dtype.kind == "i":  # un-zigzag: (u >> 1) ^ -(u & 1)
            sign = block & one
            block >>= one
            block ^= np.negative(sign, out=sign)
    return out.view(dtype)


#: The writer's zstd level (``write``, ``kernelpack.save``, ``pack_onnx``, ``kernelpack pack``).
#: 19, not 3, because smallest files are the product: on He-initialised ResNet-50 shapes
#: (benchmarks/pack.py) the two levels were within 1.4% of each other, but on the suite's real
#: models (BENCHMARKS.md, the run at 016fd31 made at level 3 against the one at fcb8bc7 at 19)
#: level 3 made every file larger: quantised codes at NNCodec's steps by 0.4-5.8%, dense
#: float16 by 0.4-3.7% (real weights repeat patterns that only long matches find). Level 19
#: takes 1.5-29 times as long (ResNet-50 dense float16: 6.7 s against 0.23 s; see
#: benchmarks/README.md); ``level=3`` (``kernelpack pack --level 3``) is there for fast packs.
DEFAULT_LEVEL = 19
#: How the writer compares codecs (``_compress``). Payloads of at most EXACT_BYTES are
#: compressed by every codec offered at the final level, and the smallest kept: cheap there,
#: and exact where a few bytes decide it (the conformance vectors' arrays: at level 3, frames of
#: 32 to 192 bytes came out in another order than at 19). A larger payload is compressed for
#: real only by the codecs whose estimate is within ESTIMATE_MARGIN of the smallest estimate:
#: the size at ESTIMATE_LEVEL of the payload, or beyond SAMPLE_BYTES of a sample of it
#: (SAMPLE_CHUNKS evenly spaced runs of whole elements, SAMPLE_BYTES in all), scaled to the
#: payload's length. Comparing at level 19 cost two level-19 compressions per payload, each
#: some 20-50 times slower than one at level 3. Measured on the 210 payloads over EXACT_BYTES of
#: benchmarks/pack.py's six ResNet-50 files (a throwaway script over the same arrays; pack.py's
#: file bytes agree): with a margin of 0, level-3 files came out the same bytes as
#: comparing every codec in full, and level-19 files up to 0.12% larger (dct's payloads); with
#: 0.005, the same bytes at both levels, 271 final compressions for the 210 payloads (every codec
#: in full: 420). A sample of 64 KiB missed by up to 2.9% at a margin of 0.
EXACT_BYTES = 64 << 10
ESTIMATE_LEVEL = 3
SAMPLE_BYTES = 256 << 10
SAMPLE_CHUNKS = 16
ESTIMATE_MARGIN = 0.005


def _compress(raw: bytes, dtype: np.dtype, level: int, codecs: Collection[str],
              name: str | None = None, shape: Sequence[int] = ()) -> tuple[str, bytes]:
    """The smallest payload of ``codecs`` and ``none``, the simpler on a tie (so zero-size
    arrays are ``none``), the zstd codecs compared by estimate beyond EXACT_BYTES (see there);
    ``zstd-shuffle`` only for elements of more than one byte; ``rans`` only for the stored
    dtypes ``name`` it takes (entropy.DTYPES: a bfloat16 array has the numpy dtype of uint16,
    so the name decides), and ``rans-ctx`` likewise (its rows: the first dimension of ``shape``)."""
    if not raw:
        return "none", raw
    import zstandard

    zstd = [c for c in ("zstd", "zstd-shuffle") if c in codecs and (c == "zstd" or dtype.itemsize > 1)]
    exact = len(raw) <= EXACT_BYTES
    piece = raw if exact or len(raw) <= SAMPLE_BYTES else _sample(raw, dtype.itemsize)
    trial_level = level if exact else min(level, ESTIMATE_LEVEL)
    trial = zstandard.ZstdCompressor(level=trial_level, write_content_size=True)
    trials = {c: trial.compress(_zstd_input(c, piece, dtype)) for c in zstd}
    entropic = [(c, entropy.encode_as(c, np.frombuffer(raw, dtype=dtype), shape))
                for c in entropy.DECODERS if c in codecs and name in entropy.DTYPES]
    if piece is raw and trial_level == level:  # the trials are the payloads
        final = trials
    else:
        estimate = {c: len(body) * len(raw) / len(piece) for c, body in trials.items()}
        close = min([len(raw), *estimate.values(), *(len(body) for _, body in entropic)]) * (1 + ESTIMATE_MARGIN)
        compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
        final = {c: compressor.compress(_zstd_input(c, raw, dtype)) for c in zstd if estimate[c] <= close}
    candidates = [("none", raw)] + list(final.items()) + entropic
    return min(candidates, key=lambda candidate: len(candidate[1]))  # min keeps the first of ties


def _zstd_input(codec: str, data: bytes, dtype: np.dtype) -> bytes:
    """What the zstd frame of ``codec`` holds: the bytes, or their byte planes."""
    return _shuffle(data, dtype) if codec == "zstd-shuffle" else data


def _sample(raw: bytes, itemsize: int) -> bytes:
    """SAMPLE_CHUNKS evenly spaced runs of whole elements of ``raw``, SAMPLE_BYTES in all (about)."""
    count, run = len(raw) // itemsize, max(1, SAMPLE_BYTES // SAMPLE_CHUNKS // itemsize)
    starts = np.linspace(0, count - run, SAMPLE_CHUNKS).astype(np.int64) * itemsize
    return b"".join(raw[start:start + run * itemsize] for start in starts.tolist())


def _payload(stored: Stored, level: int, codecs: Collection[str]) -> tuple[bytes, dict[str, Any]]:
    dtype = NUMPY_DTYPES[stored.dtype]
    raw = np.asarray(stored.data, dtype=dtype, order="C").tobytes()
    codec, body = _compress(raw, dtype, level, codecs, stored.dtype, stored.spec.shape)
    ref = {"dtype": stored.dtype, "shape": list(stored.spec.shape), "codec": codec,
           "length": len(body), "sha256": hashlib.sha256(body).digest()}
    if stored.step is not None:
        ref["step"] = float(stored.step)  # msgpack float 64
    return body, ref


def _prepared(tensors: Mapping[str, Encoded], level: int,
              codecs: Collection[str]) -> dict[str, tuple[bytes, dict[str, tuple[bytes, dict[str, Any]]]]]:
    """Per tensor: the digest of its decode and its payloads (body, array-ref), made as a load
    decodes (_parallel.map_in_order: a thread per core for the costly tensors, by their declared
    decode work, numpy's BLAS on one thread meanwhile where their products would thread it);
    zstd, SHA-256 and numpy's loops release the GIL. The file is the same bytes on any thread
    count, and a failure is that of the first failing tensor, as in a loop. A save of ResNet-50
    shapes in dense float16 on 2 cores: 0.43 s on one thread, 0.32 s on two (medians of 5)."""
    ops = NumpyOps()
    costs = {name: _cost(tensor) for name, tensor in tensors.items()}

    def prepare(name: str) -> tuple[bytes, dict[str, tuple[bytes, dict[str, Any]]]]:
        tensor = tensors[name]
        return (digest(tensor.decode(ops), tensor.dtype),
                {key: _payload(stored, level, codecs) for key, stored in tensor.arrays().items()})

    with blas_limit_for(list(costs.values())):
        return map_in_order(prepare, list(tensors), None, costs.__getitem__)


def _cost(tensor: Encoded) -> Cost:
    """A tensor's decode cost, as a reader would compute it from the header being written."""
    return type(tensor).cost(tuple(tensor.shape), tensor.fields(), {k: v.spec for k, v in tensor.arrays().items()},
                             {k: v.spec for k, v in tensor.banks().items()})


def write(path: str | os.PathLike, tensors: Mapping[str, Encoded],
          metadata: Mapping[str, str] | None = None, level: int = DEFAULT_LEVEL,
          attachments: Mapping[str, bytes] | None = None, codecs: Collection[str] = DEFAULT_CODECS,
          compact: bool = True) -> None:
    """Write a container atomically: a temporary file in the same folder, fsync, rename.

    A writer killed at any moment leaves the previous file (or none), never a part.
    ``attachments`` are named opaque byte strings (e.g. the model's ONNX graph); the
    file is written in the lowest format version that can hold what it holds, so a
    file without attachments stays readable by 1.0 readers. Each payload takes the
    smallest of ``codecs`` (and ``none``); ``codecs=codecs_of(1)`` keeps out
    ``zstd-shuffle``, which would make the file 1.2, for readers of 1.1. ``compact`` (where
    it saves bytes) stores the header as one zstd frame and every compressed or empty payload
    right after the previous one (format 1.4; only raw payloads, which a reader may map and
    use in place, stay 64-aligned), and gives runs of small payloads one SHA-256 per hash
    group instead of one each (format 1.6, :func:`hash_groups`). ``compact=False`` writes for
    readers before 1.4.
    """
    path = need_output(path)
    need(isinstance(codecs, Collection) and set(codecs) <= set(CODECS), "codecs",
         f"must be some of {CODECS}, got {shown(codecs)}")
    need_int(level, "level", 1, 22)
    need(isinstance(compact, bool), "compact", f"must be True or False, got {shown(compact)}")
    need(metadata is None or isinstance(metadata, Mapping), "metadata", "must map str to str")
    need(attachments is None or isinstance(attachments, Mapping), "attachments", "must map names to bytes")
    meta = dict(metadata or {})
    for key, value in meta.items():
        need(isinstance(key, str) and isinstance(value, str), "metadata", "must map str to str")
    banks: dict[str, Stored] = {}
    for name, tensor in tensors.items():
        for bank_name, bank in tensor.banks().items():
            old = banks.setdefault(bank_name, bank)
            if old is not bank and not (old.spec == bank.spec and np.array_equal(old.data, bank.data)):
                raise KernelpackError(f"two different banks are both named {bank_name!r}",
                                      path=path, tensor=name, field="bank")
    for name, tensor in tensors.items():
        try:
            _check_writable(name, tensor, banks)
        except KernelpackError as exc:
            raise exc.located(path=path, tensor=name) from None
    bodies: list[bytes] = []
    placed: list[tuple[dict[str, Any], bytes]] = []  # (array-ref, payload), in file order
    ref_keys: set[str] = set()  # every array-ref key used (the version depends on them)
    used: set[str] = set()  # every codec used (so does it)
    end = 0  # bytes of the data area so far

    def place(body: bytes, ref: dict[str, Any]) -> dict[str, Any]:
        nonlocal end
        ref_keys.update(ref)
        used.add(ref["codec"])
        ref["offset"] = end if compact and unaligned(ref["codec"], len(body)) else _align(end)
        bodies.extend([b"\0" * (ref["offset"] - end), body])
        placed.append((ref, body))
        end = ref["offset"] + len(body)
        return ref

    header: dict[str, Any] = {"metadata": meta, "banks": {}, "tensors": {}}
    for bank_name in sorted(banks):
        header["banks"][bank_name] = place(*_payload(banks[bank_name], level, codecs))
    if attachments:
        header["attachments"] = {}
        for att_name in sorted(attachments):
            need_name(att_name, "attachments")
            need(isinstance(attachments[att_name], (bytes, bytearray, memoryview)),
                 f"attachments.{att_name}", "must be bytes")
            blob = np.frombuffer(bytes(attachments[att_name]), dtype=np.uint8)
            header["attachments"][att_name] = place(*_payload(Stored(blob, "uint8"), level, codecs))
    prepared = _prepared(tensors, level, codecs)
    for name, tensor in tensors.items():
        decoded, payloads = prepared[name]
        header["tensors"][name] = {
            "form": tensor.form, "shape": list(tensor.shape), "dtype": tensor.dtype,
            "digest": decoded, "fields": tensor.fields(),
            "arrays": {k: place(*payload) for k, payload in payloads.items()},
        }
    groups = hash_groups(placed) if compact else []
    if groups:
        header["groups"] = groups
    head = msgpack.packb(header, use_bin_type=True)
    if len(head) > MAX_HEADER:
        raise KernelpackError(f"header of {len(head)} bytes exceeds the limit {MAX_HEADER}", path=path)
    try:
        parse_header(head)  # what the reader would refuse: too many maps and arrays
    except ValueError as exc:
        raise KernelpackError(f"header refused: {exc}", path=path, field="header") from None
    minor = max([m for m, keys in ADDED_KEYS.items() if keys & header.keys()]
                + [m for m, keys in ADDED_ARRAY_KEYS.items() if keys & ref_keys]
                + [m for m, added in ADDED_CODECS.items() if added & used], default=0)
    if compact:
        head, minor = stored_header(head, minor, level)
        if any(r["offset"] % ALIGN for r in _refs(header)):  # else the layout is the aligned one
            minor = max(minor, COMPACT)
    atomic_write(path, [header_block(head, minor), *bodies])


def hash_groups(placed: Sequence[tuple[dict[str, Any], bytes]]) -> list[dict[str, Any]]:
    """The hash groups of a compact file (1.6, spec section 2.4): each run of two or more
    consecutive payloads of 1 to GROUP_PAYLOAD - 1 bytes spanning at most GROUP_SPAN bytes gets
    one SHA-256 over its byte range (the zero gaps between them included), and its payloads'
    own ``sha256`` are dropped. ``placed``: (array-ref, payload) in file order, offsets set."""
    groups: list[dict[str, Any]] = []
    run: list[tuple[dict[str, Any], bytes]] = []

    def close() -> None:
        if len(run) >= 2:
            start, end, sha = run[0][0]["offset"], run[0][0]["offset"], hashlib.sha256()
            for ref, body in run:
                sha.update(b"\0" * (ref["offset"] - end))
                sha.update(body)
                end = ref["offset"] + len(body)
                del ref["sha256"]
            groups.append({"offset": start, "length": end - start, "sha256": sha.digest()})
        run.clear()

    for ref, body in placed:
        if not body:
            continue  # empty payloads keep their own (empty) hash and take no part
        if len(body) >= GROUP_PAYLOAD or (run and ref["offset"] + len(body) - run[0][0]["offset"] > GROUP_SPAN):
            close()
        if len(body) < GROUP_PAYLOAD:
            run.append((ref, body))
    close()
    return groups


def unaligned(codec: str, length: int) -> bool:
    """In a compact file (1.4), a payload that nobody maps in place starts right after the
    previous one: a compressed one, or an empty one. Raw payloads stay 64-aligned."""
    return codec != "none" or length == 0


def _refs(header: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every array-ref of a header being written."""
    refs = list(header["banks"].values()) + list(header.get("attachments", {}).values())
    return refs + [r for t in header["tensors"].values() for r in t["arrays"].values()]


def header_block(head: bytes, minor: int, major: int = VERSION[0]) -> bytes:
    """Everything before the payloads: preamble (with the header's SHA-256), the header as
    stored (msgpack, or since 1.4 a zstd frame of it), zero padding."""
    fixed = MAGIC + struct.pack("<HHI", major, minor, len(head))
    start = fixed + hashlib.sha256(fixed + head).digest() + head
    return start + b"\0" * (_align(len(start)) - len(start))


def _check_writable(name: str, tensor: Encoded, banks: Mapping[str, Stored]) -> None:
    """Refuse what the reader would refuse (e.g. a float16 coefficient that overflowed)."""
    need_name(name, "name")
    for bank_name in tensor.banks():
        need_name(bank_name, "bank")
    arrays = tensor.arrays()
    cls = type(tensor)
    cls.check(tuple(tensor.shape), tensor.dtype, tensor.fields(), {k: v.spec for k, v in arrays.items()},
              {k: v.spec for k, v in banks.items()})  # checks every step too (need_dtype)
    cls.build(tuple(tensor.shape), tensor.dtype, tensor.fields(), arrays, banks)


def _file_mode(path: str) -> int:
    """Keep an existing file's permissions; a new file gets 0o666 less the umask, as open() would."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_UMASK


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: os.umask is process-wide and not thread-safe


def need_file_name(path: Any) -> str:
    """A file name as str: str, bytes or os.PathLike, not empty, without NUL (which the OS
    calls would refuse with a TypeError or ValueError)."""
    try:
        name = os.fsdecode(path)
    except TypeError:
        raise KernelpackError(f"must be a file name (str or os.PathLike), got {type(path).__name__}",
                              field="path") from None
    need(name != "" and "\0" not in name, "path", f"{name!r:.80} is not a file name")
    return name


def need_output(path: Any) -> str:
    """The name of a file to write, checked before any work is spent on its content: a file
    name (need_file_name), not a folder, in a folder that exists."""
    name = need_file_name(path)
    if os.path.isdir(name):
        raise KernelpackError("is a folder; give a file name to write", path=name)
    folder = os.path.dirname(os.path.abspath(name))
    if not os.path.isdir(folder):
        problem = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise KernelpackError(f"cannot write: '{folder}' {problem}", path=name)
    return name


#: The temporary file's name beside the target (``mkstemp`` adds 8 random characters): short
#: and fixed, so that any name the file system allows for the target (up to NAME_MAX, 255
#: bytes) can be written; hidden, so that a killed writer's leftover is not mistaken for a file.
TEMP_PREFIX, TEMP_SUFFIX = ".kpk-", ".tmp"


def atomic_write(path: str, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` atomically: a temporary file in the same folder, fsync,
    rename over ``path``, fsync of the folder (spec/FORMAT.md, section 5, "Writing").

    Any OSError (a read-only folder, a full disk, a name too long) is a KernelpackError
    naming ``path``; the temporary file is removed and ``path`` is left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _file_mode(path))  # mkstemp makes 0o600
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from None
        raise
    try:  # the rename itself made durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise _write_error(path, exc) from None


def _write_error(path: str, exc: OSError) -> KernelpackError:
    return KernelpackError(f"cannot write: {exc.strerror or exc}", path=path)


# --- reading --------------------------------------------------------------------------
@dataclass(frozen=True)
class ArrayRef:
    """A stored array's header entry: what it is and where its payload lies."""

    spec: ArraySpec
    offset: int
    length: int
    codec: str
    sha256: bytes | None  # None: its bytes are checked by the hash group it lies in (1.6)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's header entry, validated."""

    name: str
    form: str
    shape: tuple[int, ...]
    dtype: str
    digest: bytes
    fields: Mapping[str, Any]
    arrays: Mapping[str, ArrayRef]

    @property
    def stored_bytes(self) -> int:
        """Bytes of this tensor's payloads in the file (banks not included)."""
        return sum(ref.length for ref in self.arrays.values())

    def __repr__(self) -> str:  # the digest as 8 hex digits, not 32 bytes
        return (f"TensorInfo(name={self.name!r}, form={self.form!r}, shape={self.shape}, dtype={self.dtype!r}, "
                f"stored_bytes={self.stored_bytes}, digest={self.digest.hex()[:8]}...)")

    @property
    def dense_bytes(self) -> int:
        """Bytes of the tensor as dense float32 (the reference for compression ratios)."""
        return int(np.prod(self.shape, dtype=np.int64)) * 4


def codecs_of(minor: int) -> tuple[str, ...]:
    """The codecs a file of minor version ``minor`` may use: those added by then (in a file
    of a newer minor than this reader, every codec it knows)."""
    return tuple(c for c in CODECS if all(c not in added or m <= minor for m, added in ADDED_CODECS.items()))


def _need_codec(codec: Any, spec: ArraySpec, field: str, minor: int, known: tuple[str, ...]) -> str:
    """A codec of the file's minor version, ``known = codecs_of(minor)`` (every codec this
    reader knows, in a newer one): a codec added later is refused like an unknown one, so no
    reader misreads its bytes. ``zstd-shuffle`` needs elements of more than one byte (one
    plane is the array itself)."""
    if codec not in known:  # messages formatted only on failure: this runs once per array ref
        newer = (f" (a codec of a newer format version? this reader reads {VERSION[0]}.{VERSION[1]}: the file "
                 "needs a newer reader)") if minor > VERSION[1] else ""
        raise KernelpackError(f"must be one of {known} in a version {VERSION[0]}.{minor} file, "
                              f"got {shown(codec)}{newer}", field=field)
    if codec == "zstd-shuffle" and NUMPY_DTYPES[spec.dtype].itemsize == 1:
        raise KernelpackError(f"zstd-shuffle is only for elements of more than one byte, not {spec.dtype}",
                              field=field)
    if codec in ("rans", "rans-ctx") and (spec.dtype not in entropy.DTYPES or spec.size == 0):
        raise KernelpackError(f"{codec} is only for non-empty arrays of {sorted(entropy.DTYPES)}, not "
                              f"{spec.dtype} of shape {list(spec.shape)}", field=field)
    return codec


def _parse_ref(value: Any, field: str, file_size: int, minor: int, codecs: tuple[str, ...]) -> ArrayRef:
    """An array ref of a file of minor version ``minor`` (whose codecs are ``codecs_of(minor)``,
    worked out once per file); unknown keys (a key added after ``minor`` included) are
    ignored only in a file of a newer minor version than this reader."""
    need(isinstance(value, dict), field, "must be a map")
    known = ARRAY_KEYS
    if not value.keys() <= known:  # keys added by a minor version, or unknown ones
        known = known.union(*(keys for m, keys in ADDED_ARRAY_KEYS.items() if m <= minor))
        if not value.keys() <= known and minor <= VERSION[1]:
            unknown = sorted(set(value) - known, key=str)
            raise KernelpackError(f"is not a field of a stored array in a version {VERSION[0]}.{minor} file",
                                  field=f"{field}.{key_shown(unknown[0])}")
    dtype = value.get("dtype")
    if not (isinstance(dtype, str) and dtype in NUMPY_DTYPES):
        raise KernelpackError(f"unknown dtype {shown(dtype)}", field=f"{field}.dtype")
    step = need_step(value["step"], dtype, f"{field}.step") if "step" in known and "step" in value else None
    spec = ArraySpec(dtype, need_shape(value.get("shape"), f"{field}.shape"), step)
    offset = need_int(value.get("offset"), f"{field}.offset", 0, file_size)
    length = need_int(value.get("length"), f"{field}.length", 0, file_size)
    codec = _need_codec(value.get("codec"), spec, f"{field}.codec", minor, codecs)
    if codec == "none":
        need(length == spec.nbytes, f"{field}.length",
             f"uncompressed payload must be {spec.nbytes} bytes for its dtype and shape, got {length}")
    sha = value.get("sha256")
    if sha is None and "sha256" not in value and minor >= GROUPED and length > 0:
        return ArrayRef(spec, offset, length, codec, None)  # in a hash group: checked with the layout
    need(isinstance(sha, bytes) and len(sha) == 32, f"{field}.sha256", "must be 32 bytes")
    return ArrayRef(spec, offset, length, codec, sha)


_THREAD = threading.local()


def _declared(data: bytes | memoryview, bad: Callable[[str], KernelpackError], what: str) -> int:
    """The content size a zstd frame declares (``zstandard.CONTENTSIZE_UNKNOWN`` if none)."""
    import zstandard

    try:
        return zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as exc:
        raise bad(f"bad {what}: {exc}") from None


def _one_frame(data: bytes | memoryview, size: int, bad: Callable[[str], KernelpackError], what: str,
               dictionary: bool = False) -> bytes:
    """``data`` inflated, when it is exactly one zstd frame of ``size`` bytes with nothing after
    it (against the header dictionary if ``dictionary``). One-shot: one allocation of ``size``,
    about twice as fast as a streaming object; zstd never produces more than
    ``max_output_size``, and bytes after the frame are an error."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor(dict_data=_zstd_dictionary()) if dictionary else _decompressor()
    try:
        out = decompressor.decompress(data, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise bad(f"bad {what}: {exc}") from None
    if len(out) != size:
        raise bad(f"{what} is not exactly one frame of its declared size")
    return out


@functools.cache
def header_dictionary() -> bytes:
    """The header dictionary's bytes (spec/FORMAT.md section 2.2): a compressed header of a file
    of minor >= 6 is a zstd frame against them, as a raw-content dictionary."""
    return msgpack.packb(_DICTIONARY_MAP, use_bin_type=True)


@functools.cache
def _zstd_dictionary() -> Any:
    import zstandard

    return zstandard.ZstdCompressionDict(header_dictionary(), dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def stored_header(head: bytes, minor: int, level: int = DEFAULT_LEVEL) -> tuple[bytes, int]:
    """The header as a compact file stores it, and the file's minor version with it: of the
    msgpack ``head`` itself (``minor`` unchanged), a plain zstd frame (1.4; a 1.6 reader
    decodes it the same against the dictionary) and a frame against the header dictionary
    (1.6), the one that makes the file smallest (the data start is 64-aligned, so a few bytes
    less header may change nothing), the lowest version on a tie. The dictionary helps the
    headers of a few tensors and can cost bytes on long ones (PP-OCR cls: 9,451 against 9,343)."""
    import zstandard

    def frame(dictionary: Any) -> bytes:
        return zstandard.ZstdCompressor(level=level, write_content_size=True, dict_data=dictionary).compress(head)

    stored = [(head, minor), (frame(None), max(minor, COMPACT)), (frame(_zstd_dictionary()), max(minor, DICTIONARY))]
    return min(stored, key=lambda s: (_align(PREAMBLE + len(s[0])), s[1], len(s[0])))


def header_map_bytes(stored: bytes, minor: int) -> bytes:
    """The msgpack bytes of a header as stored: inflated when it is a frame, against the header
    dictionary when ``minor`` says so, else (a file relabelled, as the version corpus has)
    against it anyway. For tools that take files apart, refused ones included; the reader's
    own checks and limits are in Container."""
    if stored[:4] != ZSTD_MAGIC:
        return stored
    import zstandard

    dictionary = minor >= DICTIONARY
    try:
        return zstandard.ZstdDecompressor(dict_data=_zstd_dictionary() if dictionary else None).decompress(stored)
    except zstandard.ZstdError:
        if dictionary:
            raise
        return zstandard.ZstdDecompressor(dict_data=_zstd_dictionary()).decompress(stored)


def ungroup(header: dict[str, Any], data: bytes) -> None:
    """Give every payload of a hash group its own ``sha256`` again and drop ``groups`` (for
    tools that edit one payload of a file: the file stays valid but for their edit). ``data``:
    the file's data area."""
    if header.pop("groups", None) is None:
        return
    refs = [*header.get("banks", {}).values(), *header.get("attachments", {}).values()]
    refs += [r for t in header.get("tensors", {}).values() for r in t.get("arrays", {}).values()]
    for ref in refs:
        ref.setdefault("sha256", hashlib.sha256(data[ref["offset"]:ref["offset"] + ref["length"]]).digest())


def _decompressor() -> Any:
    """This thread's zstd decompressor: making one per payload took 3 times as long as
    decompressing a small payload, and one must not be used by two threads at once."""
    if not hasattr(_THREAD, "zstd"):
        import zstandard

        _THREAD.zstd = zstandard.ZstdDecompressor()
    return _THREAD.zstd


@dataclass(frozen=True)
class Integrity:
    """What :meth:`Container.integrity` found. ``ranges``: the KernelpackError of each byte range
    outside the tensors' payloads that fails (``padding``, ``banks.NAME``, ``attachments.NAME``;
    absent when it passes). ``tensors``: per tensor True (decodes to its recorded digest), False
    (decodes, to other bits) or the KernelpackError that stopped its decode (a payload's
    checksum, a limit)."""

    ranges: dict[str, KernelpackError]
    tensors: dict[str, "bool | KernelpackError"]

    def failures(self) -> list[KernelpackError]:
        """The errors, byte ranges first, then tensors in the file's order."""
        return list(self.ranges.values()) + [v for v in self.tensors.values() if isinstance(v, KernelpackError)]

    @property
    def ok(self) -> bool:
        return not self.ranges and all(v is True for v in self.tensors.values())


class Container:
    """An open container: validated header, lazy access to single tensors.

    Use as ``with kernelpack.open(path) as c: c.get_tensor(name)``. Reading is
    thread-safe (positional reads on one descriptor). Opening checks every byte outside
    the payloads (header, layout, zero padding); each payload is checked when read.
    """

    def __init__(self, path: str | os.PathLike, limits: Limits | None = None, preload: bool = False) -> None:
        """``preload``: the caller will read every payload (a whole-file load), so read them
        all at once after the header checks, if they fit PRELOAD_MAX and the limits."""
        self.path = need_file_name(path)
        if limits is not None and not isinstance(limits, Limits):
            raise KernelpackError(f"must be a kernelpack.Limits, got {type(limits).__name__}", path=self.path,
                                  field="limits")
        self.limits = limits if limits is not None else Limits()
        self._costs: dict[str, Cost] = {}
        self._preloaded: memoryview | None = None  # the file from the header's end, if preloaded
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise KernelpackError(f"cannot open: {exc.strerror}", path=self.path) from None
        try:
            info = os.fstat(self._fd)
            if not stat.S_ISREG(info.st_mode):
                raise KernelpackError("not a regular file", path=self.path)
            self._size = info.st_size
            self.budget = Budget(self.limits, self.path, self._size)  # the work and memory of its decodes
            self._read_header(preload)
        except BaseException:
            self.close()
            raise

    # context manager and lifetime
    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        self._preloaded = None
        self._group_cache = {}  # its views would keep the preloaded file alive
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        if not hasattr(self, "_tensors"):  # its header was refused
            return f"<kernelpack.Container {getattr(self, 'path', None)!r} (not opened)>"
        state = "open" if self._fd >= 0 else "closed"
        version = ".".join(map(str, getattr(self, "version", ())))
        return f"<kernelpack.Container {self.path!r} format {version}, {len(self._tensors)} tensors, {state}>"

    # header
    def _pread(self, length: int, offset: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise KernelpackError(f"cannot read: {exc.strerror}", path=self.path) from None
        except MemoryError:
            raise KernelpackError(f"out of memory reading {length} bytes (see kernelpack.Limits)",
                                  path=self.path) from None
        if len(data) != length:
            raise KernelpackError(f"truncated: {length} bytes expected at offset {offset}", path=self.path,
                                  field="size")
        return data

    def _read_header(self, preload: bool) -> None:
        if self._size < PREAMBLE:
            raise KernelpackError(f"truncated: {self._size} bytes, shorter than the "
                                  f"{PREAMBLE}-byte preamble", path=self.path, field="preamble")
        fixed = self._pread(PREAMBLE, 0)
        if fixed[:8] != MAGIC:
            raise KernelpackError("not a kernelpack container (bad magic)", path=self.path, field="magic")
        major, minor, length = struct.unpack("<HHI", fixed[8:16])
        if major != VERSION[0]:
            raise KernelpackError(
                f"format version {major}.{minor} needs a kernelpack reader for format {major}.x; "
                f"this reader reads {VERSION[0]}.0 to {VERSION[0]}.{VERSION[1]}",
                path=self.path, field="version")
        self.version = (major, minor)
        limit = min(MAX_HEADER, self.limits.max_header_bytes)
        if length > limit or PREAMBLE + length > self._size:
            raise KernelpackError(f"header length {length} exceeds the file ({self._size} bytes) or the "
                                  f"limit {limit}", path=self.path, field="header_length")
        head = self._pread(length, PREAMBLE)
        if hashlib.sha256(fixed[:16] + head).digest() != fixed[16:48]:
            raise KernelpackError("header checksum mismatch: the file is corrupted",
                                  path=self.path, field="header_sha256")
        if head[:4] == ZSTD_MAGIC:
            head = self._inflate_header(head, limit)
        try:
            header = parse_header(head)
        except Exception as exc:  # msgpack raises many types; report one
            raise KernelpackError(f"header is not valid msgpack within the limits: {exc}", path=self.path,
                                  field="header") from None
        self._header_end = PREAMBLE + length
        self._data_start = _align(self._header_end)
        try:
            self._parse(header)
        except KernelpackError as exc:
            raise exc.located(path=self.path) from None
        if preload:
            self._preload()
        self.check_padding()

    def _inflate_header(self, head: bytes, limit: int) -> bytes:
        """A compressed header (since 1.4): one zstd frame declaring its size, at most ``limit``
        bytes, checked before anything is allocated, with nothing after it."""
        import zstandard

        def bad(message: str) -> KernelpackError:
            return KernelpackError(message, path=self.path, field="header")

        if self.version[1] < COMPACT:
            raise bad(f"is a zstd frame, which a version {self.version[0]}.{self.version[1]} header cannot be "
                      f"(compressed headers are a {VERSION[0]}.{COMPACT} feature)")
        declared = _declared(head, bad, "compressed header")
        if declared == zstandard.CONTENTSIZE_UNKNOWN or declared > limit:
            raise bad(f"compressed header declares {'no size' if declared == zstandard.CONTENTSIZE_UNKNOWN else declared}"
                      f"; it must declare at most {limit} bytes (the header limit)")
        return _one_frame(head, declared, bad, "compressed header", dictionary=self.version[1] >= DICTIONARY)

    def _preload(self) -> None:
        """One read of everything after the header, once the header and layout are checked,
        if it is at most PRELOAD_MAX bytes and within ``limits.max_decoded_bytes`` (so this
        read allocates no more than the largest payload the limits allow)."""
        size = self._size - self._header_end
        if size <= min(PRELOAD_MAX, self.limits.max_decoded_bytes):
            self._preloaded = memoryview(self._pread(size, self._header_end))

    def _read(self, length: int, offset: int) -> bytes | memoryview:
        """``length`` bytes at ``offset`` after the header: from the preloaded bytes if any (the
        layout check put every payload and gap inside them), else one positional read."""
        if self._preloaded is None:
            return self._pread(length, offset)
        start = offset - self._header_end
        return self._preloaded[start:start + length]

    @property
    def _newer(self) -> bool:
        """The file has a newer minor version than this reader: its unknown keys are ignored."""
        return self.version[1] > VERSION[1]

    def _known(self, keys: Any, allowed: frozenset[str], field: str) -> None:
        """Unknown keys are errors, unless the file has a newer minor version (then ignored)."""
        if allowed.issuperset(keys) or self._newer:  # the common case: no sorting
            return
        unknown = sorted(set(keys) - allowed, key=str)
        if unknown:
            raise KernelpackError(f"unknown field in a version {self.version[0]}.{self.version[1]} file",
                                  field=f"{field}{key_shown(unknown[0])}")

    def _parse(self, header: Any) -> None:
        need(isinstance(header, dict), "header", "must be a map")
        added = (keys for m, keys in ADDED_KEYS.items() if m <= self.version[1])
        self._known(header, TOP_KEYS.union(*added), "")
        meta = header.get("metadata", {})
        need(isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in meta.items()), "metadata", "must map str to str")
        self.metadata: dict[str, str] = meta
        banks, tensors = header.get("banks", {}), header.get("tensors")
        need(isinstance(banks, dict), "banks", "must be a map")
        need(isinstance(tensors, dict), "tensors", "must be a map")
        self._codecs = codecs_of(self.version[1])  # every array ref checks its codec against them
        self._banks: dict[str, ArrayRef] = {}
        for name, value in banks.items():
            need_name(name, "banks")
            self._banks[name] = _parse_ref(value, f"banks.{name}", self._size, self.version[1], self._codecs)
            bank_shape = self._banks[name].spec.shape
            need(len(bank_shape) >= 2 and 1 <= bank_shape[0] <= MAX_BANK, f"banks.{name}.shape",
                 f"must be [n, *filter_shape] with 1 <= n <= {MAX_BANK}")
        self._bank_specs = {name: ref.spec for name, ref in self._banks.items()}  # every tensor's check reads them
        attachments = header.get("attachments", {})
        need(isinstance(attachments, dict), "attachments", "must be a map")
        self._attachments: dict[str, ArrayRef] = {}
        for name, value in attachments.items():
            need_name(name, "attachments")
            ref = _parse_ref(value, f"attachments.{name}", self._size, self.version[1], self._codecs)
            need(ref.spec.dtype == "uint8" and len(ref.spec.shape) == 1, f"attachments.{name}",
                 "must be a uint8 array of rank 1 (bytes)")
            self._attachments[name] = ref
        self._tensors: dict[str, TensorInfo] = {}
        for name, entry in tensors.items():
            need_name(name, "tensors")  # before the error can name the tensor: a bad name is not shown raw
            try:
                self._tensors[name] = self._parse_tensor(name, entry)
            except KernelpackError as exc:
                raise exc.located(tensor=name) from None
        for name, spec in self._bank_specs.items():  # banks no tensor names too (those it names passed)
            check_bank(spec, name)
        self._groups = self._parse_groups(header.get("groups", []) if self.version[1] >= GROUPED else [])
        self._check_layout()
        self._check_groups()
        self._bank_cache: dict[str, Stored] = {}
        self._group_cache: dict[int, bytes | memoryview] = {}  # verified group bytes, oldest first
        self._group_lock = threading.Lock()

    def _parse_groups(self, value: Any) -> list[tuple[int, int, bytes]]:
        """The hash groups (since 1.6): (offset, length, sha256) byte ranges of the data area in
        ascending order, none overlapping, each 1 to MAX_GROUP bytes."""
        need(isinstance(value, list), "groups", "must be a list of hash groups")
        groups: list[tuple[int, int, bytes]] = []
        end = 0
        for i, entry in enumerate(value):
            field = f"groups[{i}]"
            need(isinstance(entry, dict), field, "must be a map")
            self._known(entry, GROUP_KEYS, f"{field}.")
            offset = need_int(entry.get("offset"), f"{field}.offset", end, self._size)
            length = need_int(entry.get("length"), f"{field}.length", 1, MAX_GROUP)
            sha = entry.get("sha256")
            need(isinstance(sha, bytes) and len(sha) == 32, f"{field}.sha256", "must be 32 bytes")
            groups.append((offset, length, sha))
            end = offset + length
        return groups

    def _check_groups(self) -> None:
        """Every payload without its own ``sha256`` lies inside one hash group, every group holds
        one such payload and ends inside the data area (so every group byte is a payload or a
        zero gap the layout check placed)."""
        self._group_starts = [offset for offset, _, _ in self._groups]
        used: set[int] = set()
        for ref, tensor, field in self._all_refs():
            if ref.sha256 is None:
                i = self._group_of(ref)
                if i < 0 or ref.offset + ref.length > self._groups[i][0] + self._groups[i][1]:
                    raise KernelpackError("is missing, and the payload lies in no hash group (spec section 2.4)",
                                          tensor=tensor, field=f"{field}.sha256")
                used.add(i)
        data_size = self._size - self._data_start
        for i, (offset, length, _) in enumerate(self._groups):
            need(offset + length <= data_size, f"groups[{i}].length",
                 f"ends at {offset + length}, after the data area ({data_size} bytes)")
            need(i in used, f"groups[{i}]", "holds no payload that lacks its own sha256")

    def _parse_tensor(self, name: str, entry: Any) -> TensorInfo:
        need(isinstance(entry, dict), "", "entry must be a map")
        self._known(entry, TENSOR_KEYS, "")
        form = entry.get("form")
        need(isinstance(form, str), "form", "must be a string")
        shape = need_shape(entry.get("shape"), "shape")
        dtype = entry.get("dtype")
        if not (isinstance(dtype, str) and dtype in NUMPY_DTYPES):
            raise KernelpackError(f"unknown dtype {shown(dtype)}", field="dtype")
        dig = entry.get("digest")
        need(isinstance(dig, bytes) and len(dig) == 32, "digest", "must be 32 bytes (SHA-256)")
        fields, arrays = entry.get("fields", {}), entry.get("arrays")
        need(isinstance(fields, dict), "fields", "must be a map")
        need(isinstance(arrays, dict) and all(isinstance(k, str) for k in arrays), "arrays",
             "must be a map of stored arrays")
        refs = {k: _parse_ref(v, f"arrays.{key_shown(k)}", self._size, self.version[1], self._codecs)
                for k, v in arrays.items()}
        cls = FORMS.get(form)
        if cls is None:
            if not self._newer:
                raise KernelpackError(f"unknown form {shown(form)}", field="form")
        else:
            self._known(fields, cls.FIELDS, "fields.")
            if not cls.FIELDS <= fields.keys():  # every field a form defines is required
                raise KernelpackError(f"is missing (a {form} tensor needs the fields {sorted(cls.FIELDS)})",
                                      field=min(cls.FIELDS - fields.keys()))
            need(cls.ANY_DTYPE or dtype == "float32", "dtype", "compressed forms decode to float32")
            cls.check(shape, dtype, fields, {k: r.spec for k, r in refs.items()}, self._bank_specs)
        return TensorInfo(name, form, shape, dtype, dig, fields, refs)

    def _regions(self) -> list[tuple[int, int, str | None, str, bool]]:
        """(offset, length, tensor, field, unaligned) of every payload, in file order: by (offset,
        length), ties (zero-length payloads at one offset) in header order — banks, attachments,
        then each tensor's arrays — which the stable sort keeps. The order of ties decides only
        which payload an error names, never whether the layout is valid. ``unaligned``: it may
        start right after the previous payload (a compressed or empty one, in a 1.4 file)."""
        compact = self.version[1] >= COMPACT
        regions = [(r.offset, r.length, tensor, field, compact and unaligned(r.codec, r.length))
                   for r, tensor, field in self._all_refs()]
        return sorted(regions, key=lambda region: region[:2])

    def _all_refs(self) -> Iterator[tuple[ArrayRef, str | None, str]]:
        """(array-ref, tensor, field) of every payload, in header order: banks, attachments,
        then each tensor's arrays."""
        yield from ((r, None, f"banks.{n}") for n, r in self._banks.items())
        yield from ((r, None, f"attachments.{n}") for n, r in self._attachments.items())
        for t in self._tensors.values():
            yield from ((r, t.name, f"arrays.{key_shown(k)}") for k, r in t.arrays.items())

    def _group_of(self, ref: ArrayRef) -> int:
        """The index of the last hash group starting at or before ``ref`` (-1 if none)."""
        return bisect.bisect_right(self._group_starts, ref.offset) - 1

    def _check_layout(self) -> None:
        """Payloads tile the data area in order: each at the first 64-aligned offset after the last
        (in a 1.4 file a compressed or empty payload may instead start right after it).

        Only the payloads this reader knows take part, so bytes owned by a key it does not know
        (a key of a newer minor version, ignored) break the tiling: such a file is refused
        (field ``….offset`` of the next known payload, or ``size``), never read in part."""
        self._layout = self._regions()  # check_padding walks it again
        unknown = (" (a file of a newer minor version may hold payloads under keys this reader does not "
                   "know)") if self._newer else ""
        end = 0
        for offset, length, tensor, field, packed in self._layout:
            if offset != _align(end) and not (packed and offset == end):
                allowed = f"{end} or {_align(end)}" if packed and end != _align(end) else f"{_align(end)}"
                raise KernelpackError(f"must be {allowed} (payloads are packed in order, 64-aligned, in a 1.4 file "
                                      f"a compressed or empty one may follow unaligned; no overlap){unknown}",
                                      tensor=tensor, field=f"{field}.offset")
            end = offset + length
        need(self._data_start + end == self._size, "size",
             f"file is {self._size} bytes; its header describes {self._data_start + end}{unknown}")

    def check_padding(self) -> None:
        """Every byte outside header and payloads is zero (so every bit of the file is checked)."""
        spans = [(self._header_end, self._data_start)]
        end = 0
        for offset, length, *_ in self._layout:
            spans.append((self._data_start + end, self._data_start + offset))
            end = offset + length
        for lo, hi in spans:
            if hi > lo and any(self._read(hi - lo, lo)):
                raise KernelpackError(f"non-zero padding bytes at {lo}..{hi}: the file is corrupted",
                                      path=self.path, field="padding")

    # access
    def keys(self) -> list[str]:
        return list(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        """A tensor's checked header entry; KeyError for a name the file lacks, as a Mapping."""
        if not isinstance(name, str):
            raise KernelpackError(f"a tensor name is a str, got {type(name).__name__}", path=self.path,
                                  field="name")
        if name not in self._tensors:
            raise KeyError(name)
        return self._tensors[name]

    def bank_info(self) -> dict[str, ArrayRef]:
        return dict(self._banks)

    def attachments(self) -> list[str]:
        """Names of the attached byte strings (e.g. ``onnx.graph``)."""
        return list(self._attachments)

    def read_attachment(self, name: str) -> bytes:
        """One attachment's bytes, checked against its SHA-256 like any payload."""
        if name not in self._attachments:
            raise KernelpackError(f"no attachment {name!r}; the file has {sorted(self._attachments)}",
                                  path=self.path, field="attachments")
        return self.read_array(self._attachments[name], f"attachments.{name}").data.tobytes()

    def read_array(self, ref: ArrayRef, field: str, tensor: str | None = None) -> Stored:
        """One payload: checked against its SHA-256, decompressed to exactly its declared size."""
        try:
            return self._read_array(ref, field, tensor)
        except MemoryError:
            raise KernelpackError(f"out of memory reading it ({ref.spec.nbytes} bytes; see kernelpack.Limits)",
                                  path=self.path, tensor=tensor, field=field) from None

    def _read_array(self, ref: ArrayRef, field: str, tensor: str | None) -> Stored:
        size = max(ref.length, ref.spec.nbytes)
        if size > self.limits.max_decoded_bytes:
            raise KernelpackError(f"payload of {size} bytes exceeds the limit max_decoded_bytes="
                                  f"{self.limits.max_decoded_bytes} (see kernelpack.Limits)",
                                  path=self.path, tensor=tensor, field=field)
        if ref.sha256 is None:
            body = self._grouped(ref, field, tensor)
        else:
            body = self._read(ref.length, self._data_start + ref.offset)
            if hashlib.sha256(body).digest() != ref.sha256:
                raise KernelpackError("payload checksum mismatch: the file is corrupted",
                                      path=self.path, tensor=tensor, field=field)
        if ref.codec in entropy.DECODERS:
            try:
                body = entropy.DECODERS[ref.codec](body, NUMPY_DTYPES[ref.spec.dtype], ref.spec.size)
            except KernelpackError as exc:
                raise KernelpackError(exc.reason, path=self.path, tensor=tensor, field=field) from None
        elif ref.codec != "none":  # zstd, zstd-shuffle: the same frame checks
            body = self._inflate(body, ref.spec.nbytes, field, tensor)
        if ref.codec == "zstd-shuffle":
            body = _unshuffle(body, NUMPY_DTYPES[ref.spec.dtype])
        if isinstance(body, memoryview):  # preloaded, uncompressed: copied, so that a tensor
            body = bytes(body)  # does not keep the whole preloaded file alive
        data = np.frombuffer(body, dtype=NUMPY_DTYPES[ref.spec.dtype]).reshape(ref.spec.shape)
        return Stored(data, ref.spec.dtype, ref.spec.step)

    def _grouped(self, ref: ArrayRef, field: str, tensor: str | None) -> bytes | memoryview:
        """A payload of a hash group (1.6): a slice of the group's bytes, read and checked against
        the group's SHA-256 once and kept (views of a preloaded file always; read ones up to
        GROUP_CACHE bytes, oldest dropped first), so a whole load hashes each group once."""
        i = self._group_of(ref)
        offset, length, sha = self._groups[i]
        with self._group_lock:
            data = self._group_cache.pop(i, None)
            if data is None:  # at most MAX_GROUP bytes, whatever the limits: the format bounds it
                data = self._read(length, self._data_start + offset)
                if hashlib.sha256(data).digest() != sha:
                    raise KernelpackError(f"payload checksum mismatch: the file is corrupted (hash group groups[{i}], "
                                          f"bytes {offset}..{offset + length} of the data area, which this payload "
                                          "shares with other small payloads)", path=self.path, tensor=tensor,
                                          field=field)
            self._group_cache[i] = data  # the newest last
            held = [k for k, v in self._group_cache.items() if not isinstance(v, memoryview)]
            while sum(len(self._group_cache[k]) for k in held) > GROUP_CACHE:
                del self._group_cache[held.pop(0)]
        start = ref.offset - offset
        return data[start:start + ref.length]

    def _inflate(self, body: bytes, size: int, field: str, tensor: str | None) -> bytes:
        """One zstd frame that declares exactly ``size`` bytes and nothing after it.

        zstd itself refuses to produce more than a frame's declared content size, so
        a payload never inflates beyond what its dtype and shape say.
        """
        def bad(message: str) -> KernelpackError:
            return KernelpackError(message, path=self.path, tensor=tensor, field=field)

        declared = _declared(body, bad, "zstd payload")
        if declared != size:
            raise bad(f"compressed payload declares {declared} bytes; its dtype and shape say {size}")
        return _one_frame(body, size, bad, "zstd payload")

    def _form(self, name: str) -> type[Encoded]:
        """The class of a tensor's form, or the error of a form this reader does not know."""
        info = self.info(name)
        cls = FORMS.get(info.form)
        if cls is None:
            raise KernelpackError(f"form {shown(info.form)} needs a newer kernelpack (file format "
                                  f"{self.version[0]}.{self.version[1]})", path=self.path, tensor=name,
                                  field="form")
        return cls

    def cost(self, name: str) -> Cost:
        """What decoding tensor ``name`` costs (largest array, working set, operations), from
        its checked header alone; spec/FORMAT.md, section 5, "Work and memory"."""
        if name not in self._costs:
            info, cls = self.info(name), self._form(name)
            bank_name = cls.bank_of(info.fields)
            banks = {bank_name: self._banks[bank_name].spec} if bank_name is not None else {}
            self._costs[name] = cls.cost(info.shape, info.fields, {k: r.spec for k, r in info.arrays.items()}, banks)
        return self._costs[name]

    def result_bytes(self, name: str) -> int:
        """Bytes of the decoded tensor (bfloat16 counted as the float32 numpy widens it to)."""
        info = self.info(name)
        return math.prod(info.shape) * (4 if info.dtype == "bfloat16" else NUMPY_DTYPES[info.dtype].itemsize)

    def encoded(self, name: str) -> Encoded:
        """The tensor in its stored form, payloads read and checked (its largest array within
        ``max_decoded_bytes`` first)."""
        self.budget.check_array(name, self.cost(name))
        return self._stored(name)

    def _stored(self, name: str) -> Encoded:
        """``encoded`` after the limits were checked (by it, or by ``decode``'s budget)."""
        info, cls = self.info(name), self._form(name)
        bank_name = cls.bank_of(info.fields)
        arrays = {k: self.read_array(r, f"arrays.{k}", name) for k, r in info.arrays.items()}
        try:
            banks = {bank_name: self._bank(bank_name)} if bank_name is not None else {}
            return cls.build(info.shape, info.dtype, info.fields, arrays, banks)
        except KernelpackError as exc:
            raise exc.located(path=self.path, tensor=name) from None

    def plan_load(self, threads: int, names: Collection[str] | None = None) -> int:
        """Check a load of ``names`` (default: every tensor) against the limits before any decode
        (the first tensor that would fail fails now, as in a one-thread load), and return how
        many of ``threads`` decodes may run at once within ``max_total_bytes``."""
        names = list(self._tensors) if names is None else [n for n in names if n in self._tensors]
        items = [(name, self.cost(name), self.result_bytes(name)) for name in names]
        used = {FORMS[t.form].bank_of(t.fields) for t in map(self._tensors.__getitem__, names) if t.form in FORMS}
        banks = [self._banks[b].spec for b in used if b in self._banks and b not in self._bank_cache]
        return self.budget.plan(items, sum(b.nbytes for b in banks), ELEMENT_WORK * sum(b.size for b in banks), threads)

    def check_payloads(self) -> None:
        """Check the payloads no tensor's decode reads (attachments, banks no tensor uses)
        against their SHA-256: after it and a decode of every tensor, every byte of the
        file has been checked."""
        for name in self._banks:
            self._bank(name)
        for name in self._attachments:
            self.read_attachment(name)

    def _bank(self, name: str) -> Stored:
        """A bank, read (and accounted) once per container however many tensors use it."""
        if name not in self._bank_cache:
            ref = self._banks[name]
            self.budget.hold(ref.spec.nbytes, ELEMENT_WORK * ref.spec.size, f"banks.{name}")
            bank = self.read_array(ref, f"banks.{name}")
            try:
                check_bank_values(bank, name)
            except KernelpackError as exc:
                raise exc.located(path=self.path) from None
            self._bank_cache[name] = bank
        return self._bank_cache[name]

    def decode(self, name: str, ops: Ops, keep: bool = True) -> Any:
        """Decode one tensor with ``ops`` (numpy or torch backend), within the limits: its work
        and working set are accounted before anything is read, its result (if ``keep``: the
        caller holds it) after. Running out of memory anyway is a KernelpackError too."""
        cost = self.cost(name)
        self.budget.start(name, cost)
        kept = 0
        try:
            result = self._stored(name).decode(ops)  # start() checked the limits
            kept = self.result_bytes(name) if keep else 0
            return result
        except MemoryError:
            raise KernelpackError(f"out of memory decoding it (its decode needs about {cost.peak_bytes} bytes "
                                  "at once; see kernelpack.Limits)", path=self.path, tensor=name,
                                  field="shape") from None
        finally:
            self.budget.finish(cost, kept)

    def get_numpy(self, name: str) -> np.ndarray:
        """One tensor decoded by numpy (no torch import). bfloat16 comes widened to float32."""
        return self.decode(name, NumpyOps())

    def get_tensor(self, name: str, device: Any = "cpu") -> Any:
        """One tensor decoded by torch on ``device`` (the arithmetic runs there)."""
        return self.decode(name, get_ops("torch", device))

    def verify(self, backend: str = "numpy", device: Any = "cpu") -> dict[str, bool]:
        """Decode every tensor and compare with the digest recorded at pack time (and check
        every other byte of the file again): True or False per tensor; the first corrupted
        byte range (padding, a bank, an attachment, then tensors in order) raises its
        KernelpackError. :meth:`integrity` reports every failure instead."""
        report = self.integrity(backend, device)
        failure = next(iter(report.failures()), None)
        if failure is not None:
            raise failure
        return {name: bool(ok) for name, ok in report.tensors.items()}

    def integrity(self, backend: str = "numpy", device: Any = "cpu", progress: bool | None = False) -> "Integrity":
        """Every check of :meth:`verify`, none stopping the others (:class:`Integrity`). A bad
        ``backend`` or ``device`` raises at once. ``progress``: a bar over the tensors on
        stderr (None: when it is a terminal; shown after a second, kernelpack._progress)."""
        ops = get_ops(backend, device)
        ranges: dict[str, KernelpackError] = {}
        checks = [("padding", self.check_padding)]
        checks += [(f"banks.{n}", lambda n=n: self._bank(n)) for n in self._banks]
        checks += [(f"attachments.{n}", lambda n=n: self.read_attachment(n)) for n in self._attachments]
        for label, check in checks:
            try:
                check()
            except KernelpackError as exc:
                ranges[label] = exc
        tensors: dict[str, bool | KernelpackError] = {}
        for name, info in progress_bar(self._tensors.items(), progress, "verify", "tensor", len(self._tensors)):
            try:
                tensors[name] = self._matches(info, ops.to_numpy(self.decode(name, ops, keep=False)))
            except KernelpackError as exc:
                tensors[name] = exc
        return Integrity(ranges, tensors)

    @staticmethod
    def _matches(info: TensorInfo, array: np.ndarray) -> bool:
        """Decoded shape, dtype and SHA-256 are the ones recorded at pack time."""
        dtype_ok = array.dtype == NUMPY_DTYPES[info.dtype] or (
            info.dtype == "bfloat16" and array.dtype in (np.float32, np.uint16))
        return tuple(array.shape) == info.shape and dtype_ok and digest(array, info.dtype) == info.digest
