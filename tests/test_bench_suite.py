"""The benchmark suite's own arithmetic: methods produce what they claim, targets compare fairly.

``benchmarks/suite.py`` writes BENCHMARKS.md; these tests run its kernelpack methods and its
target logic on a small linear "model" (no wheels, no peers needed), so a wrong comparison
cannot reach the report unnoticed.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest

from benchmark_modules import load

@pytest.fixture(scope="module")
def suite():
    return load("suite")


def tiny_model() -> SimpleNamespace:
    """A 3x3-conv-shaped weight, a matrix and a bias; score = agreement of a fixed linear read-out."""
    rng = np.random.default_rng(0)
    weights = {"conv.weight": rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
               "fc.weight": rng.standard_normal((10, 64)).astype(np.float32),
               "fc.bias": rng.standard_normal(10).astype(np.float32)}
    x = rng.standard_normal((200, 64)).astype(np.float32)
    reference = np.argmax(x @ weights["fc.weight"].T + weights["fc.bias"], axis=1)

    def score(w):
        return float(np.mean(np.argmax(x @ w["fc.weight"].T + w["fc.bias"], axis=1) == reference))

    def runner(w):
        return lambda: x @ w["fc.weight"].T

    return SimpleNamespace(name="tiny", weights=weights, score=score, runner=runner, metric="label agreement",
                           task_data=None, calibration_desc="")


def test_kernelpack_methods_round_trip_and_measure(suite, tmp_path):
    model = tiny_model()
    results = {m.name: suite.evaluate(model, m, str(tmp_path), repeats=1)
               for m in suite.kernelpack_methods(quick=True)}
    exact = results["kpk dense f32"]
    assert exact.error == 0 and exact.score == 1.0 and not exact.lossy
    assert results["kpk dense f16"].bytes < exact.bytes
    assert 0 < results["kpk dense f16"].error < 1e-3
    coarse, fine = results["kpk q0.2"], results["kpk q0.05"]
    assert coarse.bytes < fine.bytes < exact.bytes and fine.error < coarse.error
    assert 0.2 / np.sqrt(12) * 0.8 < coarse.error < 0.2 / np.sqrt(12) * 1.2  # uniform quantiser, rel. to RMS
    assert "series" in results["kpk series N=3"].forms and "basis" in results["kpk basis 16"].forms
    for r in results.values():
        assert r.decode_mbs > 0 and r.infer_ratio > 0


def result(suite, method, family, nbytes, score):
    return suite.Result("m", method, family, True, nbytes, 0.0, score, 0.0, 1.0)


def test_matched_takes_nncodec_smallest_at_least_as_good(suite):
    rows = [result(suite, "nn a", "NNCodec", 1000, 0.99), result(suite, "nn b", "NNCodec", 600, 0.95),
            result(suite, "nn c", "NNCodec", 400, 0.90), result(suite, "kpk x", "kernelpack", 300, 0.96),
            result(suite, "kpk y", "kernelpack", 200, 0.80)]
    ours, theirs, bound = suite.matched(rows)
    # x (0.96) needs NNCodec a (1000 B, the smallest scoring >= 0.96): 3.33x; y (0.80) needs c (400 B),
    # only 2x, and NNCodec never went below 0.90 so that would be an upper bound anyway
    assert (ours.method, theirs.method, bound) == ("kpk x", "nn a", False)
    rows[-1] = result(suite, "kpk y", "kernelpack", 100, 0.80)
    ours, theirs, bound = suite.matched(rows)
    assert (ours.method, theirs.method, bound) == ("kpk y", "nn c", True)


def test_smallest_at_level_ignores_worse_scores(suite):
    rows = [result(suite, "kpk a", "kernelpack", 100, 0.98), result(suite, "kpk b", "kernelpack", 300, 0.995)]
    assert suite.smallest(rows, suite.is_ours, 0.99).method == "kpk b"
    assert suite.smallest(rows, suite.is_ours, 0.999) is None


def test_pareto_front_keeps_only_undominated_points(suite):
    points = [(100, 0.5), (200, 0.9), (150, 0.4), (300, 0.85), (400, 0.95), (200, 0.7)]
    assert suite.pareto(points) == [(100, 0.5), (200, 0.9), (400, 0.95)]


def test_bracket_finds_where_the_score_crosses_a_level(suite):
    scores = {-50: 1.0, -44: 0.999, -38: 0.995, -32: 0.97, -26: 0.9}
    assert suite.bracket(sorted(scores), scores, 0.99) == [(-38, -32)]
    assert suite.bracket(sorted(scores), scores, 0.999) == [(-44, -38)]
    assert suite.bracket(sorted(scores), scores, 0.5) == []  # never crossed: nothing to refine


def test_issue12_table_takes_the_smallest_reaching_each_level(suite):
    model = tiny_model()
    model.calibration_desc = "8 inputs"
    rows = [result(suite, "nncodec qp-44", "NNCodec", 900, 0.9995), result(suite, "nncodec qp-38", "NNCodec", 600, 0.992),
            result(suite, "nncodec qp-32", "NNCodec", 400, 0.95), result(suite, "kpk calibrated 0.01", suite.CALIBRATED, 300, 0.991),
            result(suite, "int8/ch + zstd", "int8/ch + zstd", 700, 0.99)]
    rows[3].forms = "dense+series"
    for r in rows:
        r.model = "tiny"
    text = "\n".join(suite.issue12([model], rows, None))
    assert "| tiny | label agreement | 600 | 300 | 2.00 | kpk calibrated 0.01: 300 | 2.00 | yes | series |" in text
    assert "| NNCodec at 99.9% | nncodec qp-44 | 900 |" in text
    assert "kpk calibrated 0.01 | 300 | 0.9910 (best; none reaches 99.9%)" in text
    assert "not available" in "\n".join(suite.issue12([model], rows, "kernelpack.plan has no calibration parameter"))


def test_quick_run_writes_the_report_and_figures(suite, tmp_path, monkeypatch):
    """The --quick CLI end to end on the smallest real model, the calibrated entry replaced by
    its 'not available' line (its plans take a minute; tests/test_plan covers them)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("matplotlib")
    for package in ("rapidocr_onnxruntime", "skimage", "zipnn", "nncodec"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"needs {package}")
    monkeypatch.setattr(suite, "calibrated_missing", lambda: "skipped in this test")
    methods = suite.kernelpack_methods
    monkeypatch.setattr(suite, "kernelpack_methods", lambda quick: methods(quick)[:3])  # dense f32, f16, plan
    out = tmp_path / "BENCHMARKS.md"
    suite.main(["--quick", "--models", "PP-OCR cls", "--no-load-to-ready", "--repeats", "1",
                "--out", str(out), "--figures", str(tmp_path / "figures")])
    text = out.read_text()
    assert "**Calibrated plan: not available** (skipped in this test)" in text
    assert "| PP-OCR cls | label agreement |" in text and "nncodec qp-38" in text and "int8/ch + zstd" in text
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {
        "agreement_vs_bytes.png", "agreement_vs_bytes_99.png", "decode_throughput.png"}
