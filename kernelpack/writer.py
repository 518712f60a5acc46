"""The writer: tensors in their stored forms to a container file, atomically (``write``), in
the lowest format version that holds what it holds.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Collection, Mapping, Sequence

import msgpack
import numpy as np

from kernelpack._backend import NUMPY_DTYPES, NumpyOps
from kernelpack._parallel import blas_limit_for, map_in_order
from kernelpack.codecs import ADDED_CODECS, CODECS, DEFAULT_CODECS, DEFAULT_LEVEL, _compress
from kernelpack.errors import KernelpackError
from kernelpack.files import atomic_write, need_output
from kernelpack.forms import Encoded
from kernelpack.forms._base import Cost, Stored, need, need_int, need_name, shown
from kernelpack.layout import (ADDED_ARRAY_KEYS, ADDED_KEYS, ALIGN, COMPACT, DICTIONARY, PREAMBLE, _align,
                               _zstd_dictionary, digest, header_block, parse_header, unaligned)
from kernelpack.limits import MAX_HEADER

#: The writer's hash groups: payloads of fewer than GROUP_PAYLOAD bytes, in runs spanning at
#: most GROUP_SPAN bytes (so a lazy read of one small tensor hashes at most 64 KiB, some 40 us).
#: Why 4 KiB: a payload of that size spends 0.8% of its bytes on its own SHA-256; on the suite's
#: real models 88-95% of the arrays are smaller, and their hashes were 64 of the header's 80
#: bytes per tensor (benchmarks/header_bytes.py).
GROUP_PAYLOAD, GROUP_SPAN = 4096, 64 << 10


def _payload(stored: Stored, level: int, codecs: Collection[str]) -> tuple[bytes, dict[str, Any]]:
    dtype = NUMPY_DTYPES[stored.dtype]
    raw = np.asarray(stored.data, dtype=dtype, order="C").tobytes()
    codec, body = _compress(raw, dtype, level, codecs, stored.dtype, stored.spec.shape)
    ref = {"dtype": stored.dtype, "shape": list(stored.spec.shape), "codec": codec,
           "length": len(body), "sha256": hashlib.sha256(body).digest()}
    if stored.step is not None:
        ref["dq_step" if stored.dq else "step"] = float(stored.step)  # msgpack float 64
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


def _refs(header: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every array-ref of a header being written."""
    refs = list(header["banks"].values()) + list(header.get("attachments", {}).values())
    return refs + [r for t in header["tensors"].values() for r in t["arrays"].values()]


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
