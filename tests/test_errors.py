"""The error contract of the public API: bad input raises KernelpackError, whose message
names the file, tensor or field, and never another exception type (TypeError,
AttributeError, RuntimeError, OSError) from deep inside.

One exception to it, by decision: a tensor name the container does not hold raises
KeyError, the Mapping convention (``name in c`` asks first); see ``kernelpack.open``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import kernelpack
from kernelpack import DCT, Basis, Dense, KernelpackError, Limits, Linear, Series

W = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.kpk"
    kernelpack.save({"w": W}, path)
    return path


def saving(**kwargs: Any) -> Callable[[Path], Any]:
    """A save of W into the test's folder with one bad argument."""
    return lambda folder: kernelpack.save(kwargs.pop("obj", {"w": W}), kwargs.pop("path", folder / "o.kpk"),
                                          **kwargs)


def a_file(folder: Path) -> Path:
    path = folder / "file"
    path.write_bytes(b"not a folder")
    return path


#: (id, call on the test's folder, the field or words the message must name)
BAD_SAVES = [
    ("path-int", saving(path=3), "field 'path'"),
    ("path-none", saving(path=None), "field 'path'"),
    ("path-empty", saving(path=""), "field 'path'"),
    ("path-nul", saving(path="a\0b.kpk"), "field 'path'"),
    ("path-is-a-folder", lambda folder: kernelpack.save({"w": W}, folder), "is a folder"),
    ("path-folder-missing", saving(path=Path("/nonexistent-kernelpack-folder/o.kpk")), "does not exist"),
    ("path-under-a-file", lambda folder: kernelpack.save({"w": W}, a_file(folder) / "o.kpk"), "is not a folder"),
    ("obj-list", saving(obj=[1, 2]), "field 'model'"),
    ("obj-str", saving(obj="weights"), "field 'model'"),
    ("level-str", saving(level="9"), "field 'level'"),
    ("level-99", saving(level=99), "field 'level'"),
    ("level-0", saving(level=0), "field 'level'"),
    ("metadata-list", saving(metadata=[("a", "b")]), "field 'metadata'"),
    ("metadata-int-value", saving(metadata={"a": 1}), "field 'metadata'"),
    ("forms-int", saving(forms=3), "field 'forms'"),
    ("forms-list", saving(forms=[Dense()]), "field 'forms'"),
    ("forms-value-int", saving(forms={"*": 3}), "field 'forms'"),
    ("forms-function-gives-str", saving(forms=lambda name, value: "dense"), "field 'forms'"),
    ("codecs-int", saving(codecs=3), "field 'codecs'"),
    ("codecs-unknown", saving(codecs=["lz4"]), "field 'codecs'"),
    ("attachments-list", saving(attachments=[b"x"]), "field 'attachments'"),
    ("attachments-str-value", saving(attachments={"a": "text"}), "field 'attachments.a'"),
    ("value-str", saving(obj={"w": "abc"}), "field 'dtype'"),
    ("name-int", saving(obj={3: W}), "field 'name'"),
    ("series-harmonics-negative", saving(forms=Series(harmonics=-1)), "field 'harmonics'"),
    ("series-harmonics-str", saving(forms=Series(harmonics="x")), "field 'settings'"),
    ("dct-keep-2", saving(forms=DCT(keep=2)), "field 'keep'"),
    ("basis-bank-0", saving(forms=Basis(bank=0)), "field 'bank'"),
    ("linear-rank-negative", saving(forms=Linear(rank=-1)), "field 'rank'"),
    ("dense-step-negative", saving(forms=Dense(step=-1.0)), "field 'step'"),
]


@pytest.mark.parametrize("call, needle", [c[1:] for c in BAD_SAVES], ids=[c[0] for c in BAD_SAVES])
def test_bad_save_arguments_raise_kernelpack_error(tmp_path: Path, call: Callable[[Path], Any],
                                                   needle: str) -> None:
    with pytest.raises(KernelpackError, match=needle):
        call(tmp_path)
    assert "o.kpk" not in os.listdir(tmp_path)  # refused before anything is written


def test_a_bad_output_path_is_refused_before_any_tensor_is_encoded(tmp_path: Path) -> None:
    """Encoding may take minutes: a save to a folder that does not exist fails at once."""
    class Unencodable:
        def encode(self, array: np.ndarray, dtype: str) -> None:
            raise AssertionError("encoded before the path was checked")

    with pytest.raises(KernelpackError, match="does not exist"):
        kernelpack.save({"w": W}, tmp_path / "missing" / "o.kpk", forms=lambda n, v: Unencodable())


