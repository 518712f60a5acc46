"""Output-aware encoders (``config.encode(array, dtype, hessian=H)``, kernelpack.forms._weighted).

Each form, given the second moments H of its layer's inputs, fits the layer's output error
E(W') = trace((W - W') H (W - W')^T); without H its fit is exactly the weight-only one.
Promises checked per form on a random W and a random correlated, ill-conditioned H: E is
at most the weight-only fit's (smaller for correlated H), the file format is unchanged
(save/load gives the fitted weights exactly), quantised codes keep their dtype.
"""

from __future__ import annotations

import numpy as np
import pytest

import kernelpack
from kernelpack import DCT, Basis, Dense, KernelpackError, Linear, Series
from kernelpack._backend import NumpyOps
from kernelpack.forms._weighted import output_error

SHAPE = (24, 6, 3, 3)  # a conv: C_out, C_in, kh, kw; K = 54


def correlated_h(k: int, seed: int = 0, samples: int | None = None) -> np.ndarray:
    """E[x x^T] of inputs mixed by a random map with a fast-decaying spectrum (condition
    number ~1e6), like neighbouring pixels and channels of a real layer; singular when
    ``samples`` < k."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * np.exp(-np.arange(k) / (k / 12))[:, None]
    x = rng.standard_normal((samples or 4 * k, k)) @ mix
    return x.T @ x / len(x)


def weights(shape: tuple[int, ...] = SHAPE, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def decoded(encoded: kernelpack.forms._base.Encoded) -> np.ndarray:
    return np.asarray(encoded.decode(NumpyOps()))


def errors(config, w: np.ndarray, h: np.ndarray) -> tuple[float, float]:
    """(output-aware E, weight-only E) of one config."""
    aware = output_error(w, decoded(config.encode(w, "float32", hessian=h)), h)
    plain = output_error(w, decoded(config.encode(w, "float32")), h)
    return aware, plain


def same_file_bits(encoded_a, encoded_b) -> bool:
    arrays_a, arrays_b = encoded_a.arrays(), encoded_b.arrays()
    return (encoded_a.fields() == encoded_b.fields() and arrays_a.keys() == arrays_b.keys()
            and all(arrays_a[n].dtype == arrays_b[n].dtype and arrays_a[n].step == arrays_b[n].step
                    and arrays_a[n].data.tobytes() == arrays_b[n].data.tobytes() for n in arrays_a))


CONFIGS = {
    "dense-gptq": Dense(rel_step=0.25),
    "linear": Linear(alpha=0.5),
    "linear-quantised": Linear(alpha=0.5, rel_step=0.1),
    "linear-low-rank": Linear(alpha=0.5, rank=4),
    "series": Series(harmonics=2),
    "series-quantised": Series(harmonics=2, rel_step=0.1),
    "basis": Basis(bank=4),
    "basis-quantised": Basis(bank=4, rel_step=0.1),
    "dct": DCT(keep=0.5),
    "dct-quantised": DCT(keep=0.5, rel_step=0.1),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_aware_fit_beats_weight_only_on_correlated_h(name):
    aware, plain = errors(CONFIGS[name], weights(), correlated_h(54))
    assert aware < 0.9 * plain


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_without_hessian_the_fit_is_the_weight_only_one(name):
    w = weights()
    assert same_file_bits(CONFIGS[name].encode(w, "float32", hessian=None), CONFIGS[name].encode(w, "float32"))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_aware_file_round_trips_exactly(name, tmp_path):
    w, h = weights(), correlated_h(54)
    encoded = CONFIGS[name].encode(w, "float32", hessian=h)
    kernelpack.save({"w": encoded}, tmp_path / "m.kp")
    np.testing.assert_array_equal(kernelpack.load_numpy(tmp_path / "m.kp")["w"], decoded(encoded))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_singular_hessian_is_damped(name):
    w, h = weights(), correlated_h(54, samples=20)  # rank 20 < K = 54
    aware, plain = errors(CONFIGS[name], w, h)
    assert np.isfinite(aware) and aware < plain


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_an_identity_hessian_fits_the_weights_at_least_as_well(name):
    """H = I makes E the weight error (damping only scales it): the least-squares fits are the
    weight-only ones, and where the weight-only encoder rounds A or truncates it without
    looking at the primaries, the output-aware one does at least as well."""
    aware, plain = errors(CONFIGS[name], weights(), np.eye(54))
    assert aware <= plain * (1 + 1e-3)


def test_gptq_under_an_identity_hessian_is_round_to_nearest():
    w = weights()
    assert same_file_bits(Dense(rel_step=0.25).encode(w, "float32", hessian=np.eye(54)),
                          Dense(rel_step=0.25).encode(w, "float32"))


@pytest.mark.parametrize("name", ["linear", "linear-quantised", "linear-low-rank"])
def test_more_primaries_than_inputs_is_damped(name):
    """p = 12 primaries of K = 8 inputs: W_p H W_p^T is singular, damped where it is factored."""
    w, h = weights((24, 8, 1, 1)), correlated_h(8)
    aware, plain = errors(CONFIGS[name], w, h)
    assert np.isfinite(aware) and aware <= plain + 1e-6 * output_error(w, 0 * w, h)


def test_gptq_keeps_the_step_and_the_code_dtype_and_beats_round_to_nearest():
    w, h = weights(), correlated_h(54)
    aware = Dense(rel_step=0.25).encode(w, "float32", hessian=h).data
    nearest = Dense(rel_step=0.25).encode(w, "float32").data
    assert (aware.dtype, aware.step) == (nearest.dtype, nearest.step) == ("int8", nearest.step)
    assert int(np.abs(aware.data).max()) <= 127
    assert output_error(w, aware.values(), h) < 0.8 * output_error(w, nearest.values(), h)


def test_gptq_clips_codes_to_the_dtype_round_to_nearest_takes():
    w, h = weights(), correlated_h(54)
    step = float(np.abs(w).max()) / 126.5  # nearest codes just fit int8: feedback may not leave it
    stored = Dense(step=step).encode(w, "float32", hessian=h).data
    assert stored.dtype == "int8" and int(np.abs(stored.data).max()) <= 127


def test_gptq_of_a_grouped_conv_uses_each_groups_h():
    w = weights((8, 1, 3, 3))  # depthwise: 8 groups of one row, K = 9
    h = np.stack([correlated_h(9, seed=g) for g in range(8)])
    aware, plain = errors(Dense(rel_step=0.5), w, h)
    assert aware < plain


def test_gptq_of_a_matmul_weight_uses_its_layout():
    from kernelpack.converters.calibration import LayerStats

    w, h = weights((54, 20)), correlated_h(54)  # ONNX MatMul (K, N): W = w^T
    stats = LayerStats(h[None], np.zeros((1, 54)), 100, 100, "columns", (54, 20))
    aware = Dense(rel_step=0.25).encode(w, "float32", hessian=stats).data.values()
    nearest = Dense(rel_step=0.25).encode(w, "float32").data.values()
    assert stats.output_error(w, aware) < 0.8 * stats.output_error(w, nearest)


def test_float_dense_is_unchanged_by_h():
    w = weights()
    assert same_file_bits(Dense(dtype="float16").encode(w, "float32", hessian=correlated_h(54)),
                          Dense(dtype="float16").encode(w, "float32"))


@pytest.mark.parametrize("config", [Dense(rel_step=0.25), Linear(alpha=0.5)], ids=["dense", "linear"])
@pytest.mark.parametrize("h", [np.eye(53), np.full((54, 54), np.nan), np.zeros((5, 54, 54))],
                         ids=["wrong-k", "nan", "groups-not-dividing"])
def test_a_hessian_that_does_not_fit_is_refused(config, h):
    with pytest.raises(KernelpackError, match="hessian"):
        config.encode(weights(), "float32", hessian=h)


def test_structured_forms_refuse_statistics_of_another_layout():
    from kernelpack.converters.calibration import LayerStats

    stats = LayerStats(np.eye(54)[None], np.zeros((1, 54)), 1, 1, "columns", (54, 20))
    with pytest.raises(KernelpackError, match="layout"):
        Linear(alpha=0.5).encode(weights((54, 20)), "float32", hessian=stats)
