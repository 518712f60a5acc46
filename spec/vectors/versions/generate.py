"""Write the version corpus: small files of every format version, and what a reader must do with each.

The files are committed and read as they are by tests/test_versions.py, forever: a
reader of any later version must still do what ``manifest.json`` says with them. So
this script only ADDS files: it writes the files of ``FILES`` that do not exist yet and
their manifest entries, and never rewrites an existing file or entry (byte-identical
output would need the same zstandard library anyway). To add a version, add its files
to ``FILES`` and run it once; deleting a committed file to regenerate it is a change of
the format's history, not a routine step.

    python spec/vectors/versions/generate.py

Files of the current and older versions are made by kernelpack's own writer from fixed
numbers (no random data, no LAPACK); files of versions that do not exist yet (a far
future minor, another major) are such a file edited by hand: a new preamble and header,
with a correct header SHA-256, so that the version is the only thing a reader can object to.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
import unittest.mock
from typing import Any, Callable

import msgpack
import numpy as np

from kernelpack import writer
from kernelpack.codecs import codecs_of
from kernelpack.errors import KernelpackError
from kernelpack.forms import BasisTensor, DCTTensor, DenseTensor, Encoded, LinearTensor, SeriesTensor
from kernelpack.forms._base import Stored, to_stored
from kernelpack.layout import ZSTD_MAGIC, digest, header_block, header_map_bytes
from kernelpack.reader import Container
from kernelpack.writer import write

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST = os.path.join(HERE, "manifest.json")
#: A minor version no reader will reach: the "newer minor" files stay newer forever.
FUTURE_MINOR = 0xFFFF
GRAPH = b"onnx graph bytes: opaque to kernelpack " * 8


def every_form() -> dict[str, Encoded]:
    """One small tensor per form, from fixed numbers (exact in float16)."""
    def numbers(shape: tuple[int, ...], dtype: str = "float16") -> Stored:
        count = int(np.prod(shape))
        return to_stored((np.arange(count, dtype=np.float32) % 7 - 3).reshape(shape) / 4, dtype)

    return {
        "dense.float32": DenseTensor(Stored(np.arange(6, dtype=np.float32).reshape(2, 3) / 8, "float32"), "float32"),
        "dense.int64": DenseTensor(Stored(np.array(-3, dtype=np.int64), "int64"), "int64"),
        "dense.zeros": DenseTensor(Stored(np.zeros(256, dtype=np.float32), "float32"), "float32"),  # zstd
        "dct": DCTTensor((4, 4), (0, 1), numbers((6,))),
        "series": SeriesTensor((2, 3, 3), "cosine", ("cgl", (-0.5, 0.0, 0.75)), numbers((2, 2, 2))),
        "basis": BasisTensor((3, 2, 2), "bank0", numbers((2, 2, 2)), Stored(np.array([0, 1, 1], np.uint8), "uint8"),
                             numbers((3,)), numbers((3,), "bfloat16")),
        "linear": LinearTensor((3, 4), numbers((2, 4), "float32"), (numbers((2, 1)),),
                               Stored(np.array([2, 0, 1], np.int32), "int32")),
    }


def quantised_forms(dq: bool = False) -> dict[str, Encoded]:
    """Format 1.2: every kind of number array quantised (int8 and int16 codes times a float32
    step), one small tensor per form, beside float arrays in the same tensor (basis ``b``).
    ``dq``: the same codes dependent-quantised (``dq_step``, format 1.7)."""
    def codes(shape: tuple[int, ...], dtype: str, step: float) -> Stored:
        count, top = int(np.prod(shape)), 127 if dtype == "int8" else 32767
        values = (np.arange(count, dtype=np.int64) * 7919) % (2 * top + 1) - top
        return Stored(values.astype(dtype).reshape(shape), dtype, step / 2 if dq else step, dq)

    tenth = float(np.float32(0.1))
    return {
        "dense": DenseTensor(codes((2, 3), "int16", 2.0 ** -12), "float32"),
        "dct": DCTTensor((4, 4), (0, 1), codes((6,), "int8", 0.125)),
        "series": SeriesTensor((2, 3, 3), "cosine", ("cgl", (-0.5, 0.0, 0.75)), codes((2, 2, 2), "int16", 2.0 ** -10)),
        "basis": BasisTensor((3, 2, 2), "bank0", codes((2, 2, 2), "int8", tenth),
                             Stored(np.array([0, 1, 1], np.uint8), "uint8"), codes((3,), "int16", tenth),
                             to_stored(np.array([0.5, -0.25, 0.0], np.float32), "float16")),
        "linear": LinearTensor((3, 4), codes((2, 4), "int8", 0.5), (codes((2, 1), "int16", 2.0 ** -8),),
                               Stored(np.array([2, 0, 1], np.int32), "int32")),
    }


def byte_planes() -> dict[str, Encoded]:
    """Format 1.2 by its codec alone (no ``step``): arrays of 2, 4 and 8 byte elements that
    ``zstd-shuffle`` packs smallest, and a uint8 array, which is never shuffled."""
    ramp = np.arange(512, dtype=np.int64)
    wrapped = ramp * 7919 % 1021  # 0..1020 in a fixed scrambled order

    def dense(values: np.ndarray, dtype: str) -> DenseTensor:
        return DenseTensor(Stored(values.astype(dtype), dtype), dtype)

    return {
        "float16": dense(wrapped / 1024 + 1, "float16"),
        "float32": dense(np.sin(ramp * 0.37) / 10, "float32"),
        "int16": dense(wrapped - 510, "int16"),
        "int64": dense(wrapped * 1000, "int64"),
        "bytes": dense(ramp % 7, "uint8"),
    }


def entropy_coded() -> dict[str, Encoded]:
    """Format 1.3 by its codec alone: peaked integer codes (a Laplacian made from a fixed
    integer hash, no random generator) that ``rans`` packs smallest, int8 and int16 quantised,
    uint8 and uint16 plain, and a float16 array beside them, which ``rans`` never takes."""
    ramp = np.arange(4096, dtype=np.int64)
    z = ramp.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # splitmix64 finaliser: fixed, well mixed
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    uniform = (((z ^ (z >> np.uint64(31))) >> np.uint64(11)).astype(np.float64) + 0.5) / 2 ** 53  # in (0, 1)
    laplace = np.rint(np.log(uniform) * 3 * np.where(ramp % 2, 1, -1)).astype(np.int64)

    def dense(values: np.ndarray, dtype: str, step: float | None = None) -> DenseTensor:
        return DenseTensor(Stored(values.astype(dtype), dtype, step), "float32" if step else dtype)

    return {
        "int8": dense(np.clip(laplace, -127, 127), "int8", 2.0 ** -7),
        "int16": dense(laplace * 40 // 7, "int16", 2.0 ** -12),
        "uint8": dense(np.abs(laplace) % 256, "uint8"),
        "uint16": dense(np.abs(laplace) + 1000, "uint16"),
        "float16": dense(ramp / 1024, "float16"),
    }


# --- hand edits: a new preamble and header over the same payloads -----------------------
def rewrite(path: str, major: int, minor: int, change: Callable[[dict[str, Any]], None]) -> None:
    """Give a file another version and header; the payloads (offsets relative to the data
    start) stay as they are, the header SHA-256 is recomputed."""
    with open(path, "rb") as f:
        blob = f.read()
    length = struct.unpack_from("<I", blob, 12)[0]
    head = blob[48:48 + length]
    header = msgpack.unpackb(header_map_bytes(head, struct.unpack_from("<H", blob, 10)[0]),
                             raw=False)  # written back plain
    data = blob[-(-(48 + length) // 64) * 64:]
    change(header)
    with open(path, "wb") as f:
        f.write(header_block(msgpack.packb(header, use_bin_type=True), minor, major) + data)


EMPTY = hashlib.sha256(b"").digest()


def empty_ref() -> dict[str, Any]:
    """A stored array of no bytes: at offset 0 it fits any layout, so it adds nothing else wrong."""
    return {"dtype": "float16", "shape": [0], "offset": 0, "length": 0, "codec": "none", "sha256": EMPTY}


def future_keys(header: dict[str, Any]) -> None:
    """Unknown keys everywhere a newer minor version may add them, and a tensor of an unknown form."""
    header["future"] = {"anything": [1, 2.5, "text"]}
    header["tensors"]["dct"]["quantiser"] = "new"
    header["tensors"]["dct"]["fields"]["window"] = "hann"
    header["tensors"]["dct"]["arrays"]["coefficients"]["checksum2"] = b"\x01" * 16
    header["tensors"]["hyper"] = {"form": "hyperlinear", "shape": [0], "dtype": "float32", "digest": EMPTY,
                                  "fields": {"depth": 3}, "arrays": {"data": empty_ref()}}


def unknown(*keys: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set one header entry (what an older reader must refuse rather than misread)."""
    def change(header: dict[str, Any]) -> None:
        node = header
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return change


