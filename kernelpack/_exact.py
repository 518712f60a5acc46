"""The canonical decode arithmetic: exact integer products in float64.

Floating-point sums differ in the last bit when BLAS or a GPU adds in another
order. kernelpack therefore never sums rounded numbers. Every reduction in a
decode is a *fixed-point matmul* (spec/FORMAT.md, section "Fixed-point
matmul"):

1. both operands are rounded (half to even) onto integer grids scaled by a power
   of two taken from their own largest magnitude, with bit widths chosen from the
   reduction length K so that every product and every partial sum is an integer
   of magnitude at most 2**53;
2. the integer matmul then runs in float64, where such integers are exact, so
   every summation order on every device gives the same bits;
3. the exact result is scaled back by a power of two (exact).

The tables (DCT and Chebyshev bases) are computed here with IEEE-754 basic
operations only (no libm transcendental, whose last bit differs between
machines), in a fixed order, on the CPU in numpy, so they are identical
everywhere.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from functools import lru_cache, wraps
from typing import Any, Callable, Iterable, TypeVar

import numpy as np

from kernelpack._backend import Ops

#: The longest reduction a decode may perform (bounds the grid widths below).
MAX_REDUCTION = 1 << 16


def grid_bits(k: int) -> tuple[int, int]:
    """Bit widths (left P, right S) of the integer grids for a reduction of length ``k``.

    With L = ceil(log2 k), S = min(24, floor((53 - L) / 2)) and P = 53 - L - S, the
    K products of P- and S-bit integers sum to at most 2**(P+S+L) = 2**53.
    """
    if not 1 <= k <= MAX_REDUCTION:
        raise ValueError(f"reduction length {k} outside 1..{MAX_REDUCTION}")
    lg = (k - 1).bit_length()
    s = min(24, (53 - lg) // 2)
    return 53 - lg - s, s


def exponent(peak: float) -> int:
    """The binary exponent e with peak < 2**e (0 for a zero peak)."""
    return math.frexp(peak)[1] if peak > 0.0 else 0


def quantize(ops: Ops, x: Any, bits: int, e: int) -> Any:
    """Round ``x`` half to even onto the grid 2**(e - bits): integers with |q| <= 2**bits.

    The result is C-ordered whatever the layout of ``x`` (a transposed view is copied in
    the same pass).
    """
    return ops.scaled_rint(x, math.ldexp(1.0, bits - e))


def exact_product(ops: Ops, qa: Any, qb: Any, scale_exponent: int) -> Any:
    """The integer matmul (exact in float64, so order-free) scaled back by 2**scale_exponent.

    Adding +0.0 makes every zero +0: a single product 0 * -1 is -0, and BLAS
    libraries differ in whether a sum starts from +0.
    """
    return ops.scale_product(ops.matmul(qa, qb), math.ldexp(1.0, scale_exponent))


def fixed_matmul(ops: Ops, a: Any, b: Any, b_exponent: int | None = None) -> Any:
    """``a @ b`` (float64, 2-D) by the fixed-point rule; identical bits on every device.

    ``b_exponent`` is the grid exponent of the whole right operand when ``b`` is only a
    column block of it (see :func:`transform_axis`); by default it is taken from ``b``.
    """
    p, s = grid_bits(b.shape[0])
    ea = exponent(ops.absmax(a))
    eb = exponent(ops.absmax(b)) if b_exponent is None else b_exponent
    return exact_product(ops, quantize(ops, a, p, ea), quantize(ops, b, s, eb), ea - p + eb - s)


#: Largest table block materialised at once (entries), so decode memory stays bounded: 8 MiB
#: as float64 (the block size never changes the bits: every column is its own product).
TABLE_BLOCK = 1 << 20
Table = Callable[[int, int], np.ndarray]


def table_blocks(k: int, m: int, known_exponent: bool = False) -> tuple[int, int]:
    """How :func:`transform_axis` builds a (k, m) table: (entries of its largest block,
    times each entry is built). A table of at most TABLE_BLOCK entries is built once;
    a longer one in blocks of whole columns, twice (first for its grid exponent) unless
    the exponent is ``known_exponent`` from the table's definition."""
    width = max(1, TABLE_BLOCK // k)
    return (k * m, 1) if m <= width else (k * width, 1 if known_exponent else 2)


def transform_axis(ops: Ops, x: Any, axis: int, table: Table, k: int, m: int,
                   table_exponent: Callable[[], int] | None = None) -> Any:
    """Replace axis ``axis`` of ``x`` (length k) by its contraction with a (k, m) table.

    Equal to ``fixed_matmul(x_moved, table)``; the table comes from ``table(start, stop)``
    in column blocks, so a long axis never needs the whole k x m table in memory. Its grid
    exponent is that of its largest entry: from ``table_exponent()`` when the table's
    definition gives it (then every block is built once), else the maximum over all
    blocks, found in a first pass.
    """
    moved = ops.moveaxis(x, axis, -1)  # a view: quantizing it makes the C-ordered copy
    lead = tuple(moved.shape[:-1])
    p, s = grid_bits(k)
    ea = exponent(ops.absmax(x))
    qx = ops.reshape(quantize(ops, moved, p, ea), (-1, k))  # once, for every block of the table
    block, _ = table_blocks(k, m)
    width = block // k
    if m <= width:  # the usual case: one block, built once
        first = ops.float64(table(0, m), "float64")
        eb = exponent(ops.absmax(first))
        blocks: Iterable[Any] = [first]
    else:  # a long axis: blocks of whole columns, after the grid exponent of them all
        spans = [(lo, min(m, lo + width)) for lo in range(0, m, width)]
        eb = table_exponent() if table_exponent is not None else max(
            exponent(float(np.max(np.abs(table(lo, hi))))) for lo, hi in spans)
        blocks = (ops.float64(table(lo, hi), "float64") for lo, hi in spans)
    parts = [exact_product(ops, qx, quantize(ops, block, s, eb), ea - p + eb - s) for block in blocks]
    out = parts[0] if len(parts) == 1 else ops.concat_last(parts)
    return ops.moveaxis(ops.reshape(out, lead + (m,)), -1, axis)


#: Bytes of decode tables and zigzag indices kept between tensors, and the largest result
#: kept (see :func:`reused`): under the 8 MiB of a table block, so a table built in blocks
#: (a long axis) is never kept whole and a decode's working set stays what it declares.
REUSE_BYTES = 32 << 20
REUSE_LARGEST = 4 << 20
R = TypeVar("R")


def reused(fn: Callable[..., R]) -> Callable[..., R]:
    """``fn`` with its results kept for the next call with the same arguments, the least
    recently used dropped beyond REUSE_BYTES in all (a result over REUSE_LARGEST is never kept).

    Why: the tensors of a model repeat a few shapes (ResNet-18: 21 weights, 6 shapes), and
    rebuilding a DCT table and its zigzag indices for each took a sixth of a dct load. The
    results' arrays are made read-only: every caller only reads them. Thread-safe (the
    whole-file pool decodes tensors in parallel); computing happens outside the lock.
    """
    kept: OrderedDict[tuple, tuple[R, int]] = OrderedDict()
    lock = threading.Lock()
    total = 0

    @wraps(fn)
    def call(*args: Any) -> R:
        nonlocal total
        with lock:
            if args in kept:
                kept.move_to_end(args)
                return kept[args][0]
        result = fn(*args)
        arrays = [a for a in (result if isinstance(result, tuple) else (result,)) if isinstance(a, np.ndarray)]
        size = sum(a.nbytes for a in arrays)
        if size > REUSE_LARGEST:
            return result
        for a in arrays:
            a.flags.writeable = False
        with lock:
            if args not in kept:
                kept[args] = (result, size)
                total += size
            while total > REUSE_BYTES:
                total -= kept.popitem(last=False)[1][1]
        return result

    return call


# --- tables -----------------------------------------------------------------------
# Signed Taylor coefficients (-1)^j / (2j)! and (-1)^j / (2j+1)!, j = 0..12, as float64.
_COS_TERMS = [(-1.0) ** j / math.factorial(2 * j) for j in range(13)]
_SIN_TERMS = [(-1.0) ** j / math.factorial(2 * j + 1) for j in range(13)]


def _horner_even(t: np.ndarray, terms: list[float]) -> np.ndarray:
    """sum_j terms[j] * t**(2j) by Horner's rule in a fixed order (|t| <= pi/4)."""
    t2 = t * t
    acc = np.full_like(t, terms[-1])
    for c in reversed(terms[:-1]):
        acc = acc * t2 + c
    return acc


def cospi(num: np.ndarray, den: int) -> np.ndarray:
    """cos(pi * num / den) for integer ``num`` and ``den`` > 0, reproducible bit for bit.

    The rational argument is reduced exactly in integers to r in [0, 1/4] (cosine)
    or (1/4, 1/2] (sine of 1/2 - r); then t = (r_num / r_den) * PI is evaluated
    with two correctly rounded operations and a fixed Taylor polynomial.
    """
    num = np.asarray(num, dtype=np.int64)
    m = np.mod(2 * num, 4 * den)  # angle in units of pi/(2 den), reduced mod 2 pi
    m = np.where(m > 2 * den, 4 * den - m, m)  # cos is even: m in [0, 2 den]
    negate = m > den  # cos(pi - x) = -cos(x)
    m = np.where(negate, 2 * den - m, m)  # m in [0, den]: angle in [0, pi/2]
    use_sin = 2 * m > den  # angle > pi/4: cos(x) = sin(pi/2 - x)
    m = np.where(use_sin, den - m, m)  # angle in [0, pi/4]
    t = (m.astype(np.float64) / float(2 * den)) * math.pi
    value = np.where(use_sin, _horner_even(t, _SIN_TERMS) * t, _horner_even(t, _COS_TERMS))
    return np.where(negate, -value, value)


def dct_table(n: int, k: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows 0..k-1, columns start..stop-1 of the orthonormal DCT-III synthesis matrix of length n.

    table[f, x] = a_f * cos(pi * (2x + 1) * f / (2n)), a_0 = sqrt(1/n), a_f = sqrt(2/n).
    """
    f = np.arange(k, dtype=np.int64)[:, None]
    x = np.arange(start, n if stop is None else stop, dtype=np.int64)[None, :]
    alpha = np.where(f == 0, np.sqrt(1.0 / n), np.sqrt(2.0 / n))
    return alpha * _cospi_period(n)[((2 * x + 1) * f) % (4 * n)]


@lru_cache(maxsize=64)
def dct_table_exponent(n: int, k: int) -> int:
    """The grid exponent of ``dct_table(n, k)`` (its largest magnitude's), without the table.

    Row 0 is sqrt(1/n) * cospi(0); every other row is sqrt(2/n) times cospi(j, 2n) at the
    residues j = (2x + 1) f mod 4n, whose magnitudes repeat with period 2n. For f with
    g = gcd(f, 2n), the odd multiples of f reach, mod 2n, the odd multiples of g when 2n/g
    is even, else every multiple of g. So the largest entry is one product of the same
    float64 numbers the table multiplies (rounding is monotone), found in O(n) per divisor:
    the same exponent as a pass over the k x n table (tests/test_limits.py checks all
    n < 400 and every k).
    """
    period = _cospi_period(n)
    peak = float(np.sqrt(1.0 / n) * abs(period[0]))
    if k > 1:
        f = np.arange(1, k, dtype=np.int64)
        g = np.gcd(f, 2 * n)
        reached = np.zeros(2 * n, dtype=bool)
        for divisor, odd_only in set(zip(g.tolist(), (((2 * n) // g) % 2 == 0).tolist())):
            reached[divisor::2 * divisor] = True
            if not odd_only:
                reached[::divisor] = True
        peak = max(peak, float(np.max(np.sqrt(2.0 / n) * np.abs(period[:2 * n][reached]))))
    return exponent(peak)


@lru_cache(maxsize=64)
def _cospi_period(n: int) -> np.ndarray:
    """cospi(j, 2n) for j = 0..4n-1: one period, since cospi(num, 2n) depends on num mod 4n."""
    values = cospi(np.arange(4 * n, dtype=np.int64), 2 * n)
    values.flags.writeable = False
    return values


def named_points(name: str, k: int) -> np.ndarray:
    """Sample points in [-1, 1] of a named set: 'cgl' (Chebyshev-Gauss-Lobatto) or 'uniform'."""
    i = np.arange(k, dtype=np.int64)
    if k == 1:
        return np.array([1.0 if name == "cgl" else 0.0])
    if name == "cgl":
        return cospi(i, k - 1)
    if name == "uniform":
        return (2 * i - (k - 1)).astype(np.float64) / float(k - 1)
    raise ValueError(f"unknown point set {name!r}")


def chebyshev_table(n_terms: int, points: np.ndarray) -> np.ndarray:
    """table[p, i] = T_p(x_i) by T_{p+1} = (2x) T_p - T_{p-1}, in float64, in that order."""
    x = np.asarray(points, dtype=np.float64)
    rows = [np.ones_like(x), x.copy()]
    two_x = 2.0 * x
    while len(rows) < n_terms:
        rows.append(two_x * rows[-1] - rows[-2])
    return np.stack(rows[:n_terms]) if n_terms else np.zeros((0, x.size))


# --- zigzag order -----------------------------------------------------------------
def zigzag_positions(shape: tuple[int, ...], axes: tuple[int, ...], boundary: int) -> np.ndarray:
    """The first ``boundary`` multi-indices of ``shape`` in zigzag order, as an (boundary, ndim) array.

    Zigzag order sorts multi-indices by the sum of their components on ``axes``
    (the L1 norm of the frequency index), ties in row-major (C) order. Work and
    memory are proportional to the box that can hold the kept indices, not to the
    whole tensor.
    """
    if boundary == 0:
        return np.zeros((0, len(shape)), dtype=np.int64)
    chosen, box = _zigzag_chosen(shape, axes, boundary)
    return np.stack(np.unravel_index(chosen, box), axis=1).astype(np.int64, copy=False)


def zigzag_scatter(shape: tuple[int, ...], axes: tuple[int, ...],
                   boundary: int) -> tuple[tuple[int, ...], np.ndarray]:
    """Where a decode scatters the kept coefficients: ``(box, flat)``.

    ``box`` is the smallest box holding the first ``boundary`` zigzag indices (on a
    transformed axis, the largest kept index plus one; elsewhere the axis length) and
    ``flat`` their C-order flat indices in it: :func:`zigzag_positions` raveled into
    ``box``, without building the (boundary, ndim) array.
    """
    if boundary == 0:
        return tuple(1 if a in axes else d for a, d in enumerate(shape)), np.zeros(0, dtype=np.int64)
    chosen, candidate_box = _zigzag_chosen(shape, axes, boundary)
    coords = np.unravel_index(chosen, candidate_box)
    box = tuple(int(coords[a].max()) + 1 if a in axes else d for a, d in enumerate(shape))
    return box, (chosen if box == candidate_box else np.ravel_multi_index(coords, box))


#: :func:`zigzag_scatter` and :func:`dct_table` for decodes (read-only results, reused).
decode_scatter = reused(zigzag_scatter)
decode_dct_table = reused(dct_table)


def zigzag_box(shape: tuple[int, ...], axes: tuple[int, ...], boundary: int) -> tuple[int, tuple[int, ...]]:
    """(norm of the last kept index, candidate box) for ``boundary`` > 0: every index of norm
    up to that level lies in the box. From the counts of indices by norm alone, in
    O(sum of the axis lengths), so a reader can cost a decode before it runs it."""
    other = math.prod(shape[a] for a in range(len(shape)) if a not in axes)
    counts = np.ones(1, dtype=np.int64)
    for a in axes:  # count of frequency indices by L1 norm: convolve with a box, in O(n)
        total = np.cumsum(np.concatenate([counts, np.zeros(shape[a] - 1, dtype=np.int64)]))
        counts = total - np.concatenate([np.zeros(shape[a], dtype=np.int64), total[:-shape[a]]])
    level = int(np.searchsorted(np.cumsum(counts) * other, boundary))  # norm of the last kept
    return level, tuple(min(d, level + 1) if a in axes else d for a, d in enumerate(shape))


def _zigzag_chosen(shape: tuple[int, ...], axes: tuple[int, ...],
                   boundary: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The first ``boundary`` (> 0) zigzag indices as flat indices into a candidate box
    (every index of norm up to the last kept one), and that box."""
    ndim = len(shape)
    level, box = zigzag_box(shape, axes, boundary)
    norm = np.zeros(box, dtype=np.int32)  # sums of at most 8 indices < 2**16
    for a in axes:
        norm = norm + np.arange(box[a], dtype=np.int32).reshape([-1 if b == a else 1 for b in range(ndim)])
    flat = norm.reshape(-1)
    candidates = np.flatnonzero(flat <= level)
    keys = flat[candidates]
    if level < 1 << 16:  # numpy sorts 16-bit keys stably by radix: 5-7x faster than int32's merge sort
        keys = keys.astype(np.uint16)
    return candidates[np.argsort(keys, kind="stable")[:boundary]], box
