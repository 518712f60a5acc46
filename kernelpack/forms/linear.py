"""Form ``linear``: a layer's filters as p primaries plus linear combinations of them.

From linearconv.txt: W = [W_p; W_s] with W_s = A^T W_p, A (p x s); optionally low
rank, A = A1 A2 with A1 (p x r), A2 (r x s). Filters are the slices along axis 0
(output channels / output features).

Fields: the arrays ``primaries`` (p, *shape[1:]), either ``A`` (p, s) or ``A1``
(p, r) and ``A2`` (r, s), where s = shape[0] - p, and an optional ``order``
(int32, shape[0]): row j of [W_p; W_s] is output filter order[j]. Without
``order`` the primaries come first (a layer trained as LinearConv); layers
converted after training store the permutation their primaries were picked with.

Decode: A = A1 A2 (fixed-point matmul, K = r) when low rank; W_s = A^T W_p
(fixed-point matmul, K = p); primaries are copied exactly.

Encoder: primaries by QR with column pivoting of the filter matrix (the most
linearly independent filters first), A by least squares against the *stored*
(rounded) primaries, and a truncated SVD of A for the low-rank variant.

Output-aware (``hessian``, kernelpack.forms._weighted): the pivoted QR runs on the rows
W L (H = L L^T, so their Gram matrix is W H W^T), the primaries are rounded with error
feedback when quantised, A^T = W_s H W_p^T (W_p H W_p^T)^-1 by Cholesky (per group of a
grouped layer), quantised A rounded with error feedback under W_p H W_p^T, and the low-rank
A1 A2 truncated in that metric (``Linear._factor``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from kernelpack._backend import Ops
from kernelpack._exact import MAX_REDUCTION, fixed_matmul
from kernelpack.forms._base import (ELEMENT_WORK, FLOAT_DTYPES, ArraySpec, Cost, Encoded, Quantisable, Stored,
                                    encoder_input, need,
                                    need_array, need_finite, need_int, need_only, read_work, to_stored)
from kernelpack.forms._weighted import (cholesky, feedback_store, grouped_rows, hessians, memo, row_groups,
                                        spd_solve)

NAME = "linear"


@dataclass
class LinearTensor(Encoded):
    shape: tuple[int, ...]
    primaries: Stored
    coefficients: tuple[Stored, ...]  # (A,) or (A1, A2)
    order: Stored | None = None

    form = NAME
    INDEX_ARRAYS = frozenset({"order"})

    @classmethod
    def describe(cls, fields: Mapping[str, Any], arrays: Mapping[str, ArraySpec]) -> list[str]:
        """p (primaries) and, for a low-rank A1 A2, its rank."""
        rank = [f"rank={arrays['A1'].shape[1]}"] if "A1" in arrays else []
        return [f"p={arrays['primaries'].shape[0]}", *rank]

    def fields(self) -> dict[str, Any]:
        return {}

    def arrays(self) -> dict[str, Stored]:
        names = ("A",) if len(self.coefficients) == 1 else ("A1", "A2")
        arrays = {"primaries": self.primaries, **dict(zip(names, self.coefficients))}
        if self.order is not None:
            arrays["order"] = self.order
        return arrays

    @classmethod
    def check(cls, shape: tuple[int, ...], dtype: str, fields: Mapping[str, Any],
              arrays: Mapping[str, ArraySpec], banks: Mapping[str, ArraySpec]) -> None:
        need(len(shape) >= 2 and min(shape) >= 1, "shape", "must have rank >= 2 and no empty axis")
        need_only(arrays, {"primaries", "A", "A1", "A2", "order"})
        primaries = need_array(arrays, "primaries", FLOAT_DTYPES, numbers=True)
        p = primaries.shape[0] if primaries.shape else 0
        need(primaries.shape[1:] == shape[1:] and 1 <= p <= min(shape[0], MAX_REDUCTION),
             "arrays.primaries.shape", f"must be [p, {', '.join(map(str, shape[1:]))}] with "
             f"1 <= p <= {min(shape[0], MAX_REDUCTION)}, got {list(primaries.shape)}")
        s = shape[0] - p
        if "A" in arrays:
            for low_rank in ("A1", "A2"):  # the first of them beside A is named
                need(low_rank not in arrays, f"arrays.{low_rank}", "is not allowed beside arrays.A "
                     "(A, or A1 and A2)")
            need_array(arrays, "A", FLOAT_DTYPES, (p, s), numbers=True)
        else:
            a1 = need_array(arrays, "A1", FLOAT_DTYPES, numbers=True)
            r = a1.shape[1] if len(a1.shape) == 2 else 0
            need(len(a1.shape) == 2 and a1.shape[0] == p and 1 <= r <= MAX_REDUCTION,
                 "arrays.A1.shape", f"must be [{p}, r] with 1 <= r <= {MAX_REDUCTION}")
            need_array(arrays, "A2", FLOAT_DTYPES, (r, s), numbers=True)
        if "order" in arrays:
            need_array(arrays, "order", ("int32",), (shape[0],))

    @classmethod
    def cost(cls, shape: tuple[int, ...], fields: Mapping[str, Any],
             arrays: Mapping[str, ArraySpec], banks: Mapping[str, ArraySpec]) -> Cost:
        """Plus A = A1 A2 (p x r x s multiply-adds, p x s elements) of the low-rank variant and
        W_s = A^T W_p (s x p x the filter size)."""
        p, rows = arrays["primaries"].shape[0], shape[0]
        s, filt = rows - p, math.prod(shape[1:])
        r = arrays["A1"].shape[1] if "A1" in arrays else 0
        largest = max(math.prod(shape), *(a.size for a in arrays.values()), p * s)
        work = read_work(arrays) + p * r * s + s * p * filt + 2 * ELEMENT_WORK * (math.prod(shape) + p * s)
        return Cost.of(largest, work, product=max(r * s, p * filt))

    @classmethod
    def build(cls, shape: tuple[int, ...], dtype: str, fields: Mapping[str, Any],
              arrays: Mapping[str, Stored], banks: Mapping[str, Stored]) -> "LinearTensor":
        names = ("A",) if "A" in arrays else ("A1", "A2")
        for name in ("primaries",) + names:
            need_finite(arrays[name], f"arrays.{name}")
        order = arrays.get("order")
        if order is not None:
            in_range = bool(np.all((order.data >= 0) & (order.data < shape[0])))
            need(in_range and bool(np.all(np.bincount(order.data, minlength=1) == 1)), "arrays.order",
                 f"must be a permutation of 0..{shape[0] - 1}")
        return cls(shape, arrays["primaries"], tuple(arrays[n] for n in names), order)

    def decode(self, ops: Ops) -> Any:
        p = self.primaries.data.shape[0]
        primaries = ops.reshape(ops.float64(*self.primaries.numbers()), (p, -1))
        parts = [primaries]
        if self.shape[0] > p:
            a = [ops.float64(*c.numbers()) for c in self.coefficients]
            coeff = fixed_matmul(ops, a[0], a[1]) if len(a) == 2 else a[0]
            parts.append(fixed_matmul(ops, ops.transpose2(coeff), primaries))
        order = None if self.order is None else np.asarray(self.order.data, dtype=np.int64)
        return ops.reshape(ops.rows_float32(parts, order), self.shape)  # stored row i is filter order[i]


@dataclass(frozen=True)
class Linear(Quantisable):
    """Encoder settings: ``alpha`` the share of primaries (or ``primaries`` p), ``rank`` r of A.

    ``pivot=False`` takes the first p filters as the primaries (no ``order`` stored), as a
    layer trained as LinearConv from scratch has them. ``step``/``rel_step`` quantise the
    primaries, then A (or A1 and A2), fitted against the stored primaries (:class:`Quantisable`).
    """

    alpha: float = 0.5
    primaries: int | None = None
    rank: int | None = None
    dtype: str = "float16"
    pivot: bool = True

    def encode(self, array: np.ndarray, source_dtype: str = "float32", hessian: Any = None) -> LinearTensor:
        """``hessian`` (kernelpack.forms._weighted): fit the layer's outputs instead of its weights."""
        w = np.asarray(encoder_input(array, NAME, rank=2), dtype=np.float64)  # filters (C_out, ...)
        c_out = w.shape[0]
        p = self.primaries if self.primaries is not None else round(self.alpha * c_out)
        need_int(p, "primaries", 1, min(c_out, MAX_REDUCTION))
        filters = w.reshape(c_out, -1)
        h = None if hessian is None else hessians(hessian, w.shape, NAME)
        groups = None if h is None else row_groups(c_out, h.shape[0])
        if self.pivot:
            pivots = memo("pivots", (filters, h), lambda: pivot_order(
                filters if h is None else _whitened(filters, h, groups)))
            chosen = np.concatenate([pivots[:p], np.sort(pivots[p:])])
        else:
            chosen = np.arange(c_out)
        if h is None:
            primaries = self.store(filters[chosen[:p]].reshape((p,) + w.shape[1:]))
            wp = primaries.values().astype(np.float64).reshape(p, -1)
            a = spd_solve(wp @ wp.T, wp @ filters[chosen[p:]].T)  # (p, s): normal equations, Cholesky
            coefficients = self._factor(a)
        else:
            primaries = feedback_store(self, filters[chosen[:p]], h, groups[chosen[:p]], (p,) + w.shape[1:])
            wp = primaries.values().astype(np.float64).reshape(p, -1)
            coefficients = self._weighted_coefficients(wp, filters[chosen[p:]], h, groups[chosen[p:]])
        identity = np.array_equal(chosen, np.arange(c_out))
        order = None if identity else to_stored(chosen, "int32")
        return LinearTensor(tuple(w.shape), primaries, coefficients, order)

    def _weighted_coefficients(self, wp: np.ndarray, ws: np.ndarray, h: np.ndarray,
                               groups: np.ndarray) -> tuple[Stored, ...]:
        """A against H: column j of A (secondary j, of group g) solves G_g a = W_p H_g w_j^T with
        G_g = W_p H_g W_p^T, one Cholesky per group, so that a_j minimises its output error
        (a_j - a)^T G_g (a_j - a). Quantised A is rounded by error feedback under G_g; the
        low-rank A1 A2 is the truncation optimal under the mean metric of the secondaries
        (exact for one group), rounded to nearest."""
        p, s = wp.shape[0], ws.shape[0]
        projected = wp @ h  # W_p H_g, (groups, p, K)
        gram = projected @ wp.T  # G_g = W_p H_g W_p^T
        a = grouped_rows(lambda stack: np.swapaxes(spd_solve(gram, projected @ np.swapaxes(stack, 1, 2)), 1, 2),
                         ws, groups, len(gram)).T  # every group's secondaries in one batched solve
        if self.rank is not None:
            counts = np.bincount(groups, minlength=len(gram))
            metric = np.einsum("g,gpq->pq", counts / max(s, 1), gram) if s else np.eye(p)
            return self._factor(a, cholesky(metric[None])[0])
        stored = feedback_store(self, np.ascontiguousarray(a.T), gram, groups)  # rows: the secondaries
        return (Stored(np.ascontiguousarray(stored.data.T), stored.dtype, stored.step),)

    def _factor(self, a: np.ndarray, low: np.ndarray | None = None) -> tuple[Stored, ...]:
        """A, or A1 A2: the truncated SVD of A, or with ``low`` (L of a metric G = L L^T on A's
        columns) the rank-r A' minimising trace((A - A')^T G (A - A')): A' = L^-T [L^T A]_r."""
        if self.rank is None:
            return (self.store(a),)
        need_int(self.rank, "rank", 1, MAX_REDUCTION)
        u, sv, vt = np.linalg.svd(a if low is None else low.T @ a, full_matrices=False)
        if low is not None:
            from scipy.linalg import solve_triangular

            u = solve_triangular(low.T, u, lower=False)
        r = self.rank
        if r > len(sv):  # A has fewer singular values than asked: pad with zeros
            u = np.pad(u, ((0, 0), (0, r - len(sv))))
            vt = np.pad(vt, ((0, r - len(sv)), (0, 0)))
            sv = np.pad(sv, (0, r - len(sv)))
        root = np.sqrt(sv[:r])
        return self.store(u[:, :r] * root), self.store(root[:, None] * vt[:r])


