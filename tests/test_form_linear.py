"""Form ``linear``: p primary filters stored as they are, the other s = C_out - p filters as
linear combinations W_s = A^T W_p (A of shape (p, s), or A1 A2 of rank r); ``order`` maps
row j of [W_p; W_s] to output filter order[j]."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import kernelpack
from conftest import NUMPY, assert_roundtrip, assert_same_bits, linear_cases, random_array, rel_error, seeds
from kernelpack.forms import LinearTensor
from kernelpack.forms._base import to_stored


def row_order(encoded: LinearTensor) -> np.ndarray:
    """Output filter of each row of [W_p; W_s]."""
    return np.arange(encoded.shape[0]) if encoded.order is None else encoded.order.data.astype(np.int64)


def low_row_rank(seed: int, c_out: int, p: int, rest: tuple[int, ...]) -> np.ndarray:
    """Filters that are all combinations of p of them."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((c_out, p)) @ rng.standard_normal((p, int(np.prod(rest))))).reshape(
        (c_out, *rest)).astype(np.float32)


@given(linear_cases())
def test_file_decodes_to_the_encoders_decode(case: tuple[np.ndarray, kernelpack.Linear]) -> None:
    array, config = case
    encoded, decoded = assert_roundtrip(array, config)
    c_out = array.shape[0]
    p = config.primaries if config.primaries is not None else round(config.alpha * c_out)
    assert encoded.primaries.spec.shape == (p, *array.shape[1:])
    arrays = encoded.arrays()
    if config.rank is None:
        assert arrays["A"].spec.shape == (p, c_out - p) and "A1" not in arrays
    else:
        assert arrays["A1"].spec.shape == (p, config.rank)
        assert arrays["A2"].spec.shape == (config.rank, c_out - p) and "A" not in arrays
    order = row_order(encoded)
    assert sorted(order) == list(range(c_out))
    if "order" in arrays:
        assert arrays["order"].dtype == "int32" and not np.array_equal(order, np.arange(c_out))
    # primaries are copied exactly into their output filters
    assert_same_bits(decoded[order[:p]], encoded.primaries.values().astype(np.float32))


@given(linear_cases(dtype=st.just("float32")))
def test_all_filters_primary_in_float32_is_bit_exact(case: tuple[np.ndarray, kernelpack.Linear]) -> None:
    array, _ = case
    _, decoded = assert_roundtrip(array, kernelpack.Linear(primaries=array.shape[0], dtype="float32"))
    assert_same_bits(decoded, array)


@given(seeds, st.integers(2, 8), st.data())
def test_filters_of_row_rank_p_are_rebuilt(seed: int, c_out: int, data: st.DataObject) -> None:
    """p primaries span all filters: least squares is exact, and so is a full-rank A1 A2."""
    p = data.draw(st.integers(1, c_out - 1))
    rest = data.draw(st.sampled_from([(5,), (3, 3, 3), (2, 2)]))
    array = low_row_rank(seed, c_out, p, rest)
    for rank in (None, min(p, c_out - p)):
        _, decoded = assert_roundtrip(array, kernelpack.Linear(primaries=p, rank=rank, dtype="float32"))
        assert rel_error(decoded, array) < 2**-19  # measured <= 2**-22 (pivoted QR is well conditioned)


@given(linear_cases(dtype=st.just("float32")), seeds)
def test_coefficients_are_the_least_squares_fit(case: tuple[np.ndarray, kernelpack.Linear], seed: int) -> None:
    array, config = case
    config = kernelpack.Linear(primaries=config.primaries, alpha=config.alpha, dtype="float32")
    encoded = config.encode(array, "float32")
    order, p = row_order(encoded), encoded.primaries.spec.shape[0]
    wp = encoded.primaries.values().astype(np.float64).reshape(p, -1)
    ws = array.astype(np.float64).reshape(array.shape[0], -1)[order[p:]]
    a = encoded.coefficients[0].values().astype(np.float64)
    best = float(np.sum((a.T @ wp - ws) ** 2))
    push = np.random.default_rng(seed).standard_normal(a.shape) * 1e-2 * np.abs(a).max(initial=1e-30)
    moved = float(np.sum(((a + push).T @ wp - ws) ** 2))
    scale = float(np.sum(ws**2)) + float(np.sum(wp**2))
    assert moved - best >= 0.5 * float(np.sum((push.T @ wp) ** 2)) - 1e-8 * scale


def test_order_places_rows_worked_example() -> None:
    """primaries [[1, 2]], A = [[2, 3]]: rows [1, 2], [2, 4], [3, 6] are filters 2, 0, 1."""
    encoded = LinearTensor((3, 2), to_stored([[1.0, 2.0]], "float32"), (to_stored([[2.0, 3.0]], "float32"),),
                           to_stored([2, 0, 1], "int32"))
    np.testing.assert_array_equal(encoded.decode(NUMPY), [[2.0, 4.0], [3.0, 6.0], [1.0, 2.0]])


def test_low_rank_coefficients_multiply_out_worked_example() -> None:
    """A = A1 A2 = [[1], [2]] [[1, -1]] = [[1, -1], [2, -2]]; W_s = A^T W_p."""
    encoded = LinearTensor((4, 1), to_stored([[3.0], [5.0]], "float32"),
                           (to_stored([[1.0], [2.0]], "float32"), to_stored([[1.0, -1.0]], "float32")))
    np.testing.assert_array_equal(encoded.decode(NUMPY), [[3.0], [5.0], [13.0], [-13.0]])


def test_no_order_is_stored_when_the_leading_filters_are_the_primaries() -> None:
    """Pivoted QR takes the largest independent filters first: make them rows 0..p-1."""
    rng = np.random.default_rng(3)
    basis = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    leading = basis[:3] * np.array([[100.0], [10.0], [1.0]])
    array = np.concatenate([leading, 0.01 * rng.standard_normal((3, 3)) @ basis[:3]]).astype(np.float32)
    encoded, decoded = assert_roundtrip(array, kernelpack.Linear(primaries=3, dtype="float32"))
    assert "order" not in encoded.arrays()
    assert rel_error(decoded, array) < 2**-20


@given(seeds, st.integers(1, 40), st.integers(1, 40))
def test_primaries_are_picked_as_pivoted_qr_picks_them(seed: int, c_out: int, k: int) -> None:
    """pivot_order (pivoted Cholesky of the Gram matrix) picks the filters in the order of
    scipy's QR with column pivoting, up to the rank (where the picks stop meaning anything)."""
    from scipy.linalg import qr

    from kernelpack.forms.linear import pivot_order

    rows = np.random.default_rng(seed).standard_normal((c_out, k)) * np.geomspace(1, 4, k)
    rank = min(c_out, k)
    np.testing.assert_array_equal(pivot_order(rows)[:rank], qr(rows.T, mode="r", pivoting=True)[1][:rank])


def test_a_zero_filter_is_not_a_primary() -> None:
    array = random_array(5, (4, 2, 3, 3))
    array[0] = 0.0
    encoded, decoded = assert_roundtrip(array, kernelpack.Linear(primaries=3, dtype="float32"))
    assert 0 not in row_order(encoded)[:3]
    assert not decoded[0].any()
