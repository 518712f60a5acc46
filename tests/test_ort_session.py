"""ONNX Runtime out: a session straight from a container (weights decoded once, handed over in
memory), outputs matching the original ONNX or PyTorch model on real inputs, the torch and ORT
runtimes agreeing, providers CUDA-then-CPU with a clean fallback, and no torch on the path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from ocr_inputs import CLS, DET, cls_batch, det_page, ppocr_model

import kernelpack
from kernelpack.forms import DCT, Basis, Dense, Linear, Series
from kernelpack.ort import (DEFAULT_PROVIDERS, GRAPH, WeightRef, check_graph, cuda_device_count, ort_session,
                            usable_providers)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from kernelpack.onnx_io import pack_onnx, torch_graph  # noqa: E402

CPU = ["CPUExecutionProvider"]
NO_GPU = cuda_device_count() == 0


def original(path: str, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(path, providers=CPU).run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def cls_containers(tmp_path_factory) -> dict[str, str]:
    """The PP-OCR direction classifier packed exactly and under the default budget."""
    folder = tmp_path_factory.mktemp("cls")
    paths = {"exact": str(folder / "exact.kpk"), "default": str(folder / "default.kpk")}
    pack_onnx(ppocr_model(CLS), paths["exact"], max_error=None)
    pack_onnx(ppocr_model(CLS), paths["default"])  # max_error 0.01
    return paths


# --- a real ONNX model: file -> container -> ORT session --------------------------------------
def test_exact_container_gives_the_original_classifier_outputs_bit_for_bit(cls_containers):
    x = cls_batch(8)
    out = ort_session(cls_containers["exact"], CPU).run(None, {"x": x})[0]
    ref = original(ppocr_model(CLS), x)
    assert np.array_equal(out, ref)
    assert (ref[:4].argmax(1) == 0).sum() >= 3  # real input: upright lines read as upright


def test_default_budget_classifier_agrees_within_float16_rounding(cls_containers):
    x = cls_batch(8)
    out = ort_session(cls_containers["default"], CPU).run(None, {"x": x})[0]
    ref = original(ppocr_model(CLS), x)
    assert np.abs(out - ref).max() < 5e-3  # probabilities; measured 1.7e-3 (52 weights float16)
    assert np.array_equal(out.argmax(1), ref.argmax(1))


def test_detector_from_a_container_marks_the_same_text(tmp_path):
    """Exact weights: the same map bit for bit. float16 conv weights: the same map up to a few
    pixels on the line's edge (measured: mean |diff| 1.4e-4, max 0.08, 3 of 24576 pixels flip at
    rapidocr's threshold 0.3)."""
    src = ppocr_model(DET)
    exact, half = tmp_path / "det.kpk", tmp_path / "det16.kpk"
    pack_onnx(src, exact, max_error=None, level=3)
    pack_onnx(src, half, forms=lambda name, value: Dense(dtype="float16") if value.ndim == 4 else None,
              max_error=None, level=3)
    x, (rows, cols) = det_page()
    ref = original(src, x)
    assert ref[0, 0, rows, cols].mean() > 0.2 and ref[0, 0, :16].max() < 0.05  # it finds the line
    assert np.array_equal(ort_session(exact, CPU).run(None, {"x": x})[0], ref)
    out = ort_session(half, CPU).run(None, {"x": x})[0]
    assert np.abs(out - ref).mean() < 1e-3 and np.mean((out > 0.3) != (ref > 0.3)) < 1e-3


# --- a PyTorch model: state_dict + exported graph -> container -> torch and ORT runtimes ------
@pytest.fixture(scope="module")
def digits_cnn() -> tuple:
    torch = pytest.importorskip("torch")
    from kernelpack import demo

    x_train, y_train, x_test, y_test = demo.digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 3x faster on a busy 2-core machine (no spinning OpenMP threads)
    try:
        return demo.train(x_train, y_train, epochs=2), x_test, y_test
    finally:
        torch.set_num_threads(threads)


