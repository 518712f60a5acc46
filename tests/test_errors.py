"""The error contract of the public API: bad input raises KernelpackError, whose message
names the file, tensor or field, and never another exception type (TypeError,
AttributeError, RuntimeError, OSError) from deep inside.

One exception to it, by decision: a tensor name (a str) the container does not hold raises
KeyError, the Mapping convention (``name in c`` asks first); see ``kernelpack.open``. A name
that is not a str is bad input, a KernelpackError.
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


def test_a_name_the_file_lacks_is_a_key_error_and_a_name_not_a_str_is_bad_input(good: Path) -> None:
    with kernelpack.open(good) as c:
        assert "missing" not in c and 3 not in c
        for lookup in (c.get_numpy, c.info, c.encoded):
            with pytest.raises(KeyError) as caught:
                lookup("missing")
            assert not isinstance(caught.value, KernelpackError)
            with pytest.raises(KernelpackError, match="field 'name'"):
                lookup(3)


# --- the forms' encoders: the array they are given ------------------------------------------
NAN = np.array([[1.0, np.nan], [2.0, 3.0]], np.float32)
#: (id, config, array, source dtype, the field and words the message must name)
BAD_ENCODES = [
    ("series-str", Series(), "abc", "float32", "field 'values'.*real numbers"),
    ("dct-str", DCT(), "abc", "float32", "field 'values'.*real numbers"),
    ("dense-none", Dense(), None, "float32", "field 'values'.*real numbers"),
    ("dense-complex", Dense(), np.ones(3, np.complex64), "float32", "field 'values'.*complex64"),
    ("dense-object", Dense(), np.array([object()]), "float32", "field 'values'.*object"),
    ("dense-ragged", Dense(), [[1.0], [1.0, 2.0]], "float32", "field 'values'.*array of numbers"),
    ("dense-dtype-not-the-arrays", Dense(), np.ones(3), "float32", "field 'dtype'.*float64"),
    ("dense-dtype-unknown", Dense(), W, "complex64", "field 'dtype'.*unknown dtype"),
    ("basis-1d", Basis(), np.ones(9), "float32", "field 'shape'.*rank >= 2"),
    ("basis-complex", Basis(), np.ones((2, 3, 3), complex), "float32", "field 'values'.*complex128"),
    ("basis-bank-1d", Basis(bank=np.ones(3)), np.ones((2, 3)), "float32", "field 'bank'.*rank >= 2"),
    ("basis-bank-nan", Basis(bank=np.array([[1.0, np.nan]])), np.ones((2, 2)), "float32",
     "field 'bank'.*NaN or infinity"),
    ("basis-bank-str", Basis(bank=np.array([["a", "b"]])), np.ones((2, 2)), "float32", "field 'bank'.*real numbers"),
    ("series-1d", Series(), np.ones(3), "float32", "field 'shape'.*rank >= 2"),
    ("linear-empty", Linear(), np.ones((0, 3)), "float32", "field 'shape'.*non-empty"),
    ("dct-scalar", DCT(), np.float32(1.0), "float32", "field 'shape'.*rank >= 1"),
    ("linear-nan", Linear(), NAN, "float32", "field 'values'.*linear form cannot fit.*dense form stores them exactly"),
    ("dct-inf", DCT(), np.array([1.0, np.inf]), "float32", "field 'values'.*NaN or infinity"),
    ("series-nan", Series(), np.full((2, 3, 3), np.nan), "float32", "field 'values'.*NaN or infinity"),
    ("basis-nan", Basis(bank=2), np.full((2, 3, 3), np.nan), "float32", "field 'values'.*NaN or infinity"),
    ("dense-float16-overflow", Dense(dtype="float16"), np.array([7e4], np.float32), "float32",
     "field 'dtype'.*70000"),
]


@pytest.mark.parametrize("config, array, dtype, needle", [c[1:] for c in BAD_ENCODES],
                         ids=[c[0] for c in BAD_ENCODES])
def test_an_encoder_refuses_a_bad_array_naming_the_field(config: Any, array: Any, dtype: str, needle: str) -> None:
    with pytest.raises(KernelpackError, match=needle):
        config.encode(array, dtype)


def test_dense_stores_what_the_fitting_forms_refuse() -> None:
    """NaN, infinity, empty and rank-0 tensors are stored exactly by dense, bit for bit."""
    for array in (NAN, np.array([np.inf, -np.inf], np.float32), np.zeros((0, 3), np.float32), np.float32(2.0)):
        stored = Dense().encode(array, "float32").data.data
        assert stored.shape == np.shape(array) and stored.tobytes() == np.asarray(array).tobytes()


def test_save_names_the_file_and_the_tensor_an_encoder_refuses(tmp_path: Path) -> None:
    path = tmp_path / "o.kpk"
    for forms, field in ((Linear(), "values"), (Dense(dtype="float16"), "dtype")):
        with pytest.raises(KernelpackError) as caught:
            kernelpack.save({"w": W, "bad": NAN * 1e5}, path, forms=forms)
        assert (caught.value.path, caught.value.tensor, caught.value.field) == (str(path), "bad", field)
        assert not path.exists()


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


# --- plan and compress_: bad arguments ------------------------------------------------------
def planning(**kwargs: Any) -> Callable[[], Any]:
    """A plan of W with one bad argument (max_error 0.5 unless given)."""
    model = kwargs.pop("model", {"w": W})
    return lambda: kernelpack.plan(model, **{"max_error": 0.5, **kwargs})


BAD_PLANS = [
    ("model-list", planning(model=[W]), "field 'model'"),
    ("model-none", planning(model=None), "field 'model'"),
    ("value-str", planning(model={"w": "abc"}), "tensor 'w', field 'dtype'"),
    ("value-ragged", planning(model={"w": [[1.0], [1.0, 2.0]]}), "tensor 'w', field 'values'"),
    ("no-budget", planning(max_error=None), "field 'budget'"),
    ("max-bytes-str", planning(max_bytes="100"), "field 'max_bytes'"),
    ("max-bytes-float", planning(max_bytes=100.5), "field 'max_bytes'"),
    ("max-bytes-negative", planning(max_bytes=-1), "field 'max_bytes'"),
    ("max-error-str", planning(max_error="0.1"), "field 'max_error'"),
    ("max-error-nan", planning(max_error=float("nan")), "field 'max_error'"),
    ("max-error-bool", planning(max_error=True), "field 'max_error'"),
    ("min-size-str", planning(min_size="64"), "field 'min_size'"),
    ("candidates-int", planning(candidates=3), "field 'candidates'"),
    ("candidates-str", planning(candidates="dense"), "field 'candidates'"),
    ("candidates-hold-an-int", planning(candidates=[Dense(), 3]), "tensor 'w', field 'candidates'"),
    ("candidates-function-gives-int", planning(candidates=lambda name, shape: 3), "tensor 'w', field 'candidates'"),
    ("every-candidate-refuses", planning(model={"w": W * 1e5}, candidates=[Dense(dtype="float16")]),
     "tensor 'w', field 'candidates'.*1 refused.*65504"),
]


@pytest.mark.parametrize("call, needle", [c[1:] for c in BAD_PLANS], ids=[c[0] for c in BAD_PLANS])
def test_bad_plan_arguments_raise_kernelpack_error(call: Callable[[], Any], needle: str) -> None:
    with pytest.raises(KernelpackError, match=needle):
        call()


def compressing(model: Any = None, config: Any = None) -> Callable[[], Any]:
    """A compress_ of LeNet-5 (unless ``model``) with ``config``."""
    def call() -> Any:
        from kernelpack.converters import compress_
        from kernelpack.converters.examples import LeNet5

        return compress_(LeNet5() if model is None else model, config)
    return call


BAD_COMPRESSES = [
    ("model-dict", compressing(model={"w": W}, config=Series()), "field 'model'"),
    ("config-none", compressing(config=None), "field 'config'"),
    ("config-int", compressing(config=3), "field 'config'"),
    ("config-str", compressing(config="series"), "field 'config'"),
    ("config-list", compressing(config=[Series()]), "field 'config'"),
    ("rule-int", compressing(config={"conv1": 3}), "field 'config'.*rule 'conv1' gives 3"),
    ("rule-no-layer-matches-int", compressing(config={"nothing*": "dense"}), "field 'config'.*rule 'nothing\\*'"),
    ("rule-key-int", compressing(config={3: Series()}), "field 'config'.*key"),
    ("rule-bad-setting", compressing(config={"fc1": Series(family="sine")}), "tensor 'fc1.weight', field 'family'"),
]


@pytest.mark.parametrize("call, needle", [c[1:] for c in BAD_COMPRESSES], ids=[c[0] for c in BAD_COMPRESSES])
def test_bad_compress_arguments_raise_kernelpack_error(call: Callable[[], Any], needle: str) -> None:
    pytest.importorskip("torch")
    with pytest.raises(KernelpackError, match=needle):
        call()