def pivot_order(rows: np.ndarray) -> np.ndarray:
    """The rows in the order QR with column pivoting of ``rows.T`` picks them (each the row with
    the largest norm orthogonal to those before it), by pivoted Cholesky of their Gram matrix
    ``rows rows^T`` (LAPACK pstrf): the same picks in exact arithmetic, made by blocked matrix
    products, where QR with column pivoting is half matrix-vector products. Measured on
    ResNet-50's weights (benchmarks/README.md, ``pack.py``): 2.2 s for all 54 on one core by
    QR, 64 s on two BLAS threads while another process kept a core busy. Rows beyond the rank
    (more filters than inputs) follow in the order pstrf leaves them: any of them adds nothing."""
    from scipy.linalg.lapack import dpstrf

    _, piv, _, info = dpstrf(rows @ rows.T, lower=1)
    need(info >= 0, "values", "pivoted Cholesky of the filters' Gram matrix failed")
    return piv - 1  # LAPACK counts from 1


def _whitened(filters: np.ndarray, h: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Rows w_j L_g (H_g = L_g L_g^T): their inner products are the output-error metric, so
    pivoted QR on them picks the primaries that best span the secondaries' outputs."""
    factors = cholesky(h)
    out = np.empty_like(filters)
    for g in np.unique(groups):
        mine = groups == g
        out[mine] = filters[mine] @ factors[g]
    return out
