"""Bit-exact decode: every backend and device gives the same bits, those bits are the
spec's fixed-point arithmetic, and they are close to an independent float64 decode.

The fixed-point rule (spec/FORMAT.md): for a reduction of length K, L = ceil(log2 K),
S = min(24, floor((53 - L) / 2)), P = 53 - L - S; the left operand is rounded half to
even onto 2**(e_a - P), the right onto 2**(e_b - S) (e the frexp exponent of the
operand's max magnitude, 0 for an all-zero operand), the integer product is exact, and
the result is that integer times 2**(e_a - P + e_b - S).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.polynomial import chebyshev
from scipy.fft import idctn

import kernelpack
from conftest import (NUMPY, TORCH, any_compressed_case, assert_same_bits, random_array, rel_error,
                      unit_filters, zigzag_by_definition)
from kernelpack._backend import BLAS_ONE_THREAD, MIN_BLOCK_ROWS, TorchOps
from kernelpack._exact import chebyshev_table, cospi, dct_table, fixed_matmul, named_points
from kernelpack.forms import Encoded

# One case per form and option, for the device and thread tests (hypothesis covers the rest).
FORM_CASES: dict[str, tuple[tuple[int, ...], Any]] = {
    "dense": ((5, 3, 3, 3), kernelpack.Dense()),
    "dense-bfloat16": ((5, 3), kernelpack.Dense(dtype="bfloat16")),
    "dct-all": ((16, 8, 3, 3), kernelpack.DCT(keep=0.3)),
    "dct-axes": ((16, 8, 3, 3), kernelpack.DCT(keep=0.5, axes=(0, 2), dtype="bfloat16")),
    "series-cgl": ((32, 8, 5, 5), kernelpack.Series(harmonics=3)),
    "series-mixed": ((8, 4, 5, 3), kernelpack.Series(family="chebyshev", harmonics=(4, 2),
                                                     points=("uniform", [-0.9, 0.1, 0.8]), dtype="float32")),
    "basis-kmeans": ((16, 4, 3, 3), kernelpack.Basis(bank=8)),
    "basis-uint16": ((16, 1, 3, 3), kernelpack.Basis(bank=unit_filters(1, 300, (3, 3)), dtype="bfloat16")),
    "linear": ((32, 8, 3, 3), kernelpack.Linear(alpha=0.5)),
    "linear-low-rank": ((32, 8, 3, 3), kernelpack.Linear(primaries=12, rank=4, dtype="float32")),
}


def form_case(name: str, scale: int = 1) -> Encoded:
    shape, config = FORM_CASES[name]
    return config.encode(random_array(7, (shape[0] * scale, *shape[1:])), "float32")


def bits_of(x: Any) -> np.ndarray:
    a = x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.ascontiguousarray(a).view(np.uint32 if a.itemsize == 4 else np.dtype(f"u{a.itemsize}"))


# --- the fixed-point rule, written out with Python integers ---------------------------
def spec_quantize(x: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    peak = float(np.abs(x).max(initial=0.0))
    if peak == 0.0:
        return np.zeros(x.shape, dtype=object), 0
    e = math.frexp(peak)[1]
    return np.rint(np.ldexp(x, bits - e)).astype(np.int64).astype(object), e


def spec_fixed_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    k = b.shape[0]
    lg = math.ceil(math.log2(k)) if k > 1 else 0
    s = min(24, (53 - lg) // 2)
    p = 53 - lg - s
    qa, ea = spec_quantize(a, p)
    qb, eb = spec_quantize(b, s)
    exact = qa @ qb  # Python integers: no rounding at all
    bound = np.abs(qa) @ np.abs(qb)
    assert bound.size == 0 or max(bound.flat) <= 2**53  # the grids keep every partial sum exact
    return np.ldexp(exact.astype(np.float64), ea - p + eb - s)


def spec_transform(x: np.ndarray, axis: int, table: np.ndarray) -> np.ndarray:
    moved = np.moveaxis(x, axis, -1)
    out = spec_fixed_matmul(moved.reshape(-1, table.shape[0]), table)
    return np.moveaxis(out.reshape(*moved.shape[:-1], table.shape[1]), -1, axis)


def spec_dct(t: Encoded) -> np.ndarray:
    positions = zigzag_by_definition(t.shape, list(t.axes), t.boundary)
    box = [1 + int(positions[:, a].max(initial=0)) if a in t.axes else n for a, n in enumerate(t.shape)]
    x = np.zeros(box)
    x[tuple(positions.T)] = t.coefficients.values()
    for a in t.axes:
        x = spec_transform(x, a, dct_table(t.shape[a], box[a]))
    return x.astype(np.float32)


def spec_series(t: Encoded) -> np.ndarray:
    tx, ty = t.tables()
    x = spec_transform(t.coefficients.values().astype(np.float64), -2, tx)
    return spec_transform(x, -1, ty).astype(np.float32)


def spec_linear(t: Encoded) -> np.ndarray:
    p = t.primaries.spec.shape[0]
    wp = t.primaries.values().astype(np.float64).reshape(p, -1)
    rows = [wp]
    if t.shape[0] > p:
        c = [m.values().astype(np.float64) for m in t.coefficients]
        a = spec_fixed_matmul(c[0], c[1]) if len(c) == 2 else c[0]
        rows.append(spec_fixed_matmul(a.T, wp))
    out = np.empty((t.shape[0], wp.shape[1]))
    out[np.arange(t.shape[0]) if t.order is None else t.order.data] = np.concatenate(rows)
    return out.reshape(t.shape).astype(np.float32)


def spec_basis(t: Encoded) -> np.ndarray:
    g = t.bank.values().astype(np.float64)[t.index.data.astype(np.int64)]
    a, b = (v.values().astype(np.float64).reshape(-1, *[1] * (g.ndim - 1)) for v in (t.a, t.b))
    return (a * g + b).reshape(t.shape).astype(np.float32)  # a * g is exact: no reduction


SPEC: dict[str, Callable[[Encoded], np.ndarray]] = {
    "dct": spec_dct, "series": spec_series, "linear": spec_linear, "basis": spec_basis}


# --- independent float64 decodes (no kernelpack tables) -------------------------------
def reference_table(n_terms: int, points: Any, k: int) -> np.ndarray:
    if points == "cgl" and k > 1:  # T_p(cos(pi i / (k-1))) = cos(p pi i / (k-1))
        return np.cos(np.pi * np.outer(np.arange(n_terms), np.arange(k)) / (k - 1))
    x = {"cgl": [1.0], "uniform": np.linspace(-1.0, 1.0, k) if k > 1 else [0.0]}.get(points, points) \
        if isinstance(points, str) else points
    return chebyshev.chebvander(np.asarray(x, dtype=np.float64), n_terms - 1).T


def reference_dct(t: Encoded) -> np.ndarray:
    x = np.zeros(t.shape)
    x[tuple(zigzag_by_definition(t.shape, list(t.axes), t.boundary).T)] = t.coefficients.values()
    return idctn(x, norm="ortho", axes=t.axes)


def reference_series(t: Encoded) -> np.ndarray:
    (nx, ny), (kh, kw) = t.harmonics, t.shape[-2:]
    tx, ty = reference_table(nx, t.points[0], kh), reference_table(ny, t.points[1], kw)
    return np.einsum("...pq,pi,qj->...ij", t.coefficients.values().astype(np.float64), tx, ty)


def reference_linear(t: Encoded) -> np.ndarray:
    p = t.primaries.spec.shape[0]
    wp = t.primaries.values().astype(np.float64).reshape(p, -1)
    c = [m.values().astype(np.float64) for m in t.coefficients]
    a = c[0] @ c[1] if len(c) == 2 else c[0]
    rows = np.concatenate([wp, a.T @ wp])
    out = np.empty_like(rows)
    out[np.arange(t.shape[0]) if t.order is None else t.order.data] = rows
    return out.reshape(t.shape)


REFERENCE: dict[str, Callable[[Encoded], np.ndarray]] = {
    "dct": reference_dct, "series": reference_series, "linear": reference_linear, "basis": spec_basis}


# --- tests -------------------------------------------------------------------------------
@settings(max_examples=40)
@given(any_compressed_case())
def test_numpy_and_torch_cpu_decode_the_same_bits_and_the_recorded_digest(case: tuple) -> None:
    array, config = case
    encoded = config.encode(array, "float32")
    by_numpy = encoded.decode(NUMPY)
    assert_same_bits(TORCH.to_numpy(encoded.decode(TORCH)), by_numpy)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "t.kpk")
        kernelpack.save({"t": encoded}, path)
        with kernelpack.open(path) as c:
            recorded = c.info("t").digest
            assert recorded == hashlib.sha256(by_numpy.astype("<f4").tobytes()).digest()
            assert c.verify("numpy") == c.verify("torch") == {"t": True}
            assert_same_bits(c.get_tensor("t"), by_numpy)


@settings(max_examples=40)
@given(any_compressed_case())
def test_decode_is_the_spec_fixed_point_arithmetic(case: tuple) -> None:
    array, config = case
    encoded = config.encode(array, "float32")
    assert_same_bits(encoded.decode(NUMPY), SPEC[encoded.form](encoded))


@settings(max_examples=40)
@given(any_compressed_case())
def test_decode_is_close_to_an_independent_float64_decode(case: tuple) -> None:
    """Far below float16 rounding (2**-11): the exact-arithmetic design costs no accuracy."""
    array, config = case
    encoded = config.encode(array, "float32")
    assert rel_error(encoded.decode(NUMPY), REFERENCE[encoded.form](encoded)) < 2**-17


@st.composite
def operands(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    m, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    k = draw(st.integers(1, 80) | st.sampled_from([127, 128, 129, 4096, 65536]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def operand(shape: tuple[int, int]) -> np.ndarray:
        kind = draw(st.sampled_from(["normal", "wide", "zero", "sparse"]))
        if kind == "zero":
            return np.zeros(shape)
        x = rng.standard_normal(shape).astype(np.float32).astype(np.float64)
        if kind == "wide":  # magnitudes across the float32 range, subnormals included
            x = np.ldexp(x, rng.integers(-140, 100, shape)).astype(np.float32).astype(np.float64)
        if kind == "sparse":
            x[rng.random(shape) < 0.8] = 0.0
        return x

    return operand((m, k)), operand((k, n))


@given(operands())
def test_fixed_matmul_is_the_integer_rule(ab: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = ab
    expected = spec_fixed_matmul(a, b)
    for ops in (NUMPY, TORCH):
        got = ops.to_numpy(fixed_matmul(ops, ops.float64(a, "float64"), ops.float64(b, "float64")))
        assert_same_bits(got, expected)


@pytest.mark.parametrize("k, n", [(2, 3), (9, 64), (512, 1)])
def test_products_in_row_blocks_are_the_integer_rule(k: int, n: int) -> None:
    """Tall products run in row blocks (NumpyOps.matmul), the last one short: the same bits
    as the spec's rule on the whole product, signed zeros included."""
    rows = BLAS_ONE_THREAD // (k * n)
    rng = np.random.default_rng(k * n)
    a = rng.standard_normal((3 * rows + 5, k))
    a[rng.random(a.shape) < 0.3] = -0.0
    b = rng.standard_normal((k, n))
    assert rows >= MIN_BLOCK_ROWS and a.shape[0] > rows  # blocks really used
    assert_same_bits(fixed_matmul(NUMPY, a, b), spec_fixed_matmul(a, b))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(FORM_CASES))
