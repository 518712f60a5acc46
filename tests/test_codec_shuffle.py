"""Codec ``zstd-shuffle`` (format 1.2, spec/FORMAT.md section 2, "Compression"): the array's
bytes regrouped into ``itemsize`` byte planes (plane j holds byte j of every element; signed
integers zigzag-mapped to unsigned first, exactly, the extremes included), then one
Zstandard frame declaring the raw size, checked exactly like ``zstd``. The writer keeps
the smallest of none/zstd/zstd-shuffle (ties: the simpler), never shuffles one-byte
elements, and writes 1.2 only when it uses the codec; a reader refuses it on one-byte
elements and in a file of version 1.0 or 1.1; a corrupt payload is refused by its SHA-256
before anything is decompressed, a bad frame like a bad ``zstd`` frame."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import zstandard

import kernelpack
from conftest import RawFile
from kernelpack.codecs import CODECS, ESTIMATE_LEVEL, EXACT_BYTES, SAMPLE_BYTES, codecs_of
from kernelpack.forms import DenseTensor
from kernelpack.forms._base import Stored, to_stored
from kernelpack.reader import Container
from kernelpack.writer import write

KEY = ("tensors", "w", "data")
#: The level these tests write at: their arrays were made so that at 19 each codec wins where it
#: should (at the default level 3, zstd keeps a smooth bfloat16 ramp smaller than its planes).
LEVEL = 19


def zigzag(values: np.ndarray) -> np.ndarray:
    """The spec's zigzag of signed integers, counted out in Python integers: 0, -1, 1, -2, 2 ->
    0, 1, 2, 3, 4 (q >= 0 -> 2q, q < 0 -> -2q - 1), as the unsigned integers of the same width."""
    if values.dtype.kind != "i":
        return values
    mapped = [2 * q if q >= 0 else -2 * q - 1 for q in values.ravel().tolist()]
    return np.array(mapped, dtype=f"<u{values.itemsize}").reshape(values.shape)


def planes(values: np.ndarray) -> bytes:
    """The spec's byte planes, written out independently of the writer: byte j of every
    element (of every zigzag-mapped element, for signed integers)."""
    raw = np.frombuffer(zigzag(values).tobytes(), np.uint8)
    return b"".join(raw[j::values.itemsize].tobytes() for j in range(values.itemsize))


def smooth(dtype: str, count: int = 4096) -> np.ndarray:
    """Numbers whose high bytes repeat and low bytes do not: what byte planes are for."""
    ramp = np.arange(count, dtype=np.int64) * 7919 % 1021
    if dtype in ("float16", "float32", "float64"):
        return (ramp / 1024 + 1).astype(dtype)
    return (ramp - 510).astype(dtype)


def saved(path: Path, stored: Stored, codecs: tuple[str, ...] = CODECS) -> RawFile:
    tensor = DenseTensor(stored, "float32" if stored.step is not None or stored.dtype == "bfloat16" else stored.dtype)
    write(path, {"w": tensor}, level=LEVEL, codecs=codecs, compact=False)
    return RawFile.read(path)


def refused(path: Path) -> kernelpack.KernelpackError:
    with pytest.raises(kernelpack.KernelpackError) as caught:
        with Container(path) as c:
            c.get_numpy("w")
    return caught.value


# --- the codec ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["int16", "uint16", "float16", "bfloat16", "float32", "int32", "float64", "int64"])
def test_elements_wider_than_a_byte_round_trip_as_byte_planes_in_one_frame(dtype: str, tmp_path: Path) -> None:
    values = smooth("float32" if dtype == "bfloat16" else dtype)
    stored = to_stored(values, dtype)
    raw = saved(tmp_path / "s.kpk", stored)
    ref, body = raw.ref(*KEY), raw.payload(*KEY)
    assert ref["codec"] == "zstd-shuffle"
    assert zstandard.get_frame_parameters(body).content_size == stored.data.nbytes
    assert zstandard.ZstdDecompressor().decompress(body) == planes(stored.data)
    with Container(tmp_path / "s.kpk") as c:
        assert c.version == (1, 2)
        assert c.encoded("w").arrays()["data"].data.tobytes() == stored.data.tobytes()
        assert all(c.verify().values())


@pytest.mark.parametrize("dtype", ["int16", "int32", "int64"])
def test_signed_extremes_zigzag_exactly(dtype: str, tmp_path: Path) -> None:
    """min -> 2^N - 1, max -> 2^N - 2, -1 -> 1, 0 -> 0 in the stored planes, and back."""
    info = np.iinfo(dtype)
    edges = np.array([info.min, info.max, -1, 0], dtype=dtype)
    values = np.tile(edges, 256)  # repeated, so that a frame beats storing the bytes as they are
    raw = saved(tmp_path / "e.kpk", Stored(values, dtype), ("zstd-shuffle",))
    assert raw.ref(*KEY)["codec"] == "zstd-shuffle"
    grouped = np.frombuffer(zstandard.ZstdDecompressor().decompress(raw.payload(*KEY)), np.uint8)
    stored = np.frombuffer(grouped.reshape(values.itemsize, -1).T.tobytes(), f"<u{values.itemsize}")
    top = 2 ** (8 * values.itemsize)
    assert stored[:4].tolist() == [top - 1, top - 2, 1, 0]
    with Container(tmp_path / "e.kpk") as c:
        assert np.array_equal(c.get_numpy("w"), values)


def test_quantised_int16_codes_round_trip_shuffled(tmp_path: Path) -> None:
    codes = Stored(smooth("int16"), "int16", 2.0 ** -10)
    assert saved(tmp_path / "q.kpk", codes).ref(*KEY)["codec"] == "zstd-shuffle"
    with Container(tmp_path / "q.kpk") as c:
        assert np.array_equal(c.get_numpy("w"), codes.values())


# --- the writer's choice ---------------------------------------------------------------------
def test_the_writer_keeps_the_smallest_payload(tmp_path: Path) -> None:
    """Byte planes win on smooth numbers; on numbers whose bytes repeat as whole elements
    (a short pattern), plain zstd wins; on noise, storing the bytes as they are wins."""
    ramp = np.arange(4096, dtype=np.int64)
    cases = {"zstd-shuffle": smooth("float32"), "zstd": (ramp % 3 * 1000 + 12345).astype(np.int32),
             "none": np.random.default_rng(0).integers(-2**31, 2**31, 512).astype(np.int32)}
    compressor = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True)
    for codec, values in cases.items():
        sizes = {"none": values.nbytes, "zstd": len(compressor.compress(values.tobytes())),
                 "zstd-shuffle": len(compressor.compress(planes(values)))}
        assert sizes[codec] < min(size for c, size in sizes.items() if c != codec), sizes
        ref = saved(tmp_path / "any.kpk", Stored(values, str(values.dtype))).ref(*KEY)
        assert (ref["codec"], ref["length"]) == (codec, sizes[codec])


@pytest.mark.parametrize("nbytes", [EXACT_BYTES + 4096, 2 * SAMPLE_BYTES])
def test_a_large_payload_is_compared_by_estimate_and_compressed_once_at_the_final_level(
        nbytes: int, tmp_path: Path) -> None:
    """Beyond EXACT_BYTES the codecs are compared at ESTIMATE_LEVEL (beyond SAMPLE_BYTES on a
    sample); the winner's bytes are then its frame at the level asked for (here 19)."""
    values = (1 + np.random.default_rng(0).random(nbytes // 4) / 64).astype(np.float32)  # high bytes repeat
    final = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True).compress(planes(values))
    estimate = zstandard.ZstdCompressor(level=ESTIMATE_LEVEL, write_content_size=True).compress(planes(values))
    assert len(final) != len(estimate)
    raw = saved(tmp_path / "large.kpk", Stored(values, "float32"))
    assert raw.ref(*KEY)["codec"] == "zstd-shuffle" and raw.payload(*KEY) == final


def test_a_tie_keeps_the_simpler_codec(tmp_path: Path) -> None:
    """All zeros: both frames come out the same size, so the payload is plain zstd, and the
    file stays 1.0."""
    zeros = Stored(np.zeros(4096, np.float32), "float32")
    sizes = {c: saved(tmp_path / f"{c}.kpk", zeros, ("none", c)).ref(*KEY)["length"] for c in CODECS[1:]}
    assert sizes["zstd"] == sizes["zstd-shuffle"]
    assert saved(tmp_path / "z.kpk", zeros).ref(*KEY)["codec"] == "zstd"
    with Container(tmp_path / "z.kpk") as c:
        assert c.version == (1, 0)


def test_one_byte_elements_are_never_shuffled(tmp_path: Path) -> None:
    """Not even when zstd-shuffle is the only codec offered: one plane would be the array itself."""
    for dtype in ("int8", "uint8", "bool"):
        values = (np.arange(4096) % (2 if dtype == "bool" else 100)).astype(dtype)
        assert saved(tmp_path / "b.kpk", Stored(values, dtype), ("zstd-shuffle",)).ref(*KEY)["codec"] == "none"
        assert saved(tmp_path / "b.kpk", Stored(values, dtype)).ref(*KEY)["codec"] == "zstd"


def test_a_writer_kept_to_the_codecs_of_1_1_writes_a_1_1_file(tmp_path: Path) -> None:
    raw = saved(tmp_path / "old.kpk", Stored(smooth("float32"), "float32"), codecs_of(1))
    assert (raw.minor, raw.ref(*KEY)["codec"]) == (0, "zstd")
    with pytest.raises(kernelpack.KernelpackError) as caught:
        write(tmp_path / "x.kpk", {}, codecs=("brotli",))
    assert caught.value.field == "codecs"


def test_save_passes_its_codecs_to_the_writer(tmp_path: Path) -> None:
    weights = {"w": smooth("float32")}
    kernelpack.save(weights, tmp_path / "new.kpk", compact=False)
    kernelpack.save(weights, tmp_path / "old.kpk", codecs=codecs_of(1), compact=False)
    assert RawFile.read(tmp_path / "new.kpk").minor == 2  # zstd-shuffle was smaller
    assert RawFile.read(tmp_path / "old.kpk").minor == 0
    assert np.array_equal(kernelpack.load_numpy(tmp_path / "old.kpk")["w"], weights["w"])


# --- what a reader refuses -------------------------------------------------------------------
def test_zstd_shuffle_on_one_byte_elements_is_refused(tmp_path: Path) -> None:
    raw = saved(tmp_path / "b.kpk", Stored(np.arange(64, dtype=np.int8), "int8"))
    raw.replace_payload(KEY, zstandard.ZstdCompressor().compress(raw.payload(*KEY)), codec="zstd-shuffle")
    raw.minor = 2
    raw.write(tmp_path / "b.kpk")
    error = refused(tmp_path / "b.kpk")
    assert (error.tensor, error.field) == ("w", "arrays.data.codec") and "more than one byte" in error.reason


@pytest.mark.parametrize("minor", [0, 1])
def test_zstd_shuffle_in_a_file_of_version_1_0_or_1_1_is_refused(minor: int, tmp_path: Path) -> None:
    """What a 1.0 or 1.1 reader does with the codec: unknown, refused rather than misread."""
    raw = saved(tmp_path / "s.kpk", Stored(smooth("float32"), "float32"))
    raw.minor = minor
    raw.write(tmp_path / "s.kpk")
    error = refused(tmp_path / "s.kpk")
    assert (error.tensor, error.field) == ("w", "arrays.data.codec")
    assert f"version 1.{minor} file, got 'zstd-shuffle'" in error.reason


def frame(size: int, extra: bytes = b"", content_size: bool = True) -> Callable[[bytes], bytes]:
    """A payload made from the true byte planes: a frame declaring ``size``, then ``extra``."""
    def make(planes_: bytes) -> bytes:
        body = (planes_ + bytes(max(0, size - len(planes_))))[:size]
        return zstandard.ZstdCompressor(write_content_size=content_size).compress(body) + extra
    return make


BAD_FRAMES = {
    "declares fewer bytes": (frame(8190), "declares 8190 bytes"),
    "declares more bytes": (frame(8194), "declares 8194 bytes"),
    "no declared size": (frame(8192, content_size=False), "declares"),
    "bytes after the frame": (frame(8192, b"\0"), "bad zstd payload"),
    "two frames": (lambda p: frame(8192)(p) + zstandard.ZstdCompressor().compress(b"x"), "bad zstd payload"),
    "truncated": (lambda p: frame(8192)(p)[:-5], "bad zstd payload"),
}


@pytest.mark.parametrize("bad", sorted(BAD_FRAMES))
def test_a_bad_frame_is_refused_like_a_bad_zstd_frame(bad: str, tmp_path: Path) -> None:
    make, message = BAD_FRAMES[bad]
    raw = saved(tmp_path / "s.kpk", Stored(smooth("int16"), "int16"))  # 8192 bytes
    raw.replace_payload(KEY, make(planes(smooth("int16"))))  # with its SHA-256: the frame is what is wrong
    raw.write(tmp_path / "s.kpk")
    error = refused(tmp_path / "s.kpk")
    assert (error.tensor, error.field) == ("w", "arrays.data") and message in error.reason


def test_every_flipped_bit_is_caught_by_the_sha256_before_decompressing(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    raw = saved(tmp_path / "s.kpk", Stored(smooth("float32"), "float32"))
    body, start = raw.payload(*KEY), raw.ref(*KEY)["offset"]
    monkeypatch.setattr(zstandard, "ZstdDecompressor", None)  # decompressing would fail differently
    for bit in np.random.default_rng(1).integers(0, 8 * len(body), 8):
        flipped = bytearray(raw.data)
        flipped[start + bit // 8] ^= 1 << (bit % 8)
        RawFile(raw.major, raw.minor, raw.header, bytes(flipped)).write(tmp_path / "f.kpk")
        error = refused(tmp_path / "f.kpk")
        assert (error.field, error.reason) == ("arrays.data", "payload checksum mismatch: the file is corrupted")
