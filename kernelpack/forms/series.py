"""Form ``series``: each kh x kw kernel slice as a 2-D cosine or Chebyshev series.

From approxconv-cosine-chebyshev-series.txt: w(x, y) = sum_{p<Nx, q<Ny} c[p, q] T_p(x) T_q(y)
sampled at kh x kw points.

Fields: ``family`` ('cosine' or 'chebyshev'), ``harmonics`` [Nx, Ny] (Nx may differ
from Ny), ``points`` [points_x, points_y], each a named set ('cgl', 'uniform') or
an explicit list of float64 x-coordinates in [-1, 1], and the array
``coefficients`` of shape shape[:-2] + [Nx, Ny].

Decision (written into spec/FORMAT.md): the table is T_p(x_i) for both families.
The cosine series at angles theta is the Chebyshev series at x = cos(theta)
(cos(p theta) = T_p(cos theta)), so the paper's cosine series at equispaced points
and its Chebyshev series at Chebyshev-Gauss-Lobatto points are the same table:
the default point set 'cgl' serves both, and ``family`` records which the user
asked for. Other conventions (the authors' code samples cosines on
linspace(0.2 pi, 0.8 pi, k) and Chebyshev on linspace(-1, 1, k)) are explicit
points or 'uniform'.

Encoder: one closed-form least-squares solve for all slices at once
(C = pinv(Tx^T) W pinv(Ty)), not gradient descent. Output-aware (``hessian``,
kernelpack.forms._weighted): H-weighted least squares per row of W, c = (B^T H B)^-1 B^T H w
with B the block map of the tables (:func:`weighted_coefficients`), and quantised
coefficients rounded with error feedback under B^T H B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np

from kernelpack._backend import Ops
from kernelpack._exact import MAX_REDUCTION, chebyshev_table, named_points, transform_axis
from kernelpack.forms._base import (ELEMENT_WORK, FLOAT_DTYPES, TABLE_ENTRY_WORK, ArraySpec, Cost, Encoded,
                                    Quantisable, Stored, encoder_input, need, need_array, need_finite, need_int,
                                    need_only, read_work)
from kernelpack.forms._weighted import feedback_store, hessians, memo, row_groups, spd_solve

NAME = "series"
FAMILIES = ("cosine", "chebyshev")
POINT_SETS = ("cgl", "uniform")
Points = str | Sequence[float]


def check_points(value: Any, field: str, k: int) -> Points:
    """A named point set, or ``k`` finite float x-coordinates in [-1, 1]."""
    if isinstance(value, str):
        need(value in POINT_SETS, field, f"unknown point set {value!r}; known: {POINT_SETS}")
        return value
    need(isinstance(value, (list, tuple)) and len(value) == k, field,
         f"must be one of {POINT_SETS} or a list of {k} floats")
    need(all(isinstance(v, float) and math.isfinite(v) and -1.0 <= v <= 1.0 for v in value), field,
         "explicit points must be floats in [-1, 1]")
    return tuple(value)


#: Operations counted per term of a table's recurrence (a Python step, whatever k is).
TERM_WORK = 4096
#: Tables of at most this many entries are kept for the next tensor that needs them (a model's
#: series layers share a few (terms, points, k)); bigger ones are rebuilt, so the cache stays small.
CACHED_TABLE = 1 << 12


def sample_table(n_terms: int, points: Points, k: int) -> np.ndarray:
    """The (n_terms, k) table T_p(x_i) for a point set (read-only: it may be shared)."""
    if n_terms * k <= CACHED_TABLE:
        return _cached_table(n_terms, points, k)
    return _table(n_terms, points, k)


def _table(n_terms: int, points: Points, k: int) -> np.ndarray:
    x = named_points(points, k) if isinstance(points, str) else np.array(points, dtype=np.float64)
    table = chebyshev_table(n_terms, x)
    table.flags.writeable = False
    return table


@lru_cache(maxsize=256)
def _cached_table(n_terms: int, points: Points, k: int) -> np.ndarray:
    return _table(n_terms, points, k)


@dataclass
class SeriesTensor(Encoded):
    shape: tuple[int, ...]
    family: str
    points: tuple[Points, Points]
    coefficients: Stored

    form = NAME
    FIELDS = frozenset({"family", "harmonics", "points"})

    @property
    def harmonics(self) -> tuple[int, int]:
        nx, ny = self.coefficients.spec.shape[-2:]
        return nx, ny

    def fields(self) -> dict[str, Any]:
        return {"family": self.family, "harmonics": list(self.harmonics),
                "points": [p if isinstance(p, str) else list(p) for p in self.points]}

    def arrays(self) -> dict[str, Stored]:
        return {"coefficients": self.coefficients}

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        (nx, ny), (kh, kw) = self.harmonics, self.shape[-2:]
        return sample_table(nx, self.points[0], kh), sample_table(ny, self.points[1], kw)

    @classmethod
    def check(cls, shape: tuple[int, ...], dtype: str, fields: Mapping[str, Any],
              arrays: Mapping[str, ArraySpec], banks: Mapping[str, ArraySpec]) -> None:
        need(len(shape) >= 2 and min(shape) >= 1, "shape", "must have rank >= 2 and no empty axis")
        need(fields.get("family") in FAMILIES, "family", f"must be one of {FAMILIES}")
        harmonics = fields.get("harmonics")
        need(isinstance(harmonics, (list, tuple)) and len(harmonics) == 2, "harmonics",
             "must be a list [Nx, Ny]")
        nx, ny = (need_int(n, "harmonics", 1, MAX_REDUCTION) for n in harmonics)
        points = fields.get("points")
        need(isinstance(points, (list, tuple)) and len(points) == 2, "points",
             "must be a list [points_x, points_y]")
        check_points(points[0], "points", shape[-2])
        check_points(points[1], "points", shape[-1])
        need_only(arrays, {"coefficients"})
        need_array(arrays, "coefficients", FLOAT_DTYPES, shape[:-2] + (nx, ny), numbers=True)

    @classmethod
    def cost(cls, shape: tuple[int, ...], fields: Mapping[str, Any],
             arrays: Mapping[str, ArraySpec], banks: Mapping[str, ArraySpec]) -> Cost:
        """The two tables (Nx x kh, Ny x kw; each term a Python step of the recurrence, counted
        as TERM_WORK), the first stage (S x Ny x Nx x kh multiply-adds, its result S x Ny x kh)
        and the second (S x kh x Ny x kw)."""
        (nx, ny), (kh, kw) = fields["harmonics"], shape[-2:]
        lead = math.prod(shape[:-2])
        stage = lead * ny * kh
        tables = nx * kh + ny * kw
        largest = max(math.prod(shape), *(a.size for a in arrays.values()), stage)
        # each element widened, moved across axes (a strided copy) and rounded onto a grid per stage
        elements = math.prod(arrays["coefficients"].shape) + stage + math.prod(shape)
        work = (read_work(arrays) + (nx + ny) * TERM_WORK + tables * TABLE_ENTRY_WORK
                + stage * nx + lead * kh * ny * kw + 8 * ELEMENT_WORK * elements)
        return Cost.of(largest, work, max(nx * kh, ny * kw))

    @classmethod
    def build(cls, shape: tuple[int, ...], dtype: str, fields: Mapping[str, Any],
              arrays: Mapping[str, Stored], banks: Mapping[str, Stored]) -> "SeriesTensor":
        need_finite(arrays["coefficients"], "arrays.coefficients")
        points = tuple(check_points(p, "points", k) for p, k in zip(fields["points"], shape[-2:]))
        return cls(shape, fields["family"], points, arrays["coefficients"])  # type: ignore[arg-type]

    def decode(self, ops: Ops) -> Any:
        x = ops.float64(*self.coefficients.numbers())
        for axis, table in zip((-2, -1), self.tables()):
            x = transform_axis(ops, x, len(self.shape) + axis,
                               lambda lo, hi, t=table: t[:, lo:hi], *table.shape)
        return ops.to_float32(x)


@dataclass(frozen=True)
class Series(Quantisable):
    """Encoder settings: ``harmonics`` N or (Nx, Ny); ``points`` a set name for both axes
    or a pair (points_x, points_y) of names or explicit coordinates (default 'cgl');
    ``step``/``rel_step`` quantise the coefficients (:class:`Quantisable`)."""

    family: str = "cosine"
    harmonics: int | tuple[int, int] = 3
    points: str | tuple[Points, Points] = "cgl"
    dtype: str = "float16"

    def encode(self, array: np.ndarray, source_dtype: str = "float32", hessian: Any = None) -> SeriesTensor:
        """``hessian`` (kernelpack.forms._weighted): coefficients fitted to the layer's outputs
        (:func:`weighted_coefficients`), rounded with error feedback when quantised."""
        w = np.asarray(encoder_input(array, NAME, rank=2), dtype=np.float64)  # kernels (..., kh, kw)
        need(self.family in FAMILIES, "family", f"must be one of {FAMILIES}")
        nx, ny = (self.harmonics, self.harmonics) if isinstance(self.harmonics, int) else self.harmonics
        need_int(nx, "harmonics", 1, MAX_REDUCTION)
        need_int(ny, "harmonics", 1, MAX_REDUCTION)
        kh, kw = w.shape[-2:]
        pair = (self.points, self.points) if isinstance(self.points, str) else tuple(self.points)
        need(len(pair) == 2, "points", "must be a point-set name or a pair (points_x, points_y)")
        points = (check_points(_as_field(pair[0]), "points", kh),
                  check_points(_as_field(pair[1]), "points", kw))
        table_x, table_y = sample_table(nx, points[0], kh), sample_table(ny, points[1], kw)
        if hessian is None:
            # W ~= Tx^T C Ty on the last two axes; the least-squares solution is separable.
            coefficients = np.linalg.pinv(table_x.T) @ w @ np.linalg.pinv(table_y)
            stored = self.store(coefficients)
        else:
            need(w.ndim >= 3, "hessian", "an output-aware series fit needs kernels inside the rows of W "
                 f"(rank >= 3), got shape {list(w.shape)}")
            h = hessians(hessian, w.shape, NAME)
            rows, gram = memo("series", (w, h, nx, ny, points),  # shared by the float and quantised variants
                              lambda: weighted_coefficients(w, h, np.kron(table_x.T, table_y.T)))
            stored = feedback_store(self, rows, gram, row_groups(w.shape[0], len(h)), w.shape[:-2] + (nx, ny))
        return SeriesTensor(tuple(w.shape), self.family, points, stored)  # type: ignore[arg-type]


def weighted_coefficients(w: np.ndarray, h: np.ndarray, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The coefficient rows c (shape[0], m * Nx * Ny) minimising the output error, and their
    metric G_g = B^T H_g B per group.

    Row r of W (m kernels of kh * kw, m = prod(shape[1:-2])) is B c_r with B = I_m (x) ``block``,
    ``block`` = Tx^T (x) Ty^T (kh * kw, Nx * Ny); c_r = (B^T H_g B)^-1 B^T H_g w_r, one Cholesky
    per group for all its rows. G_g is built block by block (never B itself)."""
    rows, groups = w.shape[0], len(h)
    f, n = block.shape
    m = math.prod(w.shape[1:]) // f
    half = h.reshape(groups, m, f, m, f) @ block  # H B: (group, i, f1, j, b)
    gram = (half.transpose(0, 1, 3, 4, 2) @ block).transpose(0, 1, 4, 2, 3).reshape(groups, m * n, m * n)
    per_group = w.reshape(groups, rows // groups, m * f)
    rhs = ((per_group @ h).reshape(groups, -1, m, f) @ block).reshape(groups, -1, m * n)
    coefficients = spd_solve(gram, rhs.transpose(0, 2, 1)).transpose(0, 2, 1)
    return coefficients.reshape(rows, m * n), gram


def _as_field(points: Points) -> Points:
    """Explicit points as a tuple of Python floats (the header stores float64 exactly)."""
    return points if isinstance(points, str) else tuple(float(v) for v in points)
