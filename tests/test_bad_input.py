"""Bad input: every malformed, corrupted or hostile file, and every invalid encoder setting,
raises ``KernelpackError`` whose message names the file, the tensor and the field.

Each case starts from one valid container and changes ONE thing; the file is then laid
out again exactly as the spec says (header length, header SHA-256, zero padding, payload
checksums), so that the changed thing is the only thing wrong.
"""

from __future__ import annotations

import math
import os
import struct
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np
import pytest
import zstandard

import kernelpack
from conftest import RawFile, random_array
from kernelpack._backend import NUMPY_DTYPES
from kernelpack.codecs import _unshuffle
from kernelpack.forms import FORMS, LinearTensor, SeriesTensor
from kernelpack.forms._base import FORBIDDEN_IN_NAMES, shown, to_stored

Case = Callable[[RawFile, Path], None]
DELETE = object()
BANK = "bank0"
ATTACHMENT = "graph"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tensor per form and option, and an attachment. Shapes the cases rely on: dct
    boundary 54; series coefficients (4, 3, 3, 2); basis 12 slices, bank (4, 3, 3); linear
    p = 4 of 8 with an order (filter 0 is zero, never a primary); lowrank A1 (4, 2), A2 (2, 4);
    zeros compress; flags is bool."""
    linear = random_array(5, (8, 3, 3, 3))
    linear[0] = 0.0
    tensors = {"bias": random_array(0, (3,)), "big": random_array(1, (100,)),
               "dct": random_array(2, (4, 3, 3, 3)), "series": random_array(3, (4, 3, 3, 3)),
               "basis": random_array(4, (4, 3, 3, 3)), "linear": linear,
               "lowrank": random_array(6, (8, 3, 3, 3)), "zeros": np.zeros(4096, np.float32),
               "flags": np.array([True, False, True])}
    forms = {"dct": kernelpack.DCT(keep=0.5),
             "series": kernelpack.Series(harmonics=(3, 2), points=("cgl", [-0.8, 0.1, 0.9])),
             "basis": kernelpack.Basis(bank=4, bank_name=BANK), "linear": kernelpack.Linear(alpha=0.5),
             "lowrank": kernelpack.Linear(primaries=4, rank=2)}
    path = tmp_path_factory.mktemp("base") / "base.kpk"
    kernelpack.save(tensors, path, forms=forms, attachments={ATTACHMENT: b"graph " * 10})
    raw = RawFile.read(path)  # every payload with its own sha256 (hash groups: tests/test_hash_groups.py)
    raw.write(path)
    assert raw.ref("tensors", "zeros", "data")["codec"] == "zstd"
    assert "order" in raw.header["tensors"]["linear"]["arrays"]
    return path


def check_error(caught: pytest.ExceptionInfo, path: Path, tensor: str | None, field: str) -> None:
    """The error names file, tensor and field, and its message holds no character a name may
    not (a hostile key or name is shown escaped, so it cannot forge a log line)."""
    error = caught.value
    assert (error.path, error.tensor, error.field) == (str(path), tensor, field), str(error)
    for part in (str(path), tensor, field):
        assert part is None or part in str(error)
    assert FORBIDDEN_IN_NAMES.search(str(error)) is None, repr(str(error))


# --- making one thing wrong --------------------------------------------------------------
def edit(*keys: str, value: Any = DELETE) -> Case:
    """Set (or delete) one header entry."""
    def make(raw: RawFile, path: Path) -> None:
        node = raw.header
        for key in keys[:-1]:
            node = node[key]
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
        raw.write(path)
    return make


def resize(tensor: str, array: str, shape: list[int], dtype: str | None = None) -> Case:
    """Give a stored array another shape (and dtype) with a consistent length, so the
    length check passes and the shape itself is what is wrong."""
    def make(raw: RawFile, path: Path) -> None:
        ref = raw.header["tensors"][tensor]["arrays"][array]
        ref.update(shape=shape, dtype=dtype or ref["dtype"], codec="none")
        ref["length"] = math.prod(shape) * NUMPY_DTYPES[ref["dtype"]].itemsize
        raw.write(path)
    return make


def extra_array(tensor: str, like: str, *names: str) -> Case:
    """Arrays ``names`` added to a tensor, each a copy of its array ``like`` (in that order)."""
    def make(raw: RawFile, path: Path) -> None:
        arrays = raw.header["tensors"][tensor]["arrays"]
        for name in names:
            arrays[name] = dict(arrays[like])
        raw.write(path)
    return make


def preamble(major: int = 1, length: int | None = None, checksum: bytes | None = None,
             head: bytes | None = None) -> Case:
    def make(raw: RawFile, path: Path) -> None:
        raw.major = major
        raw.write(path, head=head, length=length, checksum=checksum)
    return make


def on_bytes(change: Callable[[bytes], bytes]) -> Case:
    def make(raw: RawFile, path: Path) -> None:
        raw.write(path)
        path.write_bytes(change(path.read_bytes()))
    return make


def flip(offset: int) -> Callable[[bytes], bytes]:
    return lambda blob: blob[:offset] + bytes([blob[offset] ^ 0x01]) + blob[offset + 1:]


def move(tensor: str, array: str, delta: int) -> Case:
    def make(raw: RawFile, path: Path) -> None:
        raw.header["tensors"][tensor]["arrays"][array]["offset"] += delta
        raw.write(path)
    return make


def values(key: tuple[str, ...], change: Callable[[np.ndarray], None]) -> Case:
    """New payload values (checksum updated, stored uncompressed): a valid file whose
    numbers are wrong."""
    def make(raw: RawFile, path: Path) -> None:
        ref = raw.ref(*key)
        body = raw.payload(*key)
        if ref["codec"] in ("zstd", "zstd-shuffle"):
            body = zstandard.ZstdDecompressor().decompress(body)
        data = (_unshuffle(body, NUMPY_DTYPES[ref["dtype"]]) if ref["codec"] == "zstd-shuffle"
                else np.frombuffer(body, NUMPY_DTYPES[ref["dtype"]])).copy()
        change(data)
        raw.replace_payload(key, data.tobytes(), codec="none")
        raw.write(path)
    return make


def body(key: tuple[str, ...], new: Callable[[bytes], bytes], codec: str | None = None) -> Case:
    """A new payload body (checksum updated)."""
    def make(raw: RawFile, path: Path) -> None:
        raw.replace_payload(key, new(raw.payload(*key)), codec=codec)
        raw.write(path)
    return make


def setter(index: int, value: Any) -> Callable[[np.ndarray], None]:
    def change(data: np.ndarray) -> None:
        data[index] = value
    return change


def float16_bits(bits: int) -> Callable[[np.ndarray], None]:
    return setter(0, np.uint16(bits).view(np.float16))


def raw_byte(index: int, value: int) -> Callable[[np.ndarray], None]:
    """Set one byte of the payload (a bool array's bytes other than 0 and 1 included)."""
    def change(data: np.ndarray) -> None:
        data.view(np.uint8)[index] = value
    return change


def spare_bank(dtype: str, shape: list[int]) -> Case:
    """A bank no tensor names, laid out like any payload (zero bytes of its dtype and shape)."""
    def make(raw: RawFile, path: Path) -> None:
        raw.header["banks"]["spare"] = {"dtype": dtype, "shape": shape, "codec": "none", "offset": 0,
                                        "length": 0, "sha256": ZERO_SHA}
        raw.replace_payload(("banks", "spare"), bytes(math.prod(shape) * NUMPY_DTYPES[dtype].itemsize))
        raw.write(path)
    return make


def payload_byte(key: tuple[str, ...]) -> Case:
    """Flip one stored byte; the header (and its checksum) stay as they were."""
    def make(raw: RawFile, path: Path) -> None:
        offset = raw.ref(*key)["offset"]
        raw.data = raw.data[:offset] + bytes([raw.data[offset] ^ 0x01]) + raw.data[offset + 1:]
        raw.write(path)
    return make


def padding_after(key: tuple[str, ...]) -> Case:
    def make(raw: RawFile, path: Path) -> None:
        end = raw.ref(*key)["offset"] + raw.ref(*key)["length"]
        assert end % 64
        raw.data = raw.data[:end] + b"\x01" + raw.data[end + 1:]
        raw.write(path)
    return make


def header_padding(raw: RawFile, path: Path) -> None:
    raw.write(path)
    blob = path.read_bytes()
    end = 48 + struct.unpack("<I", blob[12:16])[0]
    assert end % 64
    path.write_bytes(blob[:end] + b"\x01" + blob[end + 1:])


def rename(group: str, old: str, new: str) -> Case:
    """Give a tensor, bank or attachment another name."""
    def make(raw: RawFile, path: Path) -> None:
        entries = raw.header[group]
        entries[new] = entries.pop(old)
        raw.write(path)
    return make


def head_with(**extra: Any) -> Case:
    """A header packed with top-level entries added (values msgpack can write but the reader refuses)."""
    def make(raw: RawFile, path: Path) -> None:
        raw.write(path, head=msgpack.packb({**raw.header, **extra}, use_bin_type=True))
    return make


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def repeated_key(raw: RawFile, path: Path) -> None:
    """The header map with one key twice (msgpack can hold it; readers would disagree on which counts)."""
    items = list(raw.header.items()) + [("metadata", {"second": "copy"})]
    assert len(items) < 16  # a fixmap
    pack = lambda value: msgpack.packb(value, use_bin_type=True)  # noqa: E731
    head = bytes([0x80 | len(items)]) + b"".join(pack(k) + pack(v) for k, v in items)
    raw.write(path, head=head)


def t(name: str, *keys: str, value: Any = DELETE) -> Case:
    return edit("tensors", name, *keys, value=value)


def ref_of(name: str, array: str, key: str, value: Any = DELETE) -> Case:
    return edit("tensors", name, "arrays", array, key, value=value)


ZERO_SHA = b"\0" * 32
# (case, tensor, field) for errors the header alone reveals: kernelpack.open refuses.
HEADER_CASES = {
    # preamble
    "magic": (on_bytes(flip(1)), None, "magic"),
    "major-2": (preamble(major=2), None, "version"),
    "major-0": (preamble(major=0), None, "version"),
    "header-length-beyond-file": (preamble(length=1 << 20), None, "header_length"),
    "header-length-over-limit": (preamble(length=(64 << 20) + 1), None, "header_length"),
    "header-checksum": (preamble(checksum=ZERO_SHA), None, "header_sha256"),
    "header-byte-flipped": (on_bytes(flip(60)), None, "header_sha256"),
    "header-not-msgpack": (preamble(head=b"\xc1\xc1\xc1"), None, "header"),
    "header-trailing-bytes": (lambda raw, path: preamble(head=msgpack.packb(raw.header) + b"\0")(raw, path),
                              None, "header"),
    "header-not-a-map": (preamble(head=msgpack.packb([1, 2, 3])), None, "header"),
    "truncated-in-preamble": (on_bytes(lambda b: b[:40]), None, "preamble"),
    "truncated-in-header": (on_bytes(lambda b: b[:100]), None, "header_length"),
    "truncated-in-data": (on_bytes(lambda b: b[:-1]), None, "size"),
    "trailing-bytes": (on_bytes(lambda b: b + b"\0" * 64), None, "size"),
    # top level
    "top-unknown-key": (edit("extra", value={}), None, "extra"),
    "metadata-value-int": (edit("metadata", value={"a": 1}), None, "metadata"),
    "metadata-key-bytes": (edit("metadata", value={b"a": "b"}), None, "metadata"),
    "metadata-not-map": (edit("metadata", value=["a"]), None, "metadata"),
    "banks-not-map": (edit("banks", value=[]), None, "banks"),
    "tensors-missing": (edit("tensors"), None, "tensors"),
    "tensors-not-map": (edit("tensors", value=[1]), None, "tensors"),
    # a bad name: the field is the map whose key it is (the tensor is not named: it has no valid name)
    "tensor-name-empty": (lambda raw, path: edit("tensors", "", value=raw.header["tensors"].pop("bias"))(raw, path),
                          None, "tensors"),
    "tensor-name-control-char": (lambda raw, path: edit("tensors", "a\nb", value=raw.header["tensors"].pop("bias"))(
        raw, path), None, "tensors"),
    "bank-name-too-long": (lambda raw, path: edit("banks", "b" * 1025, value=raw.header["banks"].pop(BANK))(raw, path),
                           None, "banks"),
    # names are opaque keys, never paths: no '..' segment, no control or bidi character
    "tensor-name-dotdot": (rename("tensors", "bias", "../bias"), None, "tensors"),
    "tensor-name-dotdot-inside": (rename("tensors", "bias", "a/../../b"), None, "tensors"),
    "tensor-name-dotdot-backslash": (rename("tensors", "bias", "a\\..\\b"), None, "tensors"),
    "tensor-name-nul": (rename("tensors", "bias", "a\0b"), None, "tensors"),
    "tensor-name-delete": (rename("tensors", "bias", "a\x7f"), None, "tensors"),
    "tensor-name-c1-control": (rename("tensors", "bias", "a\x85b"), None, "tensors"),
    "tensor-name-line-separator": (rename("tensors", "bias", "a\u2028b"), None, "tensors"),
    "tensor-name-bidi-override": (rename("tensors", "bias", "a\u202eb"), None, "tensors"),
    "bank-name-dotdot": (rename("banks", BANK, ".."), None, "banks"),
    "attachment-name-dotdot": (rename("attachments", ATTACHMENT, "../graph"), None, "attachments"),
    "attachment-name-control": (rename("attachments", ATTACHMENT, "graph\n"), None, "attachments"),
    # the header's structure: parsed within limits, before any field is looked at
    "header-repeated-key": (repeated_key, None, "header"),
    "header-extension-type": (head_with(future=msgpack.ExtType(7, b"x")), None, "header"),
    "header-timestamp": (head_with(future={"when": msgpack.Timestamp(0, 0)}), None, "header"),
    "header-nested-too-deep": (head_with(future=nested(32)), None, "header"),
    "header-nested-deepest-allowed": (head_with(future=nested(31)), None, "future"),  # then: unknown in 1.1
    "header-too-many-maps-and-arrays": (head_with(future=[[]] * (1 << 20)), None, "header"),
    "top-key-bytes": (edit(b"x", value=1), None, "b'x'"),
    "top-key-long": (edit("k" * 100, value=1), None, shown("k" * 100)),
    "top-key-newline": (edit("a\nb", value=1), None, shown("a\nb")),  # escaped in the field
    # hostile scalars where numbers and names are expected
    "dtype-a-list": (t("bias", "dtype", value=[]), "bias", "dtype"),
    "ref-dtype-a-map": (ref_of("dct", "coefficients", "dtype", value={}), "dct", "arrays.coefficients.dtype"),
    "ref-offset-2**64-1": (ref_of("dct", "coefficients", "offset", value=2**64 - 1), "dct",
                           "arrays.coefficients.offset"),
    "ref-offset--2**63": (ref_of("dct", "coefficients", "offset", value=-2**63), "dct", "arrays.coefficients.offset"),
    "ref-offset-bool": (ref_of("dct", "coefficients", "offset", value=True), "dct", "arrays.coefficients.offset"),
    "ref-length-float": (ref_of("dct", "coefficients", "length", value=108.0), "dct", "arrays.coefficients.length"),
    "shape-bool-dim": (t("bias", "shape", value=[True]), "bias", "shape"),
    "shape-float-nan": (t("bias", "shape", value=[math.nan]), "bias", "shape"),
    "dct-boundary-2**64-1": (t("dct", "fields", "boundary", value=2**64 - 1), "dct", "boundary"),
    "series-harmonics-huge": (t("series", "fields", "harmonics", value=[2**63 - 1, 2]), "series", "harmonics"),
    # every byte outside the payloads is checked when the file is opened
    "padding-after-header": (header_padding, None, "padding"),
    "padding-between-payloads": (padding_after(("tensors", "bias", "data")), None, "padding"),
    # tensor entry
    "tensor-unknown-key": (t("bias", "extra", value=1), "bias", "extra"),
    "form-unknown": (t("dct", "form", value="dct2"), "dct", "form"),
    "form-not-string": (t("dct", "form", value=3), "dct", "form"),
    "shape-negative": (t("bias", "shape", value=[-3]), "bias", "shape"),
    "shape-rank-9": (t("bias", "shape", value=[1] * 9), "bias", "shape"),
    "shape-huge-count": (t("bias", "shape", value=[1 << 16, 1 << 16]), "bias", "shape"),
    "shape-huge-dim": (t("bias", "shape", value=[(1 << 31) + 1]), "bias", "shape"),
    "shape-not-list": (t("bias", "shape", value="3"), "bias", "shape"),
    "shape-float-dim": (t("bias", "shape", value=[3.0]), "bias", "shape"),
    "dense-shape-mismatch": (t("bias", "shape", value=[4]), "bias", "arrays.data.shape"),
    "dtype-unknown": (t("bias", "dtype", value="float8"), "bias", "dtype"),
    "dtype-dense-mismatch": (t("bias", "dtype", value="int32"), "bias", "dtype"),
    "dtype-compressed-not-float32": (t("dct", "dtype", value="float16"), "dct", "dtype"),
    "digest-short": (t("bias", "digest", value=b"\0" * 31), "bias", "digest"),
    "digest-string": (t("bias", "digest", value="0" * 32), "bias", "digest"),
    "digest-missing": (t("bias", "digest"), "bias", "digest"),
    "fields-not-map": (t("dct", "fields", value=[1]), "dct", "fields"),
    "fields-unknown-dense": (t("bias", "fields", value={"x": 1}), "bias", "fields.x"),
    "fields-unknown-dct": (t("dct", "fields", "scale", value=2), "dct", "fields.scale"),
    "fields-unknown-bidi": (t("dct", "fields", "a\u202eb", value=2), "dct", "fields." + shown("a\u202eb")),
    "arrays-not-map": (t("bias", "arrays", value=[]), "bias", "arrays"),
    "arrays-missing-data": (t("bias", "arrays", "data"), "bias", "arrays.data"),
    "arrays-missing-coefficients": (t("dct", "arrays", "coefficients"), "dct", "arrays.coefficients"),
    "arrays-extra": (extra_array("dct", "coefficients", "extra"), "dct", "arrays.extra"),
    "arrays-extra-newline": (extra_array("dct", "coefficients", "x\ny"), "dct", "arrays." + shown("x\ny")),
    # arrayref
    "ref-not-map": (t("dct", "arrays", "coefficients", value=5), "dct", "arrays.coefficients"),
    "ref-unknown-key": (ref_of("dct", "coefficients", "extra", value=1), "dct", "arrays.coefficients.extra"),
    "ref-dtype-unknown": (ref_of("dct", "coefficients", "dtype", value="float8"), "dct",
                          "arrays.coefficients.dtype"),
    "ref-dtype-wrong-for-form": (ref_of("dct", "coefficients", "dtype", value="int16"), "dct",
                                 "arrays.coefficients.dtype"),
    "ref-shape-negative": (ref_of("dct", "coefficients", "shape", value=[-54]), "dct", "arrays.coefficients.shape"),
    "ref-shape-wrong": (resize("dct", "coefficients", [27, 2]), "dct", "arrays.coefficients.shape"),
    "ref-offset-beyond-file": (ref_of("dct", "coefficients", "offset", value=1 << 30), "dct",
                               "arrays.coefficients.offset"),
    "ref-offset-negative": (ref_of("dct", "coefficients", "offset", value=-64), "dct", "arrays.coefficients.offset"),
    "ref-offset-not-int": (ref_of("dct", "coefficients", "offset", value="640"), "dct",
                           "arrays.coefficients.offset"),
    "ref-offset-overlapping": (move("dct", "coefficients", -64), "dct", "arrays.coefficients.offset"),
    "ref-offset-misaligned": (move("dct", "coefficients", 1), "dct", "arrays.coefficients.offset"),
    "ref-offset-gap": (move("dct", "coefficients", 64), "dct", "arrays.coefficients.offset"),
    "ref-length-wrong": (ref_of("dct", "coefficients", "length", value=107), "dct", "arrays.coefficients.length"),
    "ref-length-beyond-file": (ref_of("dct", "coefficients", "length", value=1 << 30), "dct",
                               "arrays.coefficients.length"),
    "ref-codec-unknown": (ref_of("dct", "coefficients", "codec", value="lz4"), "dct", "arrays.coefficients.codec"),
    "ref-sha256-short": (ref_of("dct", "coefficients", "sha256", value=b"\0" * 31), "dct",
                         "arrays.coefficients.sha256"),
    "ref-sha256-missing": (ref_of("dct", "coefficients", "sha256"), "dct", "arrays.coefficients.sha256"),
    "bank-dtype": (edit("banks", BANK, "dtype", value="float8"), None, f"banks.{BANK}.dtype"),
    "bank-rank-1": (edit("banks", BANK, "shape", value=[36]), None, f"banks.{BANK}.shape"),
    "bank-length": (edit("banks", BANK, "length", value=71), None, f"banks.{BANK}.length"),
    # every bank holds numbers, checked when the file is opened, whether a tensor names it or not
    "unused-bank-float64": (spare_bank("float64", [1, 3, 3]), None, "banks.spare.dtype"),
    "unused-bank-int8-without-step": (spare_bank("int8", [8, 3, 3]), None, "banks.spare.dtype"),
    "unused-bank-rank-1": (spare_bank("float16", [9]), None, "banks.spare.shape"),
    # dct fields
    "dct-axes-descending": (t("dct", "fields", "axes", value=[1, 0]), "dct", "axes"),
    "dct-axes-out-of-range": (t("dct", "fields", "axes", value=[0, 4]), "dct", "axes"),
    "dct-axes-empty": (t("dct", "fields", "axes", value=[]), "dct", "axes"),
    "dct-axes-repeated": (t("dct", "fields", "axes", value=[1, 1]), "dct", "axes"),
    "dct-boundary-negative": (t("dct", "fields", "boundary", value=-1), "dct", "boundary"),
    "dct-boundary-over-size": (t("dct", "fields", "boundary", value=109), "dct", "boundary"),
    "dct-boundary-bool": (t("dct", "fields", "boundary", value=True), "dct", "boundary"),
    "dct-boundary-vs-coefficients": (t("dct", "fields", "boundary", value=53), "dct", "arrays.coefficients.shape"),
    # series fields
    "series-family": (t("series", "fields", "family", value="sine"), "series", "family"),
    "series-harmonics-one": (t("series", "fields", "harmonics", value=[3]), "series", "harmonics"),
    "series-harmonics-zero": (t("series", "fields", "harmonics", value=[0, 2]), "series", "harmonics"),
    "series-harmonics-float": (t("series", "fields", "harmonics", value=[3, 2.0]), "series", "harmonics"),
    "series-harmonics-vs-coefficients": (t("series", "fields", "harmonics", value=[2, 3]), "series",
                                         "arrays.coefficients.shape"),
    "series-points-one": (t("series", "fields", "points", value=["cgl"]), "series", "points"),
    "series-points-unknown-set": (t("series", "fields", "points", value=["gauss", "cgl"]), "series", "points"),
    "series-points-count": (t("series", "fields", "points", value=["cgl", [0.0, 0.5]]), "series", "points"),
    "series-points-out-of-range": (t("series", "fields", "points", value=["cgl", [-0.8, 0.1, 1.5]]), "series",
                                   "points"),
    "series-points-ints": (t("series", "fields", "points", value=["cgl", [-1, 0, 1]]), "series", "points"),
    "series-points-nan": (t("series", "fields", "points", value=["cgl", [-0.8, math.nan, 0.9]]), "series",
                          "points"),
    # basis fields
    "basis-bank-unknown": (t("basis", "fields", "bank", value="nope"), "basis", "bank"),
    "basis-bank-not-string": (t("basis", "fields", "bank", value=4), "basis", "bank"),
    "basis-index-dtype": (ref_of("basis", "index", "dtype", value="int8"), "basis", "arrays.index.dtype"),
    "basis-index-shape": (resize("basis", "index", [13]), "basis", "arrays.index.shape"),
    "basis-a-shape": (resize("basis", "a", [11]), "basis", "arrays.a.shape"),
    "basis-b-dtype": (ref_of("basis", "b", "dtype", value="int16"), "basis", "arrays.b.dtype"),
    "basis-shape-vs-filter": (t("basis", "shape", value=[4, 3, 9, 1]), "basis", "shape"),
    "basis-missing-a": (t("basis", "arrays", "a"), "basis", "arrays.a"),
    # linear fields
    "linear-primaries-shape": (resize("linear", "primaries", [4, 3, 3, 2]), "linear", "arrays.primaries.shape"),
    "linear-primaries-too-many": (resize("linear", "primaries", [9, 3, 3, 3]), "linear", "arrays.primaries.shape"),
    "linear-primaries-dtype": (ref_of("linear", "primaries", "dtype", value="int16"), "linear",
                               "arrays.primaries.dtype"),
    "linear-A-shape": (resize("linear", "A", [4, 3]), "linear", "arrays.A.shape"),
    "linear-A-dtype": (ref_of("linear", "A", "dtype", value="int16"), "linear", "arrays.A.dtype"),
    # A beside A1 or A2: the first of A1, A2 present is named (whatever the header's order)
    "linear-A-and-A1": (extra_array("linear", "A", "A1"), "linear", "arrays.A1"),
    "linear-A-and-A2": (extra_array("linear", "A", "A2"), "linear", "arrays.A2"),
    "linear-A-A2-and-A1": (extra_array("linear", "A", "A2", "A1"), "linear", "arrays.A1"),
    "linear-no-coefficients": (t("linear", "arrays", "A"), "linear", "arrays.A1"),
    "linear-A1-shape": (resize("lowrank", "A1", [3, 2]), "lowrank", "arrays.A1.shape"),
    "linear-A2-shape": (resize("lowrank", "A2", [2, 5]), "lowrank", "arrays.A2.shape"),
    "linear-A2-missing": (t("lowrank", "arrays", "A2"), "lowrank", "arrays.A2"),
    "linear-order-dtype": (resize("linear", "order", [8], dtype="float32"), "linear", "arrays.order.dtype"),
    "linear-order-shape": (resize("linear", "order", [7], dtype="int32"), "linear", "arrays.order.shape"),
    # every field a form defines is required: a missing one is named by its key, as a bad value is
    **{f"{form}-{key}-missing": (t(form, "fields", key), form, key)
       for form in ("dct", "series", "basis") for key in sorted(FORMS[form].FIELDS)},
}

ZEROS = ("tensors", "zeros", "data")
# (case, tensor, field) for errors in payloads: open succeeds, decoding the tensor refuses.
PAYLOAD_CASES = {
    "payload-byte-flipped": (payload_byte(("tensors", "dct", "coefficients")), "dct", "arrays.coefficients"),
    "payload-sha256-wrong": (ref_of("dct", "coefficients", "sha256", value=ZERO_SHA), "dct", "arrays.coefficients"),
    "bank-payload-byte-flipped": (payload_byte(("banks", BANK)), "basis", f"banks.{BANK}"),
    "zstd-content-size-lie": (body(ZEROS, lambda b: zstandard.ZstdCompressor().compress(bytes(16380))),
                              "zeros", "arrays.data"),
    "zstd-inflates-too-far": (body(ZEROS, lambda b: zstandard.ZstdCompressor(write_content_size=False).compress(
        bytes(16388))), "zeros", "arrays.data"),
    "zstd-garbage": (body(ZEROS, lambda b: b[:4] + b"\xff" * 20), "zeros", "arrays.data"),
    "codec-says-zstd": (ref_of("bias", "data", "codec", value="zstd"), "bias", "arrays.data"),
    "dct-nan": (values(("tensors", "dct", "coefficients"), float16_bits(0x7E00)), "dct", "arrays.coefficients"),
    "dct-inf": (values(("tensors", "dct", "coefficients"), float16_bits(0xFC00)), "dct", "arrays.coefficients"),
    "series-nan": (values(("tensors", "series", "coefficients"), float16_bits(0x7C01)), "series",
                   "arrays.coefficients"),
    "basis-a-nan": (values(("tensors", "basis", "a"), float16_bits(0x7E00)), "basis", "arrays.a"),
    "basis-b-inf": (values(("tensors", "basis", "b"), float16_bits(0x7C00)), "basis", "arrays.b"),
    "basis-bank-nan": (values(("banks", BANK), float16_bits(0x7E00)), "basis", f"banks.{BANK}"),
    "basis-index-out-of-range": (values(("tensors", "basis", "index"), setter(3, 4)), "basis", "arrays.index"),
    "linear-primaries-nan": (values(("tensors", "linear", "primaries"), float16_bits(0x7E00)), "linear",
                             "arrays.primaries"),
    "linear-A-inf": (values(("tensors", "linear", "A"), float16_bits(0x7C00)), "linear", "arrays.A"),
    "linear-A2-nan": (values(("tensors", "lowrank", "A2"), float16_bits(0x7E00)), "lowrank", "arrays.A2"),
    "order-repeated": (values(("tensors", "linear", "order"), setter(1, 0)), "linear", "arrays.order"),
    "order-negative": (values(("tensors", "linear", "order"), setter(0, -1)), "linear", "arrays.order"),
    "order-too-large": (values(("tensors", "linear", "order"), setter(0, 8)), "linear", "arrays.order"),
    "bool-byte-2": (values(("tensors", "flags", "data"), raw_byte(1, 2)), "flags", "arrays.data"),
}


def corrupt(base: Path, folder: Path, case: Case) -> Path:
    path = folder / "bad.kpk"
    case(RawFile.read(base), path)
    return path


@pytest.mark.parametrize("case, tensor, field", HEADER_CASES.values(), ids=HEADER_CASES.keys())
def test_open_refuses_a_bad_header(base: Path, tmp_path: Path, case: Case, tensor: str | None, field: str) -> None:
    path = corrupt(base, tmp_path, case)
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.open(path)
    check_error(caught, path, tensor, field)


@pytest.mark.parametrize("case, tensor, field", PAYLOAD_CASES.values(), ids=PAYLOAD_CASES.keys())
def test_decoding_refuses_a_bad_payload(base: Path, tmp_path: Path, case: Case, tensor: str, field: str) -> None:
    path = corrupt(base, tmp_path, case)
    with kernelpack.open(path) as c:
        c.get_numpy("big")  # the other tensors stay readable
        with pytest.raises(kernelpack.KernelpackError) as caught:
            c.get_numpy(tensor)
        check_error(caught, path, tensor, field)
    for load in (kernelpack.load_numpy, kernelpack.load):
        with pytest.raises(kernelpack.KernelpackError) as caught:
            load(path)
        check_error(caught, path, tensor, field)


def test_a_wrong_digest_is_reported_by_verify(base: Path, tmp_path: Path) -> None:
    path = corrupt(base, tmp_path, t("dct", "digest", value=ZERO_SHA))
    with kernelpack.open(path) as c:
        assert c.verify() == {name: name != "dct" for name in c}


def test_a_missing_file_is_a_kernelpack_error(tmp_path: Path) -> None:
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.open(tmp_path / "absent.kpk")
    assert caught.value.path == str(tmp_path / "absent.kpk")


def test_the_base_file_is_valid(base: Path, tmp_path: Path) -> None:
    """The cases above fail for their one change, not for the re-layout."""
    path = corrupt(base, tmp_path, lambda raw, p: raw.write(p))
    assert path.read_bytes() == base.read_bytes()
    path = corrupt(base, tmp_path, body(("tensors", "bias", "data"), lambda b: b))
    with kernelpack.open(path) as c:
        assert all(c.verify().values())


def test_the_names_real_models_use_are_accepted(tmp_path: Path) -> None:
    """PyTorch's dotted names, ONNX's slashes and colons, any Unicode (even code points this
    Python does not know yet): names are keys, and only what could be misread is refused."""
    names = ["conv1.weight", "/features/0/Conv_output_0", "onnx::Conv_12", "layer..weight", "a b",
             "Größe ✓", "\U000e0001\U0010fffd", "..hidden", "x" * 1024]
    path = tmp_path / "names.kpk"
    kernelpack.save({n: np.ones(1, np.float32) for n in names}, path, attachments={n: b"x" for n in names})
    with kernelpack.open(path) as c:
        assert c.keys() == names and sorted(c.attachments()) == sorted(names)


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_opening_what_is_not_a_regular_file_is_refused_without_waiting(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "thing.kpk"
    if kind == "folder":
        path.mkdir()
    else:
        os.mkfifo(path)  # opening a FIFO for reading would wait for a writer
    with pytest.raises(kernelpack.KernelpackError, match="not a regular file") as caught:
        kernelpack.open(path)
    assert caught.value.path == str(path)


# --- memory: hostile sizes are refused before anything is allocated ------------------------
def one_tensor(tmp_path: Path, value: Any, config: Any = None, change: Case | None = None,
               attachments: dict[str, bytes] | None = None) -> Path:
    path = tmp_path / "big.kpk"
    kernelpack.save({"t": value}, path, forms={"t": config} if config else None, attachments=attachments)
    if change is not None:
        change(RawFile.read(path), path)
    return path


def zstd_bomb(raw: RawFile, path: Path) -> None:
    """Tensor ``t`` declared as 8 MiB of uint8, stored as an 8 MiB zstd frame of 1 KiB."""
    key = ("tensors", "t", "data")
    raw.header["tensors"]["t"]["shape"] = raw.ref(*key)["shape"] = [8 << 20]
    raw.replace_payload(key, zstandard.ZstdCompressor(level=19).compress(bytes(8 << 20)), codec="zstd")
    raw.write(path)


def declared(shape: list[int], boundary: int) -> Case:
    """The dct tensor ``t`` with another shape and boundary (one float16 coefficient)."""
    def make(raw: RawFile, path: Path) -> None:
        entry = raw.header["tensors"]["t"]
        entry["shape"], entry["fields"]["boundary"] = shape, boundary
        raw.write(path)
    return make


MiB = 1 << 20
# name -> (file maker, limit it is refused under, the largest array (elements) its decode builds)
HUGE = {
    "dense-zstd-bomb": (lambda p: one_tensor(p, np.zeros(16, np.uint8), change=zstd_bomb), 4 * MiB, 8 * MiB),
    "dct-huge-shape": (lambda p: one_tensor(p, random_array(0, (2, 2)), kernelpack.DCT(boundary=1),
                                            declared([2048, 2048], 1)), 4 * MiB, 4 * MiB),
    "dct-positions": (lambda p: one_tensor(p, random_array(0, (4,) * 8), kernelpack.DCT(keep=1.0)),
                      MiB, 8 * 4**8),  # 8 indices per kept coefficient
    "series-first-stage": (lambda p: one_tensor(p, SeriesTensor((1, 2048, 1), "cosine", ("cgl", "cgl"),
                                                              to_stored(np.full((1, 1, 4096), 0.001), "float16"))),
                           4 * MiB, 2048 * 4096),  # S x Ny x kh, from 4096 stored numbers
    "linear-low-rank-product": (lambda p: one_tensor(p, LinearTensor(
        (2048, 1), to_stored(np.ones((1024, 1)), "float16"),
        (to_stored(np.ones((1024, 1)), "float16"), to_stored(np.ones((1, 1024)), "float16")))),
        4 * MiB, 1024 * 1024),  # A = A1 A2, p x s, from 3 x 1024 stored numbers
}


def test_a_bank_over_the_memory_limit_is_refused_when_read(tmp_path: Path) -> None:
    """A basis decode widens only the filters its slices choose, never the whole bank; the bank
    itself is one stored array, refused by the payload check when it is over the limit."""
    bank = np.random.default_rng(0).standard_normal((4096, 3, 3))
    path = one_tensor(tmp_path, random_array(0, (1, 3, 3)), kernelpack.Basis(bank=bank))
    with kernelpack.open(path, limits=kernelpack.Limits(max_decoded_bytes=64 << 10)) as c:
        with pytest.raises(kernelpack.KernelpackError, match="max_decoded_bytes") as caught:
            c.get_numpy("t")
    assert caught.value.field.startswith("banks.")


@pytest.mark.parametrize("make, limit, peak", HUGE.values(), ids=HUGE.keys())
def test_a_decode_over_the_memory_limit_is_refused_before_it_allocates(tmp_path: Path, make: Callable, limit: int,
                                                                       peak: int) -> None:
    path = make(tmp_path)
    tracemalloc.start()
    try:
        with kernelpack.open(path, limits=kernelpack.Limits(max_decoded_bytes=limit)) as c:
            assert c.info("t")  # the header is fine: only decoding would need too much
            with pytest.raises(kernelpack.KernelpackError, match="max_decoded_bytes") as caught:
                c.get_numpy("t")
        allocated = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    check_error(caught, path, "t", "shape")
    assert str(8 * peak) in str(caught.value)
    assert allocated < limit / 4, f"{allocated} bytes allocated before refusing"
    with pytest.raises(kernelpack.KernelpackError, match="max_decoded_bytes"):
        kernelpack.load_numpy(path, limits=kernelpack.Limits(max_decoded_bytes=limit))


@pytest.mark.parametrize("make, limit, peak", HUGE.values(), ids=HUGE.keys())
def test_a_decode_holds_no_array_much_beyond_its_declared_peak(tmp_path: Path, make: Callable, limit: int,
                                                               peak: int) -> None:
    """Under the default limits these files decode; the memory the decode takes (numpy,
    traced) stays within a few times the largest array it declared, so the limit means
    what it says. A form whose decode grows an array it does not declare fails here."""
    path = make(tmp_path)
    with kernelpack.open(path) as c:
        c.get_numpy("t")  # tables cached, lazy imports done
        tracemalloc.start()
        try:
            c.get_numpy("t")
            allocated = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert allocated <= 8 * (8 * peak) + MiB, \
        f"{allocated / MiB:.1f} MiB for a declared peak of {8 * peak / MiB:.1f} MiB"


def test_the_default_limit_refuses_a_tensor_of_2_to_the_31_elements(tmp_path: Path) -> None:
    """A file of a few kilobytes may not make a service decode 16 GiB (a zstd bomb of 2^31 bytes)."""
    def bomb(raw: RawFile, path: Path) -> None:
        raw.header["tensors"]["t"]["shape"] = raw.ref("tensors", "t", "data")["shape"] = [1 << 31]
        frame = zstandard.ZstdCompressor(level=3).compress(bytes(1 << 24))  # declares 2^24; never read
        raw.replace_payload(("tensors", "t", "data"), frame, codec="zstd")
        raw.write(path)

    path = one_tensor(tmp_path, np.zeros(16, np.uint8), change=bomb)
    assert kernelpack.Limits().max_decoded_bytes == 1 << 30
    with pytest.raises(kernelpack.KernelpackError, match="max_decoded_bytes") as caught:
        kernelpack.load_numpy(path)
    check_error(caught, path, "t", "shape")


def test_an_attachment_over_the_limit_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    path = one_tensor(tmp_path, np.ones(3, np.float32), attachments={"g": bytes(8 * MiB)})
    limits = kernelpack.Limits(max_decoded_bytes=4 * MiB)
    with kernelpack.open(path, limits=limits) as c:
        with pytest.raises(kernelpack.KernelpackError, match="max_decoded_bytes") as caught:
            c.read_attachment("g")
    check_error(caught, path, None, "attachments.g")
    with pytest.raises(kernelpack.KernelpackError, match="max_decoded_bytes"):
        kernelpack.load_numpy(path, limits=limits)
    assert kernelpack.open(path).read_attachment("g") == bytes(8 * MiB)


def test_a_header_over_the_callers_limit_is_refused_before_it_is_read(base: Path) -> None:
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.open(base, limits=kernelpack.Limits(max_header_bytes=1024))
    check_error(caught, base, None, "header_length")


@pytest.mark.parametrize("settings", [{"max_decoded_bytes": -1}, {"max_header_bytes": 1.5},
                                      {"max_decoded_bytes": True}])
def test_limits_must_be_counts_of_bytes(settings: dict[str, Any]) -> None:
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.Limits(**settings)
    assert caught.value.field == "limits." + next(iter(settings))


# --- the encoder side: bad settings name the tensor ----------------------------------------
KERNEL = random_array(0, (4, 3, 3, 3))
ENCODER_CASES = {
    "series-on-bias": ({"bias": random_array(1, (8,))}, {"bias": kernelpack.Series()}, "bias", "shape"),
    "dct-keep": ({"w": KERNEL}, {"w": kernelpack.DCT(keep=1.5)}, "w", "keep"),
    "dct-boundary": ({"w": KERNEL}, {"w": kernelpack.DCT(boundary=109)}, "w", "boundary"),
    "dct-axes": ({"w": KERNEL}, {"w": kernelpack.DCT(axes=(0, 4))}, "w", "axes"),
    "dct-dtype": ({"w": KERNEL}, {"w": kernelpack.DCT(dtype="float64")}, "w", "dtype"),
    "series-family": ({"w": KERNEL}, {"w": kernelpack.Series(family="sine")}, "w", "family"),
    "series-harmonics": ({"w": KERNEL}, {"w": kernelpack.Series(harmonics=0)}, "w", "harmonics"),
    "series-points-name": ({"w": KERNEL}, {"w": kernelpack.Series(points="gauss")}, "w", "points"),
    "series-points-count": ({"w": KERNEL}, {"w": kernelpack.Series(points=([0.0, 1.0], "cgl"))}, "w", "points"),
    "series-points-range": ({"w": KERNEL}, {"w": kernelpack.Series(points=([-1.0, 0.0, 2.0], "cgl"))}, "w",
                            "points"),
    "basis-bank-size": ({"w": KERNEL}, {"w": kernelpack.Basis(bank=0)}, "w", "bank"),
    "basis-bank-too-large": ({"w": KERNEL}, {"w": kernelpack.Basis(bank=np.ones((70000, 3, 3)))}, "w", "bank"),
    "basis-filter-shape": ({"w": KERNEL}, {"w": kernelpack.Basis(bank=np.ones((2, 5, 5)))}, "w", "shape"),
    "linear-no-primaries": ({"w": KERNEL}, {"w": kernelpack.Linear(primaries=0)}, "w", "primaries"),
    "linear-too-many-primaries": ({"w": KERNEL}, {"w": kernelpack.Linear(primaries=5)}, "w", "primaries"),
    "linear-rank": ({"w": KERNEL}, {"w": kernelpack.Linear(primaries=2, rank=0)}, "w", "rank"),
    "dense-narrowing-int": ({"n": np.arange(4, dtype=np.int32)}, {"n": kernelpack.Dense(dtype="float16")}, "n",
                            "dtype"),
    "compressed-int": ({"n": np.arange(36, dtype=np.int32).reshape(4, 9)}, {"n": kernelpack.DCT()}, "n", "dtype"),
    "unsupported-dtype": ({"c": np.ones(3, np.complex64)}, None, "c", "dtype"),
    "float16-overflow": ({"w": np.full((20, 20), 4096, np.float32)}, {"w": kernelpack.DCT(keep=0.1)}, "w",
                         "dtype"),
    "name-empty": ({"": KERNEL}, None, "", "name"),
}


@pytest.mark.parametrize("tensors, forms, tensor, field", ENCODER_CASES.values(), ids=ENCODER_CASES.keys())
def test_save_refuses_bad_settings_and_writes_nothing(tmp_path: Path, tensors: dict, forms: Any, tensor: str,
                                                      field: str) -> None:
    path = tmp_path / "out.kpk"
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.save(tensors, path, forms=forms)
    error = caught.value
    assert (error.tensor, error.field) == (tensor, field), str(error)
    assert f"tensor '{tensor}'" in str(error) and field in str(error)
    assert error.path in (None, str(path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config", [kernelpack.DCT(), kernelpack.Series(), kernelpack.Basis(bank=2),
                                    kernelpack.Linear()], ids=lambda c: type(c).__name__)
def test_save_refuses_non_finite_input(tmp_path: Path, config: Any) -> None:
    array = KERNEL.copy()
    array[1, 2, 0, 1] = np.nan
    with pytest.raises(kernelpack.KernelpackError, match="NaN") as caught:
        kernelpack.save({"w": array}, tmp_path / "out.kpk", forms={"w": config})
    assert caught.value.tensor == "w" and "tensor 'w'" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_two_banks_with_one_name(tmp_path: Path) -> None:
    forms = {"a": kernelpack.Basis(bank=np.eye(3)[:2].reshape(2, 3, 1), bank_name="shared"),
             "b": kernelpack.Basis(bank=np.eye(3)[1:].reshape(2, 3, 1), bank_name="shared")}
    tensors = {"a": random_array(2, (4, 3, 1)), "b": random_array(3, (4, 3, 1))}
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.save(tensors, tmp_path / "out.kpk", forms=forms)
    assert (caught.value.path, caught.value.tensor, caught.value.field) == (str(tmp_path / "out.kpk"), "b", "bank")


def test_save_refuses_non_string_metadata(tmp_path: Path) -> None:
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.save({"w": KERNEL}, tmp_path / "out.kpk", metadata={"epochs": 30})
    assert (caught.value.field, caught.value.path) == ("metadata", str(tmp_path / "out.kpk"))
