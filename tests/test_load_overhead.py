"""Whole-file loads read a small file at once (``Container(preload=True)``, PRELOAD_MAX):
the same tensors and errors as payload-by-payload reads, never a read beyond the limits,
and no returned tensor keeps the file's bytes alive."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kernelpack
from kernelpack import Dense, layout, reader

SHAPES = {"conv.weight": (16, 8, 3, 3), "bn.weight": (16,), "bn.running_var": (16,), "fc.weight": (4, 16)}


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """Compressed (float16, zstd) and uncompressed (float32 noise, ``none``) payloads."""
    rng = np.random.default_rng(0)
    state = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    path = tmp_path / "small.kpk"
    kernelpack.save(state, path, forms={k: Dense(dtype="float16") for k, a in state.items() if a.ndim > 1},
                    compact=False)  # a payload each, with its own hash (hash groups: test_hash_groups.py)
    codecs = {ref.codec for name in SHAPES for ref in kernelpack.open(path).info(name).arrays.values()}
    assert codecs == {"none", "zstd"}
    return path


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every os.pread a load makes."""
    lengths: list[int] = []
    real = os.pread

    def counting(fd: int, length: int, offset: int) -> Any:
        lengths.append(length)
        return real(fd, length, offset)

    monkeypatch.setattr(os, "pread", counting)
    return lengths


def one_by_one(path: Path) -> dict[str, np.ndarray]:
    with kernelpack.open(path) as c:
        return {name: c.get_numpy(name) for name in c}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_a_small_file_loads_in_three_reads_with_the_same_tensors(small: Path, reads: list[int]) -> None:
    expected = one_by_one(small)
    reads.clear()
    assert same(kernelpack.load_numpy(small), expected)
    # preamble, header, everything after the header (padding and every payload)
    assert len(reads) == 3 and sum(reads) == os.path.getsize(small)


def test_beyond_preload_max_payloads_are_read_one_by_one(small: Path, reads: list[int],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    expected = one_by_one(small)
    monkeypatch.setattr(reader, "PRELOAD_MAX", 64)
    reads.clear()
    assert same(kernelpack.load_numpy(small), expected)
    assert len(reads) > 2 + len(SHAPES)


def test_no_read_exceeds_max_decoded_bytes(tmp_path: Path, reads: list[int]) -> None:
    """A limit below the file's data but above what any one tensor needs: the load works,
    without the one big read."""
    rng = np.random.default_rng(1)
    path = tmp_path / "many.kpk"
    kernelpack.save({f"t{i}": rng.standard_normal(64).astype(np.float32) for i in range(20)}, path)
    limit = 8 * 64  # a tensor's decode counts 8 bytes per element
    with kernelpack.open(path) as c:
        assert limit < os.path.getsize(path) - c._header_end
    expected = one_by_one(path)
    reads.clear()
    assert same(kernelpack.load_numpy(path, limits=kernelpack.Limits(max_decoded_bytes=limit)), expected)
    # after preamble and header (bounded by max_header_bytes): payloads, or the hash groups that
    # hold them, which the format bounds at MAX_GROUP whatever the limits (spec section 2.4)
    with kernelpack.open(path) as c:
        groups = [length for _, length, _ in c._groups]
    assert groups and max(reads[2:]) <= max(limit, *groups) <= layout.MAX_GROUP


def test_no_tensor_keeps_the_file_bytes_alive(small: Path) -> None:
    """An uncompressed payload is copied out of the file's bytes (a view would pin them all)."""
    for name, array in kernelpack.load_numpy(small).items():
        root: Any = array
        while isinstance(root, np.ndarray) and root.base is not None:
            root = root.base
        if isinstance(root, memoryview):  # a slice of a memoryview: its .obj holds all of it
            root = root.obj
        assert memoryview(root).nbytes == array.nbytes, name


def test_a_corrupted_payload_is_found_in_the_preloaded_bytes(small: Path) -> None:
    with kernelpack.open(small) as c:
        ref = c.info("bn.weight").arrays["data"]
        at = c._data_start + ref.offset
    data = bytearray(small.read_bytes())
    data[at] ^= 1
    small.write_bytes(bytes(data))
    with pytest.raises(kernelpack.KernelpackError, match="checksum") as caught:
        kernelpack.load_numpy(small)
    assert (caught.value.tensor, caught.value.field) == ("bn.weight", "arrays.data")
