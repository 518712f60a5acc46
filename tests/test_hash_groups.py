"""Hash groups (format 1.6, spec/FORMAT.md section 2.4): runs of small payloads share one
SHA-256 over their byte range; the header SHA-256 still authenticates every byte."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from conftest import RawFile, random_array

import kernelpack
from kernelpack import reader
from kernelpack.layout import MAX_GROUP
from kernelpack.reader import Container
from kernelpack.writer import GROUP_PAYLOAD, GROUP_SPAN


def model() -> dict[str, np.ndarray]:
    """Small tensors (biases, small kernels), two large ones between them, an empty one."""
    tensors: dict[str, np.ndarray] = {}
    for i in range(12):
        tensors[f"block{i}.weight"] = random_array(i, (8, 4, 3, 3))  # 1152 raw bytes, zstd a little less
        tensors[f"block{i}.bias"] = random_array(100 + i, (8,))
        if i in (4, 8):
            tensors[f"wide{i}.weight"] = random_array(200 + i, (64, 64))  # 16 KiB: its own hash
    tensors["empty"] = np.zeros((0, 3), np.float32)
    return tensors


@pytest.fixture()
def grouped(tmp_path: Path) -> Path:
    path = tmp_path / "grouped.kpk"
    kernelpack.save(model(), path)
    return path


def refs(raw: RawFile) -> list[tuple[tuple[str, ...], dict]]:
    return raw.refs()


def test_the_writer_groups_runs_of_small_payloads_and_nothing_else(grouped: Path) -> None:
    raw = RawFile.read(grouped, ungroup=False)
    groups = raw.header["groups"]
    assert raw.minor == 6 and len(groups) == 3  # the two wide tensors split the runs
    for key, ref in raw.refs():
        inside = [g for g in groups if g["offset"] <= ref["offset"] < g["offset"] + g["length"]]
        if ref["length"] >= GROUP_PAYLOAD or ref["length"] == 0:
            assert "sha256" in ref and not (inside and ref["length"]), key
        else:
            assert "sha256" not in ref and len(inside) == 1, key
            group = inside[0]
            assert ref["offset"] + ref["length"] <= group["offset"] + group["length"]
    end = 0
    for group in groups:
        assert group["offset"] >= end and 0 < group["length"] <= GROUP_SPAN
        body = raw.data[group["offset"]:group["offset"] + group["length"]]
        assert hashlib.sha256(body).digest() == group["sha256"]
        end = group["offset"] + group["length"]


def test_a_grouped_file_decodes_like_a_plain_one_with_a_smaller_header(grouped: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.kpk"
    kernelpack.save(model(), plain, compact=False)
    a, b = kernelpack.load_numpy(grouped), kernelpack.load_numpy(plain)
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
    with Container(grouped) as c:
        assert all(c.verify().values())
    ungrouped = tmp_path / "ungrouped.kpk"
    RawFile.read(grouped).write(ungrouped)  # the same file with a hash per payload
    # 24 grouped payloads in 3 groups; the biases' own hashes (raw float32) equal their tensors'
    # digests, which zstd stores once, so the 12 weights' hashes are what the groups save
    header = [int.from_bytes(p.read_bytes()[12:16], "little") for p in (grouped, ungrouped)]
    assert header[0] < header[1] - (12 - 3) * 32 + 32 and grouped.stat().st_size < ungrouped.stat().st_size


@pytest.mark.parametrize("preload", [True, False], ids=["preloaded", "read per group"])
def test_one_tensor_reads_and_checks_only_its_group(grouped: Path, preload: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[tuple[int, int]] = []
    original = Container._read

    def spy(self: Container, length: int, offset: int) -> Any:
        reads.append((offset, length))
        return original(self, length, offset)

    monkeypatch.setattr(Container, "_read", spy)
    with Container(grouped, preload=preload) as c:
        reads.clear()
        c.get_numpy("block0.bias")
        c.get_numpy("block1.bias")  # the same group: checked once, not read again
        assert len(reads) == 1 and reads[0][1] == c._groups[0][1] <= GROUP_SPAN


def test_the_group_cache_stays_within_its_bound(grouped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "GROUP_CACHE", 1)
    expected = kernelpack.load_numpy(grouped)
    with Container(grouped, preload=False) as c:
        for name in list(c.keys()) * 2:
            assert np.array_equal(c.get_numpy(name), expected[name])
            assert len(c._group_cache) <= 1


def flip_in_group(path: Path, group: int) -> None:
    raw = RawFile.read(path, ungroup=False)
    start = raw.header["groups"][group]["offset"] + 5
    data = bytearray(path.read_bytes())
    data[len(data) - len(raw.data) + start] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_changed_byte_fails_every_tensor_of_its_group_and_no_other(grouped: Path) -> None:
    raw = RawFile.read(grouped, ungroup=False)
    first = raw.header["groups"][0]
    members = {key[1] for key, ref in raw.refs() if "sha256" not in ref
               and first["offset"] <= ref["offset"] < first["offset"] + first["length"]}
    flip_in_group(grouped, 0)
    with Container(grouped) as c:
        report = c.integrity()
    failed = {name for name, ok in report.tensors.items() if ok is not True}
    assert failed == members and len(members) >= 2
    for name in failed:
        error = report.tensors[name]
        assert isinstance(error, kernelpack.KernelpackError) and "groups[0]" in str(error)
        assert error.tensor == name and error.field.startswith("arrays.") and "checksum mismatch" in str(error)
    with pytest.raises(kernelpack.KernelpackError, match="checksum mismatch"):
        kernelpack.load_numpy(grouped)


def test_a_group_is_read_whole_within_the_formats_bound_whatever_the_limits(grouped: Path) -> None:
    """A group is at most MAX_GROUP bytes (1 MiB), so its read needs no limit of its own; each
    payload in it still meets max_decoded_bytes."""
    with Container(grouped, limits=kernelpack.Limits(max_decoded_bytes=2048)) as c:
        assert c._groups[0][1] > 2048
        assert np.array_equal(c.get_numpy("block0.bias"), model()["block0.bias"])
        with pytest.raises(kernelpack.KernelpackError, match="max_decoded_bytes") as caught:
            c.get_numpy("block0.weight")  # 288 elements: 8 bytes each, over 2048
    assert caught.value.tensor == "block0.weight"


def edit_groups(change: Callable[[RawFile], None]) -> Callable[[Path, Path], Path]:
    def make(path: Path, out: Path) -> Path:
        raw = RawFile.read(path, ungroup=False)
        change(raw)
        raw.write(out)
        return out
    return make


def set_group(i: int, key: str, value: Any) -> Callable[[RawFile], None]:
    return lambda raw: raw.header["groups"][i].__setitem__(key, value)


def own_range(raw: RawFile, tensor: str) -> dict:
    """A group entry over one payload that has its own sha256 (so the group holds no member)."""
    ref = raw.ref("tensors", tensor, "data")
    body = raw.payload("tensors", tensor, "data")
    return {"offset": ref["offset"], "length": ref["length"], "sha256": hashlib.sha256(body).digest()}


def first_grouped(raw: RawFile) -> dict:
    return next(ref for _, ref in raw.refs() if "sha256" not in ref)


BAD = {
    "not-a-list": (lambda raw: raw.header.__setitem__("groups", {}), None, "groups"),
    "entry-not-a-map": (lambda raw: raw.header["groups"].__setitem__(0, [0, 1]), None, "groups[0]"),
    "unknown-key": (set_group(0, "crc", 1), None, "groups[0].crc"),
    "length-zero": (set_group(0, "length", 0), None, "groups[0].length"),
    "length-over-1-MiB": (set_group(0, "length", MAX_GROUP + 1), None, "groups[0].length"),
    "sha256-short": (set_group(0, "sha256", b"\0" * 31), None, "groups[0].sha256"),
    "offset-not-int": (set_group(0, "offset", "0"), None, "groups[0].offset"),
    "overlap": (lambda raw: raw.header["groups"][1].__setitem__("offset", raw.header["groups"][0]["offset"]),
                None, "groups[1].offset"),
    "past-the-data-area": (lambda raw: raw.header["groups"][-1].__setitem__("length", MAX_GROUP), None,
                           "groups[2].length"),
    "no-member": (lambda raw: raw.header["groups"].insert(1, own_range(raw, "wide4.weight")), None, "groups[1]"),
    "member-in-no-group": (lambda raw: raw.header["groups"].pop(0), "block0.weight", "arrays.data.sha256"),
    "group-cut-short": (lambda raw: set_group(0, "length", first_grouped(raw)["offset"]
                                              - raw.header["groups"][0]["offset"] + 1)(raw),
                        "block0.weight", "arrays.data.sha256"),
    "sha256-missing-in-1.5": (lambda raw: setattr(raw, "minor", 5) or raw.header.pop("groups"),
                              "block0.weight", "arrays.data.sha256"),
}


@pytest.mark.parametrize("change, tensor, field", BAD.values(), ids=BAD.keys())
def test_open_refuses_bad_hash_groups(grouped: Path, tmp_path: Path, change: Callable, tensor: str | None,
                                      field: str) -> None:
    raw = RawFile.read(grouped, ungroup=False)
    assert raw.refs()[0][0] == ("tensors", "block0.weight", "data")
    bad = edit_groups(change)(grouped, tmp_path / "bad.kpk")
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.open(bad)
    assert (caught.value.path, caught.value.tensor, caught.value.field) == (str(bad), tensor, field), str(caught.value)


def test_a_1_5_reader_refuses_a_grouped_file_as_a_missing_sha256(grouped: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """This reader with what 1.6 added taken out: the file's minor is newer, so ``groups`` is
    ignored, and the first payload without its own hash is refused (spec section 4)."""
    monkeypatch.setattr(reader, "VERSION", (1, 5))
    monkeypatch.setattr(reader, "GROUPED", 7)
    monkeypatch.setattr(reader, "ADDED_KEYS", {1: frozenset({"attachments"})})
    with pytest.raises(kernelpack.KernelpackError, match="must be 32 bytes") as caught:
        kernelpack.open(grouped)
    assert (caught.value.tensor, caught.value.field) == ("block0.weight", "arrays.data.sha256")
