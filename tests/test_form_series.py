"""Form ``series``: every (kh, kw) kernel slice as sum_{p<Nx, q<Ny} c[p, q] T_p(x_i) T_q(y_j),
with T_p(x) the Chebyshev polynomial (cos(p theta) = T_p(cos theta)) at named or explicit points."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kernelpack
from conftest import (NUMPY, assert_roundtrip, assert_same_bits, random_array, rel_error, seeds,
                      series_cases)
from kernelpack.forms import SeriesTensor
from kernelpack.forms._base import to_stored


def synthesize(coefficients: np.ndarray, table_x: np.ndarray, table_y: np.ndarray) -> np.ndarray:
    """W[..., i, j] = sum_pq C[..., p, q] Tx[p, i] Ty[q, j] in float64."""
    return np.einsum("...pq,pi,qj->...ij", coefficients, table_x, table_y)


def single_term(shape: tuple[int, int], p: int, q: int, points: tuple) -> np.ndarray:
    """The decode of one coefficient c[p, q] = 1 (float32 storage holds 1 exactly)."""
    c = np.zeros((p + 1, q + 1))
    c[p, q] = 1.0
    return SeriesTensor(shape, "cosine", points, to_stored(c, "float32")).decode(NUMPY)


@given(series_cases())
def test_file_decodes_to_the_encoders_decode(case: tuple[np.ndarray, kernelpack.Series]) -> None:
    array, config = case
    encoded, _ = assert_roundtrip(array, config)
    nx, ny = (config.harmonics,) * 2 if isinstance(config.harmonics, int) else config.harmonics
    points = [config.points] * 2 if isinstance(config.points, str) else list(config.points)
    assert encoded.fields() == {"family": config.family, "harmonics": [nx, ny], "points": points}
    assert encoded.coefficients.spec.shape == array.shape[:-2] + (nx, ny)
    assert encoded.coefficients.dtype == config.dtype


@given(series_cases(dtype=st.just("float32"), full=True))
def test_as_many_harmonics_as_samples_interpolates(case: tuple[np.ndarray, kernelpack.Series]) -> None:
    """N = k in float32: lossless up to storage rounding amplified by the tables' conditioning."""
    array, config = case
    encoded, decoded = assert_roundtrip(array, config)
    cond = math.prod(np.linalg.cond(t) for t in encoded.tables())
    assert rel_error(decoded, array) < 4 * 2**-24 * cond  # measured <= 1.9 * 2**-24 * cond


def test_default_points_interpolate_tightly() -> None:
    array = random_array(4, (8, 4, 3, 5))
    _, decoded = assert_roundtrip(array, kernelpack.Series(harmonics=(3, 5), dtype="float32"))
    assert rel_error(decoded, array) < 2**-21


@given(series_cases(dtype=st.just("float32")), seeds)
def test_encoder_is_the_least_squares_fit(case: tuple[np.ndarray, kernelpack.Series], seed: int) -> None:
    """No perturbation of the stored coefficients fits better, and an independent solver
    (lstsq of the Kronecker system) fits no better."""
    array, config = case
    encoded = config.encode(array, "float32")
    tx, ty = encoded.tables()
    w = array.astype(np.float64)
    c = encoded.coefficients.values().astype(np.float64)
    scale = float(np.sum(w**2))
    best = float(np.sum((synthesize(c, tx, ty) - w) ** 2))

    push = np.random.default_rng(seed).standard_normal(c.shape) * 1e-2 * np.abs(c).max()
    moved = float(np.sum((synthesize(c + push, tx, ty) - w) ** 2))
    assert moved - best >= 0.5 * float(np.sum(synthesize(push, tx, ty) ** 2)) - 1e-8 * scale

    system = np.kron(tx.T, ty.T)  # vec(W_slice) = kron(Tx^T, Ty^T) vec(C_slice)
    slices = w.reshape(-1, tx.shape[1] * ty.shape[1]).T
    solved = np.linalg.lstsq(system, slices, rcond=None)[0]
    independent = float(np.sum((system @ solved - slices) ** 2))
    assert best <= independent * (1 + 1e-6) + 1e-10 * scale


def test_cosine_and_chebyshev_families_share_one_table() -> None:
    """cos(p theta) = T_p(cos theta): the family is recorded, the numbers are the same."""
    array = random_array(5, (3, 2, 5, 5))
    cosine = kernelpack.Series(family="cosine", harmonics=4).encode(array, "float32")
    chebyshev = kernelpack.Series(family="chebyshev", harmonics=4).encode(array, "float32")
    assert (cosine.fields()["family"], chebyshev.fields()["family"]) == ("cosine", "chebyshev")
    assert_same_bits(cosine.coefficients.data, chebyshev.coefficients.data)
    assert_same_bits(cosine.decode(NUMPY), chebyshev.decode(NUMPY))


@pytest.mark.parametrize("shape, p, q", [((3, 5), 2, 1), ((7, 7), 6, 0), ((4, 4), 3, 3), ((2, 6), 1, 5)])
def test_cgl_points_give_cosines_at_equispaced_angles(shape: tuple[int, int], p: int, q: int) -> None:
    kh, kw = shape
    expected = np.outer(np.cos(p * np.pi * np.arange(kh) / (kh - 1)),
                        np.cos(q * np.pi * np.arange(kw) / (kw - 1)))
    assert np.abs(single_term(shape, p, q, ("cgl", "cgl")) - expected).max() < 2**-22


def test_uniform_points_are_evenly_spaced_from_minus_one_to_one() -> None:
    ramp = single_term((5, 1), 1, 0, ("uniform", "uniform"))[:, 0]
    np.testing.assert_array_equal(ramp, [-1.0, -0.5, 0.0, 0.5, 1.0])


def test_a_single_sample_sits_at_one_for_cgl_and_zero_for_uniform() -> None:
    assert single_term((1, 1), 1, 0, ("cgl", "cgl"))[0, 0] == 1.0
    assert single_term((1, 1), 1, 0, ("uniform", "uniform"))[0, 0] == 0.0


def test_explicit_points_are_chebyshev_polynomial_arguments(tmp_path: os.PathLike) -> None:
    """T_2(x) = 2x^2 - 1 at the caller's points, which the header keeps as exact float64."""
    xs, ys = [0.1, -0.7, 0.3], [1.0, 0.0]
    decoded = single_term((3, 2), 2, 0, (tuple(xs), tuple(ys)))
    np.testing.assert_allclose(decoded, np.repeat(2 * np.square(xs)[:, None] - 1, 2, axis=1), atol=2**-22)

    path = tmp_path / "points.kpk"
    array = random_array(6, (2, 3, 2))
    saved = kernelpack.save({"w": array}, path, forms={"w": kernelpack.Series(harmonics=(2, 2), points=(xs, ys))})
    with kernelpack.open(path) as c:
        assert c.info("w").fields["points"] == [xs, ys]
        assert_same_bits(c.get_numpy("w"), saved["w"].decode(NUMPY))
