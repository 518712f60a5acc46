"""The benchmark suite's own arithmetic: methods produce what they claim, targets compare fairly.

``benchmarks/suite.py`` writes BENCHMARKS.md; these tests run its kernelpack methods and its
target logic on a small linear "model" (no wheels, no peers needed), so a wrong comparison
cannot reach the report unnoticed.
"""

from __future__ import annotations

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
                           task_data=None)


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
