"""Hostile containers built from a header description: tiny files whose declared decode is huge.

A test describes tensors (form, shape, fields, arrays) and banks; every array is a zstd
frame of zeros of its declared size (a few hundred bytes for megabytes), laid out as the
spec says, so that the header is valid and only the declared work or memory is hostile.
Digests are zero: the reader must refuse these files before it decodes, never by a
digest mismatch after the work.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from typing import Any, Mapping

import msgpack
import zstandard

from kernelpack._backend import NUMPY_DTYPES
from kernelpack.layout import MAGIC, VERSION

#: (dtype, shape) of one stored array, or (dtype, shape, step) for quantised codes.
ArrayDecl = tuple


def zeros_frame(dtype: str, shape: tuple[int, ...]) -> bytes:
    """A zstd frame that inflates to the zero bytes of an array (declaring its size)."""
    size = math.prod(shape) * NUMPY_DTYPES[dtype].itemsize
    compressor = zstandard.ZstdCompressor(level=19, write_content_size=True)
    chunks = compressor.compressobj(size=size)
    block = b"\0" * min(size, 1 << 20)
    out, left = [], size
    while left:
        n = min(left, len(block))
        out.append(chunks.compress(block[:n]))
        left -= n
    out.append(chunks.flush())
    return b"".join(out)


def write_hostile(path: str | os.PathLike, tensors: Mapping[str, tuple[str, list[int], dict, Mapping[str, ArrayDecl]]],
                  banks: Mapping[str, ArrayDecl] | None = None, minor: int = VERSION[1]) -> int:
    """Write the container; returns its size in bytes."""
    data = bytearray()

    def place(decl: ArrayDecl) -> dict[str, Any]:
        dtype, shape = decl[0], tuple(decl[1])
        body = zeros_frame(dtype, shape)
        data.extend(b"\0" * (-len(data) % 64))
        ref = {"dtype": dtype, "shape": list(shape), "offset": len(data), "length": len(body),
               "codec": "zstd", "sha256": hashlib.sha256(body).digest()}
        if len(decl) > 2:
            ref["step"] = float(decl[2])
        data.extend(body)
        return ref

    header: dict[str, Any] = {"metadata": {}, "banks": {n: place(d) for n, d in (banks or {}).items()},
                              "tensors": {}}
    for name, (form, shape, fields, arrays) in tensors.items():
        header["tensors"][name] = {"form": form, "shape": list(shape), "dtype": "float32",
                                   "digest": bytes(32), "fields": fields,
                                   "arrays": {k: place(d) for k, d in arrays.items()}}
    head = msgpack.packb(header, use_bin_type=True)
    fixed = MAGIC + struct.pack("<HHI", VERSION[0], minor, len(head))
    start = fixed + hashlib.sha256(fixed + head).digest() + head
    blob = start + b"\0" * (-len(start) % 64) + bytes(data)
    with open(path, "wb") as f:
        f.write(blob)
    return len(blob)


def dct(shape: list[int], boundary: int) -> tuple:
    """A dct tensor over every axis keeping ``boundary`` zero coefficients."""
    return ("dct", shape, {"axes": list(range(len(shape))), "boundary": boundary},
            {"coefficients": ("float16", (boundary,))})


def series(lead: list[int], k: int, harmonics: int) -> tuple:
    """A series tensor of kernels k x k with ``harmonics`` terms on both axes."""
    return ("series", lead + [k, k], {"family": "cosine", "harmonics": [harmonics, harmonics],
                                      "points": ["cgl", "cgl"]},
            {"coefficients": ("float16", tuple(lead) + (harmonics, harmonics))})


def linear(rows: int, cols: int, p: int, r: int) -> tuple:
    """A low-rank linear tensor (rows x cols) with p primaries and A = A1 A2 of rank r."""
    return ("linear", [rows, cols], {}, {"primaries": ("float16", (p, cols)), "A1": ("float16", (p, r)),
                                         "A2": ("float16", (r, rows - p))})


def basis(slices: int, bank: str, filt: tuple[int, ...]) -> tuple:
    """A basis tensor of ``slices`` slices shaped like the bank's filters."""
    return ("basis", [slices, *filt], {"bank": bank},
            {"index": ("uint8", (slices,)), "a": ("float16", (slices,)), "b": ("float16", (slices,))})