def pack_torch(model, path, forms=None) -> None:
    import torch

    graph = torch_graph(model, torch.zeros(1, 1, 8, 8), input_names=["x"], output_names=["logits"],
                        dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    kernelpack.save(model, path, forms=forms, attachments={GRAPH: graph})


def test_pytorch_model_runs_in_ort_without_its_class(digits_cnn, tmp_path):
    import torch

    model, x, _ = digits_cnn
    pack_torch(model, tmp_path / "cnn.kpk")
    with kernelpack.open(tmp_path / "cnn.kpk") as c:
        refs = {r.name for r in check_graph(c.read_attachment(GRAPH))}
    assert refs == {n for n, p in model.named_parameters()}  # every parameter read from the container
    out = ort_session(tmp_path / "cnn.kpk", CPU).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(out - ref).max() < 1e-4 * np.abs(ref).max()


def test_torch_and_ort_runtimes_agree_on_a_compressed_model(digits_cnn, tmp_path):
    import torch

    from kernelpack import demo

    model, x, y = digits_cnn
    path = tmp_path / "mixed.kpk"
    pack_torch(model, path, forms={"conv1.weight": Series(harmonics=4), "conv2.weight": Basis(bank=16),
                                   "*": Dense(dtype="float16")})
    fresh = demo.make_model().eval()
    kernelpack.load_model(fresh, path)
    with torch.no_grad():
        by_torch = fresh(x).numpy()
    by_ort = ort_session(path, CPU).run(None, {"x": x.numpy()})[0]
    assert np.abs(by_ort - by_torch).max() < 1e-4 * np.abs(by_torch).max()  # measured: 0 on a 2-core x86 CPU
    assert np.array_equal(by_ort.argmax(1), by_torch.argmax(1))
    with torch.no_grad():
        assert np.abs(by_torch - model(x).numpy()).max() > 1e-3  # the forms did change the weights


# --- providers ------------------------------------------------------------------------------
def test_default_providers_are_cuda_then_cpu_and_cpu_is_always_last():
    assert DEFAULT_PROVIDERS == ("CUDAExecutionProvider", "CPUExecutionProvider")
    chosen = usable_providers()
    assert chosen[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in chosen) == (not NO_GPU and "CUDAExecutionProvider" in
                                                   ort.get_available_providers())
    assert usable_providers(["NoSuchExecutionProvider"]) == CPU
    options = ("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})
    assert usable_providers([options]) == [options]


@pytest.mark.skipif(not NO_GPU, reason="checks the fallback on a machine without a GPU")
def test_without_a_gpu_the_default_session_runs_on_cpu_quietly_and_imports_no_torch(
        cls_containers, digits_cnn, tmp_path):
    """In a fresh interpreter where importing torch fails: default sessions (CUDA requested) of
    the classifier and of a CNN in every compressed form start on the CPU without ORT's CUDA
    error, decode with numpy, and give the same outputs as in this process."""
    model, digits, _ = digits_cnn
    every_form = tmp_path / "forms.kpk"
    pack_torch(model, every_form, forms={"conv1.weight": Series(harmonics=4), "conv2.weight": Basis(bank=8),
                                         "fc.weight": Linear(alpha=0.5), "conv2.bias": DCT(keep=0.5)})
    cases = {cls_containers["exact"]: cls_batch(2), str(every_form): digits[:16].numpy()}
    script = textwrap.dedent("""
        import importlib.abc, json, sys
        import numpy as np

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")

        sys.meta_path.insert(0, NoTorch())
        import kernelpack
        answers = {}
        for path, x in json.loads(sys.stdin.read()).items():
            session = kernelpack.ort_session(path)
            feed = {session.get_inputs()[0].name: np.asarray(x, dtype=np.float32)}
            answers[path] = {"providers": session.get_providers(), "out": session.run(None, feed)[0].tolist()}
        print(json.dumps({"answers": answers, "torch": "torch" in sys.modules}))
    """)
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps({p: x.tolist() for p, x in cases.items()}),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["torch"] is False
    assert "CUDA" not in done.stderr and "error" not in done.stderr.lower(), done.stderr
    with kernelpack.open(every_form) as c:
        assert {c.info(n).form for n in c.keys()} == {"series", "basis", "linear", "dct", "dense"}
    for path, x in cases.items():
        answer = result["answers"][path]
        session = ort_session(path, CPU)
        assert answer["providers"] == CPU
        assert np.array_equal(np.asarray(answer["out"], dtype=np.float32),
                              session.run(None, {session.get_inputs()[0].name: x})[0])


# --- the graph's references, read without the onnx package (more in test_graph_safety) --------
def test_weight_references_are_read_from_the_wire_format_as_onnx_reads_them(cls_containers):
    with kernelpack.open(cls_containers["exact"]) as c:
        graph = c.read_attachment(GRAPH)
    model = onnx.load_from_string(graph)
    expected = [WeightRef(t.name, t.data_type, tuple(t.dims)) for t in model.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert check_graph(graph) == expected and len(expected) == 183


# --- CUDA: on-device decode, CUDA provider (skipped without a GPU) -----------------------------
@pytest.mark.cuda
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA device")
def test_cuda_decode_is_bit_identical_and_the_cuda_session_agrees(cls_containers):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    with kernelpack.open(cls_containers["default"]) as c:
        assert all(c.verify("torch", "cuda").values())
    x = cls_batch(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a CUDA provider ORT cannot start: skip below
        session = ort_session(cls_containers["exact"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        pytest.skip(f"onnxruntime could not start CUDA here (runs on {session.get_providers()})")
    out = session.run(None, {"x": x})[0]
    assert np.abs(out - original(ppocr_model(CLS), x)).max() < 1e-4

