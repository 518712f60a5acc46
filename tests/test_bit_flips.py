"""Corruption is detected: every single-bit flip anywhere in a container makes loading it fail,
naming the part of the file that changed. Tried exhaustively, every bit of a small file that
holds every region the format has: preamble, header, header padding, a bank, attachments,
payloads of every form (one zstd), and the zero gaps between payloads."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import kernelpack
from conftest import RawFile, random_array


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flips") / "small.kpk"
    tensors = {"bias": random_array(0, (3,)), "mask": np.array([True, False, True]),
               "zeros": np.zeros(64, np.float32), "dct": random_array(1, (4, 3)),
               "series": random_array(2, (2, 3, 3)), "basis": random_array(3, (3, 1, 2, 2)),
               "linear": random_array(4, (4, 2))}
    forms = {"dct": kernelpack.DCT(boundary=5), "series": kernelpack.Series(harmonics=2),
             "basis": kernelpack.Basis(bank=2, bank_name="b"), "linear": kernelpack.Linear(primaries=2)}
    kernelpack.save(tensors, path, forms=forms, attachments={"graph": b"graph " * 20, "note": b"x"},
                    compact=False)
    raw = RawFile.read(path)
    assert raw.ref("tensors", "zeros", "data")["codec"] == "zstd" and (raw.major, raw.minor) == (1, 1)
    return path


def regions(path: Path) -> list[tuple[int, int, str]]:
    """(start, end, the error field a flip there must raise), covering every byte of the file."""
    raw = RawFile.read(path)
    length = struct.unpack("<I", path.read_bytes()[12:16])[0]
    data_start = -(-(48 + length) // 64) * 64
    spans = [(0, 8, "magic"), (8, 10, "version"), (10, 12, "header_sha256"), (12, 16, "header_sha256|header_length"),
             (16, 48 + length, "header_sha256"), (48 + length, data_start, "padding")]
    end = data_start
    for key, ref in raw.refs():
        start = data_start + ref["offset"]
        spans += [(end, start, "padding"), (start, start + ref["length"], ".".join(
            ("arrays", key[2]) if key[0] == "tensors" else key))]
        end = start + ref["length"]
    assert end == os.path.getsize(path)
    return [s for s in spans if s[1] > s[0]]


def flips(path: Path) -> Iterator[tuple[int, int]]:
    """Flip each bit of the file in place in turn (restored after each); yields (offset, bit)."""
    fd = os.open(path, os.O_RDWR)
    try:
        for offset in range(os.path.getsize(path)):
            byte = os.pread(fd, 1, offset)[0]
            for bit in range(8):
                os.pwrite(fd, bytes([byte ^ (1 << bit)]), offset)
                yield offset, bit
            os.pwrite(fd, bytes([byte]), offset)
    finally:
        os.close(fd)


def detected(path: Path, payload: bool) -> str | None:
    """The field of the error a flipped file raises: when opened if the flip is outside the
    payloads (opening reads none), else when loaded. None if nothing was detected."""
    try:
        with kernelpack.open(path):
            pass
    except kernelpack.KernelpackError as exc:
        return None if payload else exc.field
    try:
        kernelpack.load_numpy(path)
    except kernelpack.KernelpackError as exc:
        assert exc.path == str(path)
        return exc.field if payload else None
    return None


def test_every_single_bit_flip_is_detected_at_load(small: Path) -> None:
    original = small.read_bytes()
    spans = regions(small)
    tried, wrong = 0, []
    for offset, bit in flips(small):
        expected = next(field for start, end, field in spans if start <= offset < end)
        payload = expected.startswith(("arrays.", "banks.", "attachments."))
        field = detected(small, payload)
        tried += 1
        if field not in expected.split("|"):
            wrong.append((offset, bit, expected, field))
    assert small.read_bytes() == original
    assert tried == 8 * len(original) and tried > 20_000
    assert not wrong, f"{len(wrong)} of {tried} flips (offset, bit, expected, got): {wrong[:5]}"
    assert {field for _, _, field in spans} >= {"magic", "version", "padding", "banks.b", "attachments.graph",
                                                "attachments.note", "arrays.coefficients", "arrays.data",
                                                "arrays.index", "arrays.primaries"}