def test_cuda_decodes_the_same_bits_as_numpy(tmp_path: os.PathLike, name: str) -> None:
    encoded = form_case(name, scale=4)
    assert_same_bits(TorchOps("cuda").to_numpy(encoded.decode(TorchOps("cuda"))), encoded.decode(NUMPY))
    path = tmp_path / "cuda.kpk"
    kernelpack.save({"t": encoded}, path)
    on_gpu = kernelpack.load(path, device="cuda")["t"]
    assert on_gpu.device.type == "cuda"
    assert_same_bits(on_gpu.cpu().float(), kernelpack.load_numpy(path)["t"])


@pytest.mark.parametrize("name", sorted(FORM_CASES))
def test_decodes_repeat_bit_for_bit_under_any_thread_count(name: str) -> None:
    encoded = form_case(name, scale=8)  # large enough for BLAS to split the work
    first = bits_of(encoded.decode(NUMPY))
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            for _ in range(2):
                np.testing.assert_array_equal(bits_of(encoded.decode(TORCH)), first)
                np.testing.assert_array_equal(bits_of(encoded.decode(NUMPY)), first)
    finally:
        torch.set_num_threads(before)


def cos_pi(num: np.ndarray, den: np.ndarray | int) -> np.ndarray:
    """cos(pi num / den) in long double after an exact reduction of num modulo 2 den."""
    den = np.broadcast_to(np.asarray(den, dtype=np.int64), np.shape(num))
    r = np.mod(num, 2 * den).astype(np.longdouble)
    pi = np.longdouble("3.14159265358979323846264338327950288")
    return np.cos(pi * r / den.astype(np.longdouble)).astype(np.float64)