def keep(header: dict[str, Any]) -> None:
    """No change: only the version differs."""


def extra_array(header: dict[str, Any]) -> None:
    """An array the form does not define (e.g. what a newer minor might add to ``dct``)."""
    header["tensors"]["dct"]["arrays"]["residual"] = empty_ref()


# --- the corpus: file -> (how it is made, what a reader must do) ----------------------------
def plain(path: str) -> None:
    write(path, every_form(), metadata={"corpus": "1.0"}, compact=False)


def with_attachments(path: str) -> None:
    write(path, every_form(), metadata={"corpus": "1.1"}, attachments={"onnx.graph": GRAPH, "empty": b""}, compact=False)


def quantised(path: str) -> None:
    write(path, quantised_forms(), metadata={"corpus": "1.2"}, compact=False)


def dependent(path: str) -> None:
    """Format 1.7: ``quantised_forms``' codes as dependent-quantised numbers, every form."""
    write(path, quantised_forms(dq=True), metadata={"corpus": "1.7 dq"}, compact=False)
    with Container(path) as c:
        assert c.version == (1, 7) and c.info("dense").arrays["data"].spec.dq


def shuffled(path: str) -> None:
    write(path, byte_planes(), metadata={"corpus": "1.2 zstd-shuffle"}, compact=False)
    with Container(path) as c:  # the codec really is in the file
        codecs = {name: c.info(name).arrays["data"].codec for name in c.keys()}
    assert codecs == {**dict.fromkeys(["float16", "float32", "int16", "int64"], "zstd-shuffle"),
                      "bytes": "zstd"}, codecs