BAD_LOADS = [
    ("load-threads-0", lambda p: kernelpack.load_numpy(p, threads=0), "field 'threads'"),
    ("load-threads-negative", lambda p: kernelpack.load_numpy(p, threads=-1), "field 'threads'"),
    ("load-threads-str", lambda p: kernelpack.load_numpy(p, threads="2"), "field 'threads'"),
    ("load-missing-file", lambda p: kernelpack.load_numpy(p.with_name("missing.kpk")), "cannot open"),
    ("load-folder", lambda p: kernelpack.load_numpy(p.parent), "not a regular file"),
    ("open-missing-file", lambda p: kernelpack.open(p.with_name("missing.kpk")), "cannot open"),
    ("limits-negative", lambda p: Limits(max_decoded_bytes=-1), "field 'limits.max_decoded_bytes'"),
    ("limits-str", lambda p: Limits(max_header_bytes="1"), "field 'limits.max_header_bytes'"),
    ("verify-unknown-backend", lambda p: kernelpack.open(p).verify("jax"), "field 'backend'"),
    ("verify-numpy-on-cuda", lambda p: kernelpack.open(p).verify("numpy", "cuda"), "field 'device'"),
    ("read-missing-attachment", lambda p: kernelpack.open(p).read_attachment("onnx.graph"),
     "field 'attachments'"),
    ("ort-session-without-graph", lambda p: kernelpack.ort_session(p), "field 'attachments'"),
]


@pytest.mark.parametrize("call, needle", [c[1:] for c in BAD_LOADS], ids=[c[0] for c in BAD_LOADS])
def test_bad_load_arguments_raise_kernelpack_error(good: Path, call: Callable[[Path], Any],
                                                   needle: str) -> None:
    with pytest.raises(KernelpackError, match=needle):
        call(good)


@pytest.mark.parametrize("name", ["missing", 3])
def test_a_name_the_file_lacks_is_a_key_error(good: Path, name: Any) -> None:
    with kernelpack.open(good) as c:
        assert name not in c
        for lookup in (c.get_numpy, c.info, c.encoded):
            with pytest.raises(KeyError) as caught:
                lookup(name)
            assert not isinstance(caught.value, KernelpackError)


# --- torch: devices and models -------------------------------------------------------------
def torch_calls() -> list[tuple[str, Callable[[Path, Any], Any], str]]:
    """Calls that decode with torch on a device, each given a file and the device."""
    def model(torch: Any) -> Any:
        return torch.nn.Conv2d(3, 4, 3, bias=False)

    return [
        ("load", lambda p, d: kernelpack.load(p, device=d), "field 'device'"),
        ("get_tensor", lambda p, d: kernelpack.open(p).get_tensor("w", device=d), "field 'device'"),
        ("verify", lambda p, d: kernelpack.open(p).verify("torch", d), "field 'device'"),
        ("load_model", lambda p, d: kernelpack.load_model(model(pytest.importorskip("torch")), p, device=d),
         "field 'device'"),
    ]


BAD_DEVICES = ["banana", -1, [0], "meta", "cuda:99"]


@pytest.mark.parametrize("device", BAD_DEVICES, ids=map(str, BAD_DEVICES))
@pytest.mark.parametrize("call, needle", [c[1:] for c in torch_calls()], ids=[c[0] for c in torch_calls()])
def test_a_device_this_machine_cannot_decode_on_is_a_kernelpack_error(good: Path, call: Callable, needle: str,
                                                                      device: Any) -> None:
    pytest.importorskip("torch")
    with pytest.raises(KernelpackError, match=needle):
        call(good, device)


@pytest.mark.parametrize("call, needle", [c[1:] for c in torch_calls()], ids=[c[0] for c in torch_calls()])
def test_cuda_without_a_gpu_is_a_kernelpack_error(good: Path, call: Callable, needle: str) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(KernelpackError, match="torch sees no CUDA device"):
        call(good, "cuda")


def test_load_model_refuses_what_is_not_a_module_or_does_not_fit(good: Path) -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(KernelpackError, match="field 'model'"):
        kernelpack.load_model({"w": None}, good)
    with pytest.raises(KernelpackError, match=r"does not fit the model: .*Missing key\(s\)") as caught:
        kernelpack.load_model(torch.nn.Linear(2, 2), good)
    assert caught.value.path == str(good) and "\n" not in str(caught.value)
    with pytest.raises(KernelpackError, match="size mismatch"):  # shapes count even when not strict
        kernelpack.load_model(one_parameter(torch, "w", (5, 3, 3, 3)), good, strict=False)


def one_parameter(torch: Any, name: str, shape: tuple[int, ...]) -> Any:
    """A model holding one parameter, ``name`` of ``shape``."""
    model = torch.nn.Module()
    model.register_parameter(name, torch.nn.Parameter(torch.zeros(shape)))
    return model
