"""Form ``dct``: orthonormal DCT-II coefficients of chosen axes, the first ``boundary``
of them in zigzag order (ascending index sum over the axes, ties row-major)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.fft import dctn

import kernelpack
from conftest import (NUMPY, assert_roundtrip, dct_cases, random_array, rel_error, seeds, small_shape,
                      zigzag_by_definition)
from kernelpack._exact import zigzag_positions


@st.composite
def shapes_and_axes(draw: st.DrawFn) -> tuple[tuple[int, ...], list[int]]:
    shape = draw(small_shape(1, 4))
    return shape, draw(st.sets(st.integers(0, len(shape) - 1), min_size=1).map(sorted))


@given(dct_cases())
def test_file_decodes_to_the_encoders_decode(case: tuple[np.ndarray, kernelpack.DCT]) -> None:
    array, config = case
    encoded, _ = assert_roundtrip(array, config)
    axes = list(range(array.ndim)) if config.axes is None else sorted(config.axes)
    assert encoded.fields()["axes"] == axes
    stored = encoded.coefficients
    assert stored.dtype == config.dtype and stored.spec.shape == (encoded.boundary,)
    if config.boundary is not None:
        assert encoded.boundary == config.boundary
    else:  # keep is a fraction of the element count, at least one coefficient
        assert encoded.boundary == max(1, round(config.keep * array.size))


@given(shapes_and_axes(), seeds)
def test_keeping_everything_in_float32_is_lossless(shape_axes: tuple, seed: int) -> None:
    shape, axes = shape_axes
    array = random_array(seed, shape)
    _, decoded = assert_roundtrip(array, kernelpack.DCT(keep=1.0, axes=axes, dtype="float32"))
    assert rel_error(decoded, array) < 2**-21  # measured <= 1.7e-7 = 2**-22.5


@given(dct_cases(dtype=st.just("float32")))
def test_truncation_error_is_the_energy_of_the_dropped_coefficients(case: tuple) -> None:
    """Orthonormal transform (Parseval): the decode is the projection onto the kept
    zigzag prefix, so its squared error is the dropped coefficients' squared sum."""
    array, config = case
    encoded, decoded = assert_roundtrip(array, config)
    axes = encoded.fields()["axes"]
    spectrum = dctn(array.astype(np.float64), norm="ortho", axes=axes)
    kept = np.zeros(array.shape, dtype=bool)
    kept[tuple(zigzag_by_definition(array.shape, axes, encoded.boundary).T)] = True
    dropped = float(np.sum(spectrum[~kept] ** 2))
    error = float(np.sum((decoded.astype(np.float64) - array) ** 2))
    assert abs(error - dropped) <= 1e-6 * float(np.sum(array.astype(np.float64) ** 2))


@given(shapes_and_axes(), st.data())
def test_zigzag_order_is_index_sum_then_row_major(shape_axes: tuple, data: st.DataObject) -> None:
    shape, axes = shape_axes
    boundary = data.draw(st.integers(0, math.prod(shape)))
    np.testing.assert_array_equal(zigzag_positions(shape, tuple(axes), boundary),
                                  zigzag_by_definition(shape, axes, boundary))


@pytest.mark.parametrize("shape, axes, expected", [
    ((3, 3), (0, 1), [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (2, 0), (1, 2), (2, 1), (2, 2)]),
    # only axis 1 counts; the other axes run in row-major order within a level
    ((2, 3, 2), (1,), [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (0, 1, 0), (0, 1, 1), (1, 1, 0)]),
    # level = i + k; axis 1 (j) is not transformed
    ((2, 2, 3), (0, 2), [(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 0, 0), (1, 1, 0),
                         (0, 0, 2), (0, 1, 2)]),
])
def test_zigzag_worked_examples(shape: tuple, axes: tuple, expected: list) -> None:
    np.testing.assert_array_equal(zigzag_positions(shape, axes, len(expected)), expected)


def test_stored_coefficients_are_the_orthonormal_spectrum_in_zigzag_order() -> None:
    array = random_array(1, (3, 3))
    encoded = kernelpack.DCT(keep=1.0, dtype="float32").encode(array, "float32")
    spectrum = dctn(array.astype(np.float64), norm="ortho")
    order = [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (2, 0), (1, 2), (2, 1), (2, 2)]
    np.testing.assert_array_equal(encoded.coefficients.values(),
                                  np.array([spectrum[i] for i in order], dtype=np.float32))


def test_one_coefficient_is_the_mean() -> None:
    """a_0 = sqrt(1/n) per axis: the DC coefficient of a constant tensor c is c * sqrt(size)."""
    array = np.full((3, 4, 2), 1.5, dtype=np.float32)
    encoded, decoded = assert_roundtrip(array, kernelpack.DCT(boundary=1, dtype="float32"))
    assert encoded.coefficients.values()[0] == pytest.approx(1.5 * math.sqrt(24), rel=1e-7)
    assert rel_error(decoded, array) < 2**-22


def test_boundary_zero_decodes_to_zeros() -> None:
    encoded, decoded = assert_roundtrip(random_array(2, (4, 5)), kernelpack.DCT(boundary=0))
    assert encoded.fields()["boundary"] == 0
    assert not decoded.any()


def test_negative_axes_are_stored_as_ascending_positive_axes() -> None:
    encoded = kernelpack.DCT(axes=(-1, 0)).encode(random_array(3, (2, 3, 4)), "float32")
    assert encoded.fields()["axes"] == [0, 2]
    assert encoded.decode(NUMPY).shape == (2, 3, 4)
