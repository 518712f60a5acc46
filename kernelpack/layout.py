"""The .kpk format's bytes: preamble, header structure, alignment, the version tables of the
header's keys, the header dictionary (spec/FORMAT.md). What reader and writer both read.

Layout::

    0   8   magic b"\\x89KPK\\r\\n\\x1a\\n"
    8   2   format major (uint16 LE)      10  2   format minor (uint16 LE)
    12  4   header length H (uint32 LE)   16  32  SHA-256 of bytes 0..16 and the header
    48  H   header (msgpack map; since 1.4 it may be one zstd frame of it)
        ... zero bytes up to a multiple of 64: the data area starts there
        payloads in order, zero gaps: each at the first 64-aligned offset after the previous
        one (since 1.4: a compressed or empty payload right after it, unaligned)
"""

from __future__ import annotations

import functools
import hashlib
import struct
from typing import Any

import msgpack
import numpy as np

from kernelpack._backend import NUMPY_DTYPES

MAGIC = b"\x89KPK\r\n\x1a\n"
VERSION = (1, 7)
PREAMBLE = 48
ALIGN = 64
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
#: The largest group a reader accepts (section 5): what reading one allocates.
MAX_GROUP = 1 << 20
TENSOR_KEYS = frozenset({"form", "shape", "dtype", "digest", "fields", "arrays"})
ARRAY_KEYS = frozenset({"dtype", "shape", "offset", "length", "codec", "sha256"})
#: Array-ref keys added by a minor version (1.2: ``step``, quantised numbers; 1.7: ``dq_step``,
#: dependent-quantised numbers, kernelpack/dq.py).
ADDED_ARRAY_KEYS = {2: frozenset({"step"}), 7: frozenset({"dq_step"})}
#: Maps and arrays in a header, in all, and how deep they may nest (spec/FORMAT.md, "Limits").
MAX_CONTAINERS = 1 << 20
MAX_DEPTH = 32


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

def unaligned(codec: str, length: int) -> bool:
    """In a compact file (1.4), a payload that nobody maps in place starts right after the
    previous one: a compressed one, or an empty one. Raw payloads stay 64-aligned."""
    return codec != "none" or length == 0


def header_block(head: bytes, minor: int, major: int = VERSION[0]) -> bytes:
    """Everything before the payloads: preamble (with the header's SHA-256), the header as
    stored (msgpack, or since 1.4 a zstd frame of it), zero padding."""
    fixed = MAGIC + struct.pack("<HHI", major, minor, len(head))
    start = fixed + hashlib.sha256(fixed + head).digest() + head
    return start + b"\0" * (_align(len(start)) - len(start))


@functools.cache
def header_dictionary() -> bytes:
    """The header dictionary's bytes (spec/FORMAT.md section 2.2): a compressed header of a file
    of minor >= 6 is a zstd frame against them, as a raw-content dictionary."""
    return msgpack.packb(_DICTIONARY_MAP, use_bin_type=True)


@functools.cache
def _zstd_dictionary() -> Any:
    import zstandard

    return zstandard.ZstdCompressionDict(header_dictionary(), dict_type=zstandard.DICT_TYPE_RAWCONTENT)


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
