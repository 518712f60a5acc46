"""The container as a whole: layout, lazy access, metadata, saving models and dicts, attachments
and torch-free numpy loading. (Versions, concurrency and atomic writes have their own modules.)"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np
import pytest
import torch
import zstandard

import kernelpack
from kernelpack.codecs import codecs_of
from conftest import MAGIC, NUMPY, RawFile, assert_same_bits, random_array

TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
                torch.int16, torch.int32, torch.int64, torch.bool]


def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5))
    model.train()(torch.randn(4, 3, 8, 8))  # running statistics and num_batches_tracked move
    return model.eval()


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """A file with one tensor of every form."""
    return mixed_file(tmp_path / "mixed.kpk")


def mixed_file(path: Path, **options: Any) -> Path:
    tensors = {"bias": random_array(0, (8,)), "dct": random_array(1, (8, 4, 3, 3)),
               "series": random_array(2, (8, 4, 3, 3)), "basis": random_array(3, (8, 4, 3, 3)),
               "linear": random_array(4, (8, 4, 3, 3))}
    forms = {"dct": kernelpack.DCT(), "series": kernelpack.Series(), "basis": kernelpack.Basis(bank=4),
             "linear": kernelpack.Linear()}
    kernelpack.save(tensors, path, forms=forms, metadata={"model": "test"}, **options)
    return path


def test_layout_follows_the_spec(tmp_path: Path) -> None:
    """Preamble, checksummed msgpack header, zero pad to 64, payloads packed 64-aligned (the
    codecs of 1.0: at level 3, linear's 32-byte order array would take zstd-shuffle, of 1.2)."""
    blob = mixed_file(tmp_path / "plain.kpk", compact=False, codecs=codecs_of(0)).read_bytes()
    assert blob[:8] == MAGIC
    major, minor, length = struct.unpack("<HHI", blob[8:16])
    assert kernelpack.FORMAT_VERSION == (1, 7)
    assert (major, minor) == (1, 0)  # the lowest version that holds it: no attachments, a plain header
    assert blob[16:48] == hashlib.sha256(blob[:16] + blob[48:48 + length]).digest()
    header = msgpack.unpackb(blob[48:48 + length], raw=False)
    assert set(header) == {"metadata", "banks", "tensors"}
    start = -(-(48 + length) // 64) * 64
    assert not any(blob[48 + length:start])
    refs = sorted([r for r in header["banks"].values()] +
                  [r for t in header["tensors"].values() for r in t["arrays"].values()],
                  key=lambda r: r["offset"])
    end = 0
    for ref in refs:
        assert ref["offset"] == -(-end // 64) * 64 and not any(blob[start + end:start + ref["offset"]])
        body = blob[start + ref["offset"]:start + ref["offset"] + ref["length"]]
        assert hashlib.sha256(body).digest() == ref["sha256"] and ref["codec"] in ("none", "zstd")
        end = ref["offset"] + ref["length"]
    assert start + end == len(blob)


def test_a_compact_file_compresses_its_header_and_packs_compressed_payloads_unaligned(tmp_path: Path) -> None:
    """Since 1.4 (spec section 2.2) the header may be one Zstandard frame, which the preamble's
    SHA-256 covers as stored, and compressed or empty payloads follow the previous one
    unaligned; raw ones stay 64-aligned. The payloads are those of the plain file."""
    plain = RawFile.read(mixed_file(tmp_path / "plain.kpk", compact=False))
    packed_path = mixed_file(tmp_path / "packed.kpk")
    blob, packed = packed_path.read_bytes(), RawFile.read(packed_path, ungroup=False)
    length = struct.unpack("<I", blob[12:16])[0]
    head = blob[48:48 + length]
    # 1.6, not 1.4: its small payloads share hash groups too (tests/test_hash_groups.py)
    assert (packed.major, packed.minor) == (1, 6) and packed.compressed and head[:4] == b"\x28\xb5\x2f\xfd"
    assert blob[16:48] == hashlib.sha256(blob[:16] + head).digest()
    assert zstandard.get_frame_parameters(head).content_size == len(msgpack.packb(packed.header, use_bin_type=True))
    assert length < len(msgpack.packb(plain.header, use_bin_type=True))
    assert [k for k, _ in packed.refs()] == [k for k, _ in plain.refs()]
    end = 0
    for key, ref in packed.refs():
        assert packed.payload(*key) == plain.payload(*key)
        aligned = ref["codec"] == "none" and ref["length"] > 0
        assert ref["offset"] == (-(-end // 64) * 64 if aligned else end)
        end = ref["offset"] + ref["length"]
    assert any(r["offset"] % 64 for _, r in packed.refs()) and len(packed.data) == end < len(plain.data)
    for name in ("plain.kpk", "packed.kpk"):
        with kernelpack.open(tmp_path / name) as c:
            assert all(c.verify().values())


def compressed_with(tmp_path: Path, frame: Callable[[bytes], bytes], minor: int = 4) -> Path:
    """The mixed file with its header stored as ``frame(msgpack header)`` (SHA-256 recomputed)."""
    raw = RawFile.read(mixed_file(tmp_path / "base.kpk", compact=False))
    raw.minor = minor
    path = tmp_path / "edited.kpk"
    raw.write(path, head=frame(msgpack.packb(raw.header, use_bin_type=True)))
    return path


BAD_FRAMES = {
    "frame-in-a-1.3-file": (lambda h: zstandard.ZstdCompressor().compress(h), 3, "compressed headers are a 1.4 feature"),
    "no-declared-size": (lambda h: zstandard.ZstdCompressor(write_content_size=False).compressobj().compress(h)
                         + zstandard.ZstdCompressor(write_content_size=False).compressobj().flush(), 4, None),
    "bytes-after-the-frame": (lambda h: zstandard.ZstdCompressor().compress(h) + b"\0", 4, "bad compressed header"),
    "two-frames": (lambda h: zstandard.ZstdCompressor().compress(h[:10]) + zstandard.ZstdCompressor().compress(h[10:]),
                   4, "bad compressed header"),
    "corrupt-frame": (lambda h: zstandard.ZstdCompressor().compress(h)[:-6] + b"\xff" * 6, 4, None),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_a_bad_compressed_header_is_refused_naming_the_header(tmp_path: Path, case: str) -> None:
    frame, minor, message = BAD_FRAMES[case]
    path = compressed_with(tmp_path, frame, minor)
    with pytest.raises(kernelpack.KernelpackError, match=message) as caught:
        kernelpack.open(path)
    assert (caught.value.path, caught.value.field) == (str(path), "header")


def test_a_compressed_header_declaring_more_than_the_limit_is_refused_before_inflating(tmp_path: Path) -> None:
    path = compressed_with(tmp_path, lambda h: zstandard.ZstdCompressor().compress(h + b"\0" * (1 << 20)))
    with pytest.raises(kernelpack.KernelpackError, match="at most 4096 bytes") as caught:
        kernelpack.open(path, limits=kernelpack.Limits(max_header_bytes=4096))
    assert caught.value.field == "header"


def test_a_reader_before_1_4_refuses_a_compressed_header_rather_than_misreading_it(tmp_path: Path) -> None:
    """What a 1.3 reader does with the header bytes (exactly one msgpack map): a zstd frame is
    a msgpack integer (0x28) followed by more bytes, so it is refused."""
    from kernelpack.layout import parse_header

    head = zstandard.ZstdCompressor().compress(msgpack.packb({"tensors": {}}))
    with pytest.raises(ValueError):
        parse_header(head)


def test_header_bytes_per_tensor_drop_below_80_on_a_model_with_many_small_tensors(tmp_path: Path) -> None:
    """Issue 14's measure: stored header bytes over tensors, on a ResNet-style state dict of
    convolutions and batch norms (most tensors small, each with its digest and payload hash)."""
    rng = np.random.default_rng(0)
    tensors = {}
    for block in range(20):
        tensors[f"layer{block}.conv.weight"] = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
        for part in ("weight", "bias", "running_mean", "running_var"):
            tensors[f"layer{block}.bn.{part}"] = rng.standard_normal(32).astype(np.float32)
    sizes = {}
    for codec in ("none", "zstd"):
        kernelpack.save(tensors, tmp_path / f"{codec}.kpk", compact=codec == "zstd")
        sizes[codec] = struct.unpack("<I", (tmp_path / f"{codec}.kpk").read_bytes()[12:16])[0] / len(tensors)
    assert sizes["zstd"] <= 80 < sizes["none"]


def test_open_reads_one_tensor_without_touching_the_others(mixed: Path) -> None:
    raw = RawFile.read(mixed)
    ref = raw.ref("tensors", "dct", "coefficients")
    data = bytearray(raw.data)
    data[ref["offset"]] ^= 0xFF
    raw.data = bytes(data)
    raw.write(mixed)
    with kernelpack.open(mixed) as c:
        assert c.keys() == ["bias", "dct", "series", "basis", "linear"]
        for name in ("bias", "series", "basis", "linear"):
            assert c.get_numpy(name).shape == c.info(name).shape
        with pytest.raises(kernelpack.KernelpackError, match="checksum"):
            c.get_numpy("dct")


def test_a_save_is_the_same_bytes_on_one_thread_as_on_every_core(tmp_path: Path, monkeypatch) -> None:
    """Tensors large enough for the thread pools of encode and write (kernelpack._parallel:
    over AUTO_PARALLEL_WORK in all), in several forms: the file does not depend on the thread
    count, and it verifies."""
    import os

    state = {f"t{i}": random_array(i, (1024, 2048)) for i in range(5)} | {"bias": random_array(9, (16,))}
    forms = {"t0": kernelpack.Linear(0.5), "t1": kernelpack.DCT(keep=0.1), "*": kernelpack.Dense("float16")}
    kernelpack.save(state, tmp_path / "pooled.kpk", forms=forms)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    kernelpack.save(state, tmp_path / "one.kpk", forms=forms)
    assert (tmp_path / "pooled.kpk").read_bytes() == (tmp_path / "one.kpk").read_bytes()
    with kernelpack.open(tmp_path / "pooled.kpk") as c:
        assert all(c.verify().values())


def test_metadata_round_trips(tmp_path: Path) -> None:
    meta = {"name": "lenet", "accuracy": "0.978", "unicode": "Größe ✓", "empty": ""}
    path = tmp_path / "meta.kpk"
    kernelpack.save({"w": np.ones(2, np.float32)}, path, metadata=meta)
    with kernelpack.open(path) as c:
        assert c.metadata() == meta


def test_a_module_round_trips_to_identical_outputs(tmp_path: Path) -> None:
    model = small_cnn()
    path = tmp_path / "cnn.kpk"
    kernelpack.save(model, path)
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5)).eval()
    result = kernelpack.load_model(fresh, path)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_a_state_dict_round_trips_with_shapes_and_dtypes(tmp_path: Path) -> None:
    """Including BatchNorm's 0-d int64 num_batches_tracked."""
    state = small_cnn().state_dict()
    path = tmp_path / "state.kpk"
    kernelpack.save(state, path)
    loaded = kernelpack.load(path)
    assert list(loaded) == list(state)
    for name, value in state.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape, name
        assert torch.equal(loaded[name], value), name


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_every_torch_dtype_round_trips_through_both_loaders(tmp_path: Path, dtype: torch.dtype) -> None:
    value = (torch.randn(3, 4) * 100).to(dtype)
    path = tmp_path / "t.kpk"
    kernelpack.save({"t": value}, path)
    by_torch = kernelpack.load(path)["t"]
    assert by_torch.dtype == dtype
    assert_same_bits(by_torch.view(torch.int16) if dtype == torch.bfloat16 else by_torch,
                     value.view(torch.int16) if dtype == torch.bfloat16 else value)
    by_numpy = kernelpack.load_numpy(path)["t"]  # bfloat16 arrives widened to float32, exactly
    assert_same_bits(by_numpy, value.float().numpy() if dtype == torch.bfloat16 else value.numpy())


def test_torch_and_numpy_inputs_make_the_same_file(tmp_path: Path) -> None:
    arrays = {"w": random_array(5, (4, 2, 3, 3)), "n": np.arange(3, dtype=np.int64)}
    forms = {"w": kernelpack.Series(harmonics=2)}
    kernelpack.save(arrays, tmp_path / "np.kpk", forms=forms)
    kernelpack.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp_path / "pt.kpk", forms=forms)
    assert (tmp_path / "np.kpk").read_bytes() == (tmp_path / "pt.kpk").read_bytes()


def test_load_numpy_never_imports_torch(mixed: Path) -> None:
    code = ("import sys, kernelpack; out = kernelpack.load_numpy(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(sorted(out))")
    done = subprocess.run([sys.executable, "-c", code, str(mixed)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(sorted(["bias", "dct", "series", "basis", "linear"]))


def test_info_describes_each_tensor(mixed: Path) -> None:
    with kernelpack.open(mixed) as c:
        assert len(c) == 5 and "dct" in c and "missing" not in c
        info = c.info("series")
        assert (info.form, info.shape, info.dtype) == ("series", (8, 4, 3, 3), "float32")
        assert info.dense_bytes == 8 * 4 * 9 * 4 and 0 < info.stored_bytes < info.dense_bytes
        assert_same_bits(c.get_tensor("series"), c.decode("series", NUMPY))


def test_attachments_round_trip_and_make_the_file_version_1_1(tmp_path: Path) -> None:
    path = tmp_path / "att.kpk"
    graph = bytes(range(256)) * 10
    kernelpack.save({"w": random_array(0, (4, 3))}, path, attachments={"onnx.graph": graph, "empty": b""},
                    compact=False)
    assert struct.unpack("<HH", path.read_bytes()[8:12]) == (1, 1)
    with kernelpack.open(path) as c:
        assert c.attachments() == ["empty", "onnx.graph"]
        assert c.read_attachment("onnx.graph") == graph and c.read_attachment("empty") == b""
        assert all(c.verify().values())
        with pytest.raises(kernelpack.KernelpackError, match="no attachment"):
            c.read_attachment("missing")


def test_an_attachment_must_be_bytes(tmp_path: Path) -> None:
    path = tmp_path / "att.kpk"
    kernelpack.save({"w": random_array(0, (4, 3))}, path, attachments={"g": b"graph"})
    raw = RawFile.read(path)
    raw.header["attachments"]["g"]["dtype"] = "int8"
    raw.write(path)
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.open(path)
    assert caught.value.field == "attachments.g"


@pytest.mark.parametrize("compact", [False, True])
def test_zero_length_payloads_may_share_an_offset(tmp_path: Path, compact: bool) -> None:
    """They take no bytes: each sits at the (before 1.4: aligned) end of the payloads before it,
    so several share an offset, with each other and with the payload that starts there; one
    after the last payload moves the end of the file to the next multiple of 64 (in a compact
    1.4 file it stays where the last payload ends)."""
    path = tmp_path / "empty.kpk"
    tensors = {"a": np.zeros(0, np.float32), "b": np.zeros((2, 0), np.int8), "w": np.ones(3, np.float32),
               "c": np.zeros(0, np.float16)}
    kernelpack.save(tensors, path, attachments={"none": b""}, compact=compact)
    raw = RawFile.read(path)
    assert {key[1]: (ref["offset"], ref["length"]) for key, ref in raw.refs()} == {
        "none": (0, 0), "a": (0, 0), "b": (0, 0), "w": (0, 12), "c": (12 if compact else 64, 0)}
    # 1.1: attachments; compact: 1.6, the header is shortest against the header dictionary
    assert (len(raw.data), raw.minor) == ((12, 6) if compact else (64, 1))
    with kernelpack.open(path) as c:
        assert all(c.verify().values()) and c.read_attachment("none") == b""


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_payloads_tied_in_the_layout_are_taken_in_header_order(tmp_path: Path, order: tuple[str, str]) -> None:
    """Two zero-length payloads at one (wrong) offset: the error names the first the header lists."""
    path = tmp_path / "empty.kpk"
    kernelpack.save({"w": np.ones(3, np.float32), "a": np.zeros(0, np.float32), "b": np.zeros(0, np.float32)}, path,
                    compact=False)
    raw = RawFile.read(path)
    entries = raw.header["tensors"]
    raw.header["tensors"] = {"w": entries["w"], **{name: entries[name] for name in order}}
    for name in order:
        entries[name]["arrays"]["data"]["offset"] = 128
    raw.write(path)
    with pytest.raises(kernelpack.KernelpackError, match="must be 64") as caught:
        kernelpack.open(path)
    assert (caught.value.tensor, caught.value.field) == (order[0], "arrays.data.offset")


def test_a_bank_no_tensor_names_is_allowed_and_load_checks_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "spare.kpk"
    kernelpack.save({"w": random_array(0, (4, 3, 3))}, path)
    raw = RawFile.read(path)
    raw.header["banks"]["spare"] = {"dtype": "float32", "shape": [2, 3], "codec": "none", "offset": 0,
                                    "length": 0, "sha256": b"\0" * 32}
    raw.replace_payload(("banks", "spare"), np.ones(6, np.float32).tobytes())
    raw.write(path)
    assert kernelpack.load_numpy(path)["w"].shape == (4, 3, 3)
    at = raw.ref("banks", "spare")["offset"]
    raw.data = raw.data[:at] + b"\x01" + raw.data[at + 1:]  # the header (and its checksums) unchanged
    raw.write(path)
    with kernelpack.open(path) as c:
        assert c.keys() == ["w"]
    with pytest.raises(kernelpack.KernelpackError, match="checksum") as caught:
        kernelpack.load_numpy(path)
    assert (caught.value.tensor, caught.value.field) == (None, "banks.spare")


def test_the_header_dictionary_is_the_spec_file_and_a_1_6_header_needs_it(tmp_path: Path) -> None:
    """spec/FORMAT.md section 2.2: the dictionary's bytes are spec/header-dictionary.bin, with
    the SHA-256 the spec gives; a compact file's frame against it does not inflate without it."""
    from kernelpack.layout import header_dictionary

    spec = Path(__file__).parent.parent / "spec"
    assert header_dictionary() == (spec / "header-dictionary.bin").read_bytes()
    assert hashlib.sha256(header_dictionary()).hexdigest() in (spec / "FORMAT.md").read_text(encoding="utf-8")
    path = tmp_path / "small.kpk"
    kernelpack.save({"conv.weight": np.ones((4, 3, 3, 3), np.float32), "conv.bias": np.ones(4, np.float32)}, path,
                    forms={"conv.weight": kernelpack.Dense(step=0.25)})
    blob = path.read_bytes()
    head = blob[48:48 + struct.unpack("<I", blob[12:16])[0]]
    assert struct.unpack("<H", blob[10:12])[0] == 6 and head[:4] == b"\x28\xb5\x2f\xfd"
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompress(head)
