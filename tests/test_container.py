"""The container as a whole: layout, lazy access, metadata, saving models and dicts, attachments
and torch-free numpy loading. (Versions, concurrency and atomic writes have their own modules.)"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

import kernelpack
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
    path = tmp_path / "mixed.kpk"
    tensors = {"bias": random_array(0, (8,)), "dct": random_array(1, (8, 4, 3, 3)),
               "series": random_array(2, (8, 4, 3, 3)), "basis": random_array(3, (8, 4, 3, 3)),
               "linear": random_array(4, (8, 4, 3, 3))}
    forms = {"dct": kernelpack.DCT(), "series": kernelpack.Series(), "basis": kernelpack.Basis(bank=4),
             "linear": kernelpack.Linear()}
    kernelpack.save(tensors, path, forms=forms, metadata={"model": "test"})
    return path


def test_layout_follows_the_spec(mixed: Path) -> None:
    """Preamble, checksummed msgpack header, zero pad to 64, payloads packed 64-aligned."""
    blob = mixed.read_bytes()
    assert blob[:8] == MAGIC
    major, minor, length = struct.unpack("<HHI", blob[8:16])
    assert kernelpack.FORMAT_VERSION == (1, 3)
    assert (major, minor) == (1, 0)  # the lowest version that holds it: no attachments
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


def test_metadata_round_trips(tmp_path: Path) -> None:
    meta = {"name": "lenet", "accuracy": "0.978", "unicode": "Größe ✓", "empty": ""}
    path = tmp_path / "meta.kpk"
    kernelpack.save({"w": np.ones(2, np.float32)}, path, metadata=meta)
    with kernelpack.open(path) as c:
        assert c.metadata == meta


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
    kernelpack.save({"w": random_array(0, (4, 3))}, path, attachments={"onnx.graph": graph, "empty": b""})
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


def test_zero_length_payloads_may_share_an_offset(tmp_path: Path) -> None:
    """They take no bytes: each sits at the aligned end of the payloads before it, so several
    share an offset, with each other and with the payload that starts there; one after the
    last payload moves the end of the file to the next multiple of 64."""
    path = tmp_path / "empty.kpk"
    tensors = {"a": np.zeros(0, np.float32), "b": np.zeros((2, 0), np.int8), "w": np.ones(3, np.float32),
               "c": np.zeros(0, np.float16)}
    kernelpack.save(tensors, path, attachments={"none": b""})
    raw = RawFile.read(path)
    assert {key[1]: (ref["offset"], ref["length"]) for key, ref in raw.refs()} == {
        "none": (0, 0), "a": (0, 0), "b": (0, 0), "w": (0, 12), "c": (64, 0)}
    assert len(path.read_bytes()) % 64 == 0
    with kernelpack.open(path) as c:
        assert all(c.verify().values()) and c.read_attachment("none") == b""


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_payloads_tied_in_the_layout_are_taken_in_header_order(tmp_path: Path, order: tuple[str, str]) -> None:
    """Two zero-length payloads at one (wrong) offset: the error names the first the header lists."""
    path = tmp_path / "empty.kpk"
    kernelpack.save({"w": np.ones(3, np.float32), "a": np.zeros(0, np.float32), "b": np.zeros(0, np.float32)}, path)
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