def test_cospi_agrees_with_cos_for_many_rationals() -> None:
    rng = np.random.default_rng(0)
    den = rng.integers(1, 1000, 200_000)
    num = rng.integers(-5000, 5000, 200_000)
    for d in np.unique(den):
        pick = den == d
        assert np.abs(cospi(num[pick], int(d)) - cos_pi(num[pick], d)).max() <= 1e-15


@pytest.mark.parametrize("den", [1, 2, 3, 4, 6, 7, 12, 180, 1000])
def test_cospi_is_exact_at_quarter_turns_and_symmetric(den: int) -> None:
    n = np.arange(-3 * den, 3 * den + 1)
    assert cospi(np.array([0, den, 2 * den]), den).tolist() == [1.0, -1.0, 1.0]
    assert cospi(np.array([den]), 2 * den)[0] == 0.0
    np.testing.assert_array_equal(cospi(n, den), cospi(-n, den))
    np.testing.assert_array_equal(cospi(n + 2 * den, den), cospi(n, den))
    np.testing.assert_array_equal(cospi(den - n, den), -cospi(n, den))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 64, 1000])
def test_dct_table_is_the_orthonormal_dct_iii(n: int) -> None:
    f, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    expected = np.where(f == 0, np.sqrt(1 / n), np.sqrt(2 / n)) * cos_pi((2 * x + 1) * f, 2 * n)
    table = dct_table(n, n)
    assert np.abs(table - expected).max() <= 1e-15
    assert np.abs(table @ table.T - np.eye(n)).max() < 1e-14
    np.testing.assert_array_equal(dct_table(n, max(1, n // 2)), table[:max(1, n // 2)])


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 16])
def test_point_sets_and_chebyshev_table(k: int) -> None:
    i = np.arange(k)
    cgl = cos_pi(i, k - 1) if k > 1 else np.array([1.0])
    assert np.abs(named_points("cgl", k) - cgl).max() <= 1e-15
    uniform = (2 * i - (k - 1)) / (k - 1) if k > 1 else np.array([0.0])  # one rounded division
    np.testing.assert_array_equal(named_points("uniform", k), uniform)
    x = np.random.default_rng(k).uniform(-1, 1, k)
    np.testing.assert_allclose(chebyshev_table(k + 2, x), chebyshev.chebvander(x, k + 1).T, rtol=0, atol=1e-14)
