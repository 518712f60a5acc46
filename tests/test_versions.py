"""Versions: files of older minor versions load; the keys a newer minor version adds are
ignored as spec/FORMAT.md section 4 says; another major version is refused, naming the
version it needs. The corpus in spec/vectors/versions is read as committed, in every run,
so a later kernelpack keeps reading the files of every earlier version."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import kernelpack
from conftest import RawFile, random_array
from kernelpack._backend import get_ops
from kernelpack.layout import digest
from kernelpack.reader import Container

CORPUS = Path(__file__).parent.parent / "spec" / "vectors" / "versions"
MANIFEST: dict[str, Any] = json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))["files"]
LOADED = sorted(n for n, e in MANIFEST.items() if e["expect"] == "load")
REFUSED = sorted(n for n, e in MANIFEST.items() if e["expect"] == "refuse")


def test_every_corpus_file_is_in_the_manifest() -> None:
    assert sorted(os.listdir(CORPUS)) == sorted([*MANIFEST, "README.md", "generate.py", "manifest.json"])


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_a_corpus_file_is_the_committed_one(name: str) -> None:
    """The files are never regenerated: a changed byte is a changed history."""
    blob = (CORPUS / name).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == MANIFEST[name]["sha256"]
    assert [int.from_bytes(blob[8:10], "little"), int.from_bytes(blob[10:12], "little")] == MANIFEST[name]["version"]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", LOADED)
def test_a_readable_version_decodes_to_its_recorded_digests(name: str, backend: str) -> None:
    entry = MANIFEST[name]
    failing = entry.get("decode_errors", {})
    ops = get_ops(backend)
    with kernelpack.open(CORPUS / name) as c:
        assert list(c.version) == entry["version"]
        assert sorted(c.keys()) == sorted([*entry["tensors"], *failing])
        for tensor, expected in entry["tensors"].items():
            value = ops.to_numpy(c.decode(tensor, ops))
            assert list(value.shape) == expected["shape"], tensor
            assert digest(value, expected["dtype"]).hex() == expected["sha256"], tensor
        assert {a: hashlib.sha256(c.read_attachment(a)).hexdigest() for a in c.attachments()} == entry["attachments"]
        for tensor, error in failing.items():
            with pytest.raises(kernelpack.KernelpackError, match=error["message"]) as caught:
                c.decode(tensor, ops)
            assert (caught.value.tensor, caught.value.field) == (tensor, error["field"])


@pytest.mark.parametrize("name", REFUSED)
def test_a_version_this_reader_cannot_read_is_refused_with_the_reason(name: str) -> None:
    entry = MANIFEST[name]
    path = CORPUS / name
    for read in (kernelpack.open, kernelpack.load_numpy, kernelpack.load):
        with pytest.raises(kernelpack.KernelpackError, match=entry["message"]) as caught:
            read(path)
        assert (caught.value.path, caught.value.tensor, caught.value.field) == (str(path), entry["tensor"],
                                                                                entry["field"])


def test_the_corpus_covers_every_version_rule() -> None:
    """Older minor, current minor, newer minor (ignored keys, refused codec/dtype/array), other majors."""
    versions = {tuple(e["version"]) for e in MANIFEST.values()}
    assert {(1, 0), kernelpack.FORMAT_VERSION} <= versions
    assert any(v[0] == 1 and v[1] > kernelpack.FORMAT_VERSION[1] for v in versions)
    assert {v[0] for v in versions} >= {0, 1, 2}
    assert {e.get("field") for e in MANIFEST.values()} >= {"version", "attachments", "arrays.coefficients.codec",
                                                           "arrays.data.dtype", "arrays.residual",
                                                           "banks.bank0.step", "arrays.data.codec"}


# --- the same rules on files made now ------------------------------------------------------
@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.kpk"
    tensors = {"bias": random_array(0, (8,)), "dct": random_array(1, (8, 4, 3, 3)),
               "linear": random_array(4, (8, 4, 3, 3))}
    kernelpack.save(tensors, path, forms={"dct": kernelpack.DCT(), "linear": kernelpack.Linear()}, compact=False)
    return path


def test_newer_minor_version_unknown_keys_are_ignored_and_unknown_forms_fail_alone(mixed: Path) -> None:
    raw = RawFile.read(mixed)
    raw.minor = kernelpack.FORMAT_VERSION[1] + 1
    raw.header["future"] = {"anything": 1}
    raw.header["tensors"]["dct"]["quantiser"] = "new"
    raw.header["tensors"]["dct"]["arrays"]["coefficients"]["checksum2"] = b"x"
    raw.header["tensors"]["linear"]["form"] = "hyperlinear"
    raw.write(mixed)
    with kernelpack.open(mixed) as c:
        assert c.version == (1, kernelpack.FORMAT_VERSION[1] + 1)
        assert c.get_numpy("dct").shape == (8, 4, 3, 3)
        with pytest.raises(kernelpack.KernelpackError) as caught:
            c.get_numpy("linear")
    assert (caught.value.tensor, caught.value.field) == ("linear", "form")


@pytest.mark.parametrize("minor", [0, kernelpack.FORMAT_VERSION[1]])
def test_unknown_keys_in_a_file_of_this_or_an_older_minor_version_are_errors(mixed: Path, minor: int) -> None:
    raw = RawFile.read(mixed)
    raw.minor = minor
    raw.header["tensors"]["dct"]["fields"]["window"] = "hann"
    raw.write(mixed)
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.open(mixed)
    assert (caught.value.tensor, caught.value.field) == ("dct", "fields.window")


def test_attachments_in_a_version_1_0_file_are_an_unknown_field(tmp_path: Path) -> None:
    path = tmp_path / "att.kpk"
    kernelpack.save({"w": random_array(0, (4, 3))}, path, attachments={"onnx.graph": b"graph"}, compact=False)
    raw = RawFile.read(path)
    raw.minor = 0
    raw.write(path)
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.open(path)
    assert caught.value.field == "attachments"


def test_the_writer_writes_the_lowest_version_that_holds_the_file(tmp_path: Path) -> None:
    """So a reader of an older minor version reads every file that needs nothing newer."""
    w = {"w": np.ones(3, np.float32)}
    plain = {"compact": False}
    kernelpack.save(w, tmp_path / "plain.kpk", **plain)
    kernelpack.save(w, tmp_path / "att.kpk", attachments={"g": b"graph"}, **plain)
    kernelpack.save(w, tmp_path / "quantised.kpk", forms=kernelpack.Dense(step=0.5), **plain)
    kernelpack.save({"w": np.arange(4096, dtype=np.float32)}, tmp_path / "shuffled.kpk", **plain)  # zstd-shuffle
    rng = np.random.default_rng(0)
    large = {f"layer{i}.weight": rng.integers(0, 256, 4096, dtype=np.uint8) for i in range(40)}
    kernelpack.save(large, tmp_path / "compact.kpk")  # no payload is small; the header is shortest against
    # the header dictionary: 1.6 (stored_header's own test shows 1.4 where the dictionary does not help)
    many = {f"layer{i}.weight": np.full(3, i, np.float32) for i in range(40)}
    kernelpack.save(many, tmp_path / "grouped.kpk")  # small payloads share hash groups: 1.6
    kernelpack.save({}, tmp_path / "tiny.kpk")  # no tensor: a frame of its header would be no smaller
    for name, version in (("plain.kpk", (1, 0)), ("att.kpk", (1, 1)), ("quantised.kpk", (1, 2)),
                          ("shuffled.kpk", (1, 2)), ("compact.kpk", (1, 6)), ("grouped.kpk", (1, 6)),
                          ("tiny.kpk", (1, 0))):
        with Container(tmp_path / name) as c:
            assert c.version == version, name


def test_a_compressed_header_needs_1_6_only_when_the_dictionary_makes_it_shorter() -> None:
    """stored_header keeps the lowest version that makes the file smallest: a plain frame (1.4)
    where the header dictionary does not help, a frame against it (1.6) where it saves a
    64-byte block, msgpack itself where no frame does."""
    from kernelpack.writer import stored_header

    unlike_a_header = b"abcd" * 4096
    frame, minor = stored_header(unlike_a_header, 0)
    assert minor == 4 and len(frame) < 64
    data = {"dtype": "int8", "shape": [8, 3, 3, 3], "codec": "zstd", "length": 100, "step": 0.25, "offset": 0}
    header = msgpack.packb({"metadata": {}, "banks": {}, "tensors": {
        f"layer{i}.weight": {"form": "dense", "shape": [8, 3, 3, 3], "dtype": "float32", "digest": bytes(range(i, i + 32)),
                             "fields": {}, "arrays": {"data": data}} for i in range(3)}})
    frame, minor = stored_header(header, 2)
    assert minor == 6 and len(frame) + 64 <= len(header)
    assert stored_header(b"\x80", 3) == (b"\x80", 3)


def with_unknown_payload(path: Path, body: bytes, first: bool) -> None:
    """The file as a newer minor version might write it: a top-level key this reader does not
    know owning one payload, laid out before (``first``) or after every payload it knows."""
    raw = RawFile.read(path)
    raw.minor = 0xFFFF
    ref = {"dtype": "uint8", "shape": [len(body)], "codec": "none", "length": len(body),
           "sha256": hashlib.sha256(body).digest(), "offset": 0}
    if body and first:
        gap = -(-len(body) // 64) * 64
        for _, known in raw.refs():
            known["offset"] += gap
        raw.data = body + bytes(gap - len(body)) + raw.data
    elif body:
        ref["offset"] = -(-len(raw.data) // 64) * 64
        raw.data += bytes(ref["offset"] - len(raw.data)) + body
    raw.header["sidecar"] = {"blob": ref}
    raw.write(path)


@pytest.mark.parametrize("first, tensor, field", [(True, "bias", "arrays.data.offset"), (False, None, "size")],
                         ids=["before", "after"])
def test_payloads_under_a_key_this_reader_does_not_know_make_it_refuse_the_file(
        mixed: Path, first: bool, tensor: str | None, field: str) -> None:
    """Unknown keys of a newer minor version are ignored, their payload bytes are not: the
    payloads this reader knows no longer tile the data area, so it refuses the file rather
    than read part of it."""
    with_unknown_payload(mixed, b"future bytes", first)
    for read in (kernelpack.open, kernelpack.load_numpy):
        with pytest.raises(kernelpack.KernelpackError, match="newer minor version") as caught:
            read(mixed)
        assert (caught.value.tensor, caught.value.field) == (tensor, field)


def test_a_zero_length_payload_under_a_key_this_reader_does_not_know_changes_nothing(mixed: Path) -> None:
    before = kernelpack.load_numpy(mixed)
    with_unknown_payload(mixed, b"", first=True)
    after = kernelpack.load_numpy(mixed)
    assert all(np.array_equal(before[name], after[name]) for name in before) and list(after) == list(before)