def entropy(path: str) -> None:
    write(path, entropy_coded(), metadata={"corpus": "1.3 rans"}, codecs=codecs_of(3), compact=False)
    with Container(path) as c:  # the codec really is in the file
        codecs = {name: c.info(name).arrays["data"].codec for name in c.keys()}
    assert codecs == {**dict.fromkeys(["int8", "int16", "uint8", "uint16"], "rans"), "float16": "zstd-shuffle"}, codecs


def context_coded(path: str) -> None:
    """Format 1.5 by its codec alone: the codes of ``entropy_coded`` as rows (64 x 64) whose
    scales differ row by row, written with ``rans-ctx`` (and zstd) as the codecs, beside a float16 array."""
    tensors = entropy_coded()
    scale = 1 + (np.arange(4096, dtype=np.int64) // 64) % 4
    laplace = tensors["int8"].arrays()["data"].data.astype(np.int64)
    for name in ("int8", "int16", "uint8", "uint16"):
        stored = tensors[name].arrays()["data"]
        values = (laplace if name.startswith("int") else np.abs(laplace)) * scale
        info = np.iinfo(stored.dtype)
        values = np.clip(values, info.min, info.max).astype(stored.dtype).reshape(64, 64)
        tensors[name] = DenseTensor(Stored(values, stored.dtype, stored.step), tensors[name].dtype)
    write(path, tensors, metadata={"corpus": "1.5 rans-ctx"}, codecs=("zstd", "zstd-shuffle", "rans-ctx"), compact=False)
    with Container(path) as c:  # the codec really is in the file
        codecs = {name: c.info(name).arrays["data"].codec for name in c.keys()}
    assert codecs == {**dict.fromkeys(["int8", "int16", "uint8", "uint16"], "rans-ctx"),
                      "float16": "zstd-shuffle"}, codecs


def compact(path: str) -> None:
    """Format 1.4, compact: every form, the header stored as one zstd frame, compressed and
    empty payloads right after the previous one (raw ones 64-aligned). Written as the 1.4
    writer did: without the hash groups a compact file has had since 1.6."""
    with unittest.mock.patch.object(writer, "hash_groups", lambda placed: []):
        write(path, {**every_form(), **entropy_coded()}, metadata={"corpus": "1.4 compact"},
              attachments={"onnx.graph": GRAPH, "empty": b""}, compact=True)
    with open(path, "rb") as f:
        assert f.read(52)[48:] == ZSTD_MAGIC  # the header really is compressed
    with Container(path) as c:  # and some payload really is unaligned
        assert any(c.info(n).arrays[k].offset % 64 for n in c.keys() for k in c.info(n).arrays)


def dictionary_header(path: str) -> None:
    """Format 1.6 by its header alone: every form, written compact without hash groups, the
    header one zstd frame against the header dictionary (spec/FORMAT.md section 2.2)."""
    with unittest.mock.patch.object(writer, "hash_groups", lambda placed: []):
        write(path, every_form(), metadata={"corpus": "1.6 header dictionary"}, compact=True)
    with Container(path) as c:
        assert c.version == (1, 6) and not c._groups


def grouped(path: str) -> None:
    """Format 1.6, hash groups: every form and the entropy-coded arrays, all small payloads
    stored raw (so each starts 64-aligned and the groups span zero gaps), the header
    compressed, beside one payload of 4096 bytes that keeps its own hash."""
    big = DenseTensor(Stored(np.arange(4096, dtype=np.uint8).reshape(64, 64), "uint8"), "uint8")
    tensors = {**every_form(), **entropy_coded(), "big": big}
    write(path, tensors, metadata={"corpus": "1.6 hash groups"}, attachments={"onnx.graph": GRAPH, "empty": b""},
          codecs=("none",), compact=True)
    with Container(path) as c:  # groups really are in the file, and the large payload is outside them
        assert c.version == (1, 6) and len(c._groups) >= 1
        assert c.info("big").arrays["data"].sha256 is not None
        assert sum(r.sha256 is None for n in c.keys() for r in c.info(n).arrays.values()) >= 10


def as_minor(base: Callable[[str], None], minor: int) -> Callable[[str], None]:
    """``base``'s file with another minor version and the same header bytes (SHA-256 recomputed)."""
    def make(path: str) -> None:
        base(path)
        with open(path, "rb") as f:
            blob = f.read()
        length = struct.unpack_from("<I", blob, 12)[0]
        with open(path, "wb") as f:
            f.write(header_block(blob[48:48 + length], minor) + blob[-(-(48 + length) // 64) * 64:])
    return make


def edited(base: Callable[[str], None], major: int, minor: int,
           change: Callable[[dict[str, Any]], None]) -> Callable[[str], None]:
    def make(path: str) -> None:
        base(path)
        rewrite(path, major, minor, change)
    return make


LOAD = {"expect": "load"}
#: What a 1.3 reader says of a compact file's layout with a plain header: its first unaligned
#: payload (the empty attachment, right after the graph's zstd frame).
UNALIGNED_1_3 = {"expect": "refuse", "tensor": None, "field": "attachments.empty.offset",
                 "message": "payloads are packed in order"}
FILES: dict[str, tuple[Callable[[str], None], dict[str, Any]]] = {
    "v1.0.kpk": (plain, LOAD),
    "v1.1-attachments.kpk": (with_attachments, LOAD),
    "v1.2-quantised.kpk": (quantised, LOAD),
    "v1.1-with-step.kpk": (edited(quantised, 1, 1, keep), {
        "expect": "refuse", "tensor": None, "field": "banks.bank0.step",
        "message": "is not a field of a stored array in a version 1.1 file"}),
    "v1.2-zstd-shuffle.kpk": (shuffled, LOAD),
    "v1.1-zstd-shuffle.kpk": (edited(shuffled, 1, 1, keep), {
        "expect": "refuse", "tensor": "float16", "field": "arrays.data.codec",
        "message": "in a version 1.1 file, got 'zstd-shuffle'"}),
    "v1.2-zstd-shuffle-bytes.kpk": (edited(shuffled, 1, 2, unknown(
        "tensors", "bytes", "arrays", "data", "codec", value="zstd-shuffle")), {
        "expect": "refuse", "tensor": "bytes", "field": "arrays.data.codec",
        "message": "zstd-shuffle is only for elements of more than one byte"}),
    "v1.3-rans.kpk": (entropy, LOAD),
    "v1.2-rans.kpk": (edited(entropy, 1, 2, keep), {
        "expect": "refuse", "tensor": "int8", "field": "arrays.data.codec",
        "message": "in a version 1.2 file, got 'rans'"}),
    "v1.4-compact.kpk": (compact, LOAD),
    "v1.5-rans-ctx.kpk": (context_coded, LOAD),
    "v1.6-groups.kpk": (grouped, LOAD),
    "v1.6-dictionary.kpk": (dictionary_header, LOAD),
    "v1.7-dq.kpk": (dependent, LOAD),
    "v1.6-dq.kpk": (edited(dependent, 1, 6, keep), {
        "expect": "refuse", "tensor": None, "field": "banks.bank0.dq_step",
        "message": "is not a field of a stored array in a version 1.6 file"}),
    "v1.5-dictionary.kpk": (as_minor(dictionary_header, 5), {
        "expect": "refuse", "tensor": None, "field": "header", "message": "bad compressed header"}),
    "v1.5-groups.kpk": (edited(grouped, 1, 5, keep), {
        "expect": "refuse", "tensor": None, "field": "groups", "message": "unknown field in a version 1.5 file"}),
    "v1.4-rans-ctx.kpk": (edited(context_coded, 1, 4, keep), {
        "expect": "refuse", "tensor": "int8", "field": "arrays.data.codec",
        "message": "in a version 1.4 file, got 'rans-ctx'"}),
    "v1.3-compressed-header.kpk": (as_minor(compact, 3), {
        "expect": "refuse", "tensor": None, "field": "header",
        "message": "compressed headers are a 1.4 feature"}),
    "v1.3-unaligned.kpk": (edited(compact, 1, 3, keep), UNALIGNED_1_3),
    "v1.future-unknown-keys.kpk": (edited(with_attachments, 1, FUTURE_MINOR, future_keys), {
        "expect": "load", "decode_errors": {"hyper": {"field": "form", "message": "needs a newer kernelpack"}}}),
    "v1.future-unknown-codec.kpk": (edited(plain, 1, FUTURE_MINOR, unknown(
        "tensors", "dct", "arrays", "coefficients", "codec", value="brotli")), {
        "expect": "refuse", "tensor": "dct", "field": "arrays.coefficients.codec", "message": "must be one of"}),
    "v1.future-unknown-dtype.kpk": (edited(plain, 1, FUTURE_MINOR, unknown(
        "tensors", "dense.float32", "arrays", "data", "dtype", value="float8_e4m3")), {
        "expect": "refuse", "tensor": "dense.float32", "field": "arrays.data.dtype", "message": "unknown dtype"}),
    "v1.future-unknown-array.kpk": (edited(plain, 1, FUTURE_MINOR, extra_array), {
        "expect": "refuse", "tensor": "dct", "field": "arrays.residual", "message": "is not a field of this form"}),
    "v1.0-with-attachments.kpk": (edited(with_attachments, 1, 0, keep), {
        "expect": "refuse", "tensor": None, "field": "attachments", "message": "unknown field in a version 1.0 file"}),
    "v2.0.kpk": (edited(plain, 2, 0, keep), {
        "expect": "refuse", "tensor": None, "field": "version", "message": "needs a kernelpack reader for format 2.x"}),
    "v0.1.kpk": (edited(plain, 0, 1, keep), {
        "expect": "refuse", "tensor": None, "field": "version", "message": "needs a kernelpack reader for format 0.x"}),
}


def record(path: str, expect: dict[str, Any]) -> dict[str, Any]:
    """The manifest entry: file SHA-256, version, expectation and, for files that load, the
    digest of every tensor decoded now (it must agree with the header's) and of every attachment."""
    with open(path, "rb") as f:
        blob = f.read()
    entry = {"sha256": hashlib.sha256(blob).hexdigest(), "version": list(struct.unpack_from("<HH", blob, 8)),
             **expect}
    if expect["expect"] != "load":
        try:
            Container(path).close()
        except KernelpackError as exc:
            assert (exc.tensor, exc.field) == (expect["tensor"], expect["field"]) and expect["message"] in str(exc), exc
            return entry
        raise AssertionError(f"{path} was expected to be refused")
    failing = expect.get("decode_errors", {})
    with Container(path) as c:
        tensors = {}
        for name in c.keys():
            if name in failing:
                continue
            value, info = c.get_numpy(name), c.info(name)
            assert digest(value, info.dtype) == info.digest, name
            tensors[name] = {"shape": list(info.shape), "dtype": info.dtype, "sha256": info.digest.hex()}
        entry["tensors"] = tensors
        entry["attachments"] = {a: hashlib.sha256(c.read_attachment(a)).hexdigest() for a in c.attachments()}
    return entry


def main() -> int:
    manifest = {"files": {}}
    if os.path.exists(MANIFEST):
        with open(MANIFEST, encoding="utf-8") as f:
            manifest = json.load(f)
    added = []
    for name, (make, expect) in FILES.items():
        path = os.path.join(HERE, name)
        if os.path.exists(path) or name in manifest["files"]:
            continue  # committed: never rewritten
        with tempfile.TemporaryDirectory() as folder:
            scratch = os.path.join(folder, name)
            make(scratch)
            manifest["files"][name] = record(scratch, expect)
            os.replace(scratch, path)
        added.append(name)
    with open(MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"added {added or 'nothing'}; the corpus has {len(manifest['files'])} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
