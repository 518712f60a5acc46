"""Form ``dct``: a tensor as its orthonormal DCT-II coefficients, zigzag-truncated.

From frequency-regularization.txt: parameters live in the DCT domain and the
high-frequency tail is dropped; the N-D inverse DCT (DCT-III) rebuilds them.

Fields: ``axes`` (the transformed axes, ascending; all by default), ``boundary``
(how many coefficients are kept) and the array ``coefficients`` (the first
``boundary`` coefficients in zigzag order: ascending L1 norm of the frequency
index over ``axes``, ties in row-major order). Decode: scatter the coefficients,
then apply the orthonormal DCT-III along each transformed axis in ascending
order with the fixed-point matmul (spec/FORMAT.md).

Output-aware (``hessian``, kernelpack.forms._weighted): the kept coefficients by
H-weighted least squares, conjugate gradients warm-started from the weight-only fit
(:func:`weighted_coefficients`); quantised ones are rounded to nearest.

Normalisation: orthonormal (``scipy.fft.dctn(norm='ortho')``). The paper drops
the T0/2 term of its DCT-III and lets training absorb the scale; an orthonormal
pair makes ``encode`` an exact inverse of ``decode`` up to truncation and lets
trained-in-DCT tensors be packed as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from kernelpack._backend import Ops
from kernelpack._exact import (MAX_REDUCTION, dct_table_exponent, decode_dct_table, decode_scatter, table_blocks,
                              transform_axis, zigzag_box, zigzag_positions)
from kernelpack.forms._base import (ELEMENT_WORK, FLOAT_DTYPES, TABLE_ENTRY_WORK, ArraySpec, Cost, Encoded,
                                    Quantisable, Stored, encoder_input, need, need_array, need_finite, need_int,
                                    need_only, read_work)
from kernelpack.forms._weighted import hessians

NAME = "dct"


def check_axes(value: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``axes`` is a strictly ascending list of valid axes, each at most MAX_REDUCTION long."""
    need(isinstance(value, (list, tuple)) and len(value) >= 1, "axes", "must be a non-empty list")
    axes = tuple(need_int(a, "axes", 0, max(len(shape) - 1, 0)) for a in value)
    need(all(x < y for x, y in zip(axes, axes[1:])), "axes", "must be strictly ascending")
    for a in axes:
        need(shape[a] <= MAX_REDUCTION, "axes", f"axis {a} has length {shape[a]} > {MAX_REDUCTION}")
    return axes


@dataclass
class DCTTensor(Encoded):
    shape: tuple[int, ...]
    axes: tuple[int, ...]
    coefficients: Stored

    form = NAME
    FIELDS = frozenset({"axes", "boundary"})

    @property
    def boundary(self) -> int:
        return self.coefficients.spec.size

    def fields(self) -> dict[str, Any]:
        return {"axes": list(self.axes), "boundary": self.boundary}

    def arrays(self) -> dict[str, Stored]:
        return {"coefficients": self.coefficients}

    @classmethod
    def check(cls, shape: tuple[int, ...], dtype: str, fields: Mapping[str, Any],
              arrays: Mapping[str, ArraySpec], banks: Mapping[str, ArraySpec]) -> None:
        need(len(shape) >= 1 and min(shape) >= 1, "shape", "must have rank >= 1 and no empty axis")
        check_axes(fields.get("axes"), shape)
        boundary = need_int(fields.get("boundary"), "boundary", 0, math.prod(shape))
        need_only(arrays, {"coefficients"})
        need_array(arrays, "coefficients", FLOAT_DTYPES, (boundary,), numbers=True)

    @classmethod
    def cost(cls, shape: tuple[int, ...], fields: Mapping[str, Any],
             arrays: Mapping[str, ArraySpec], banks: Mapping[str, ArraySpec]) -> Cost:
        """The zigzag over the candidate box (indices, a sort), then per transformed axis a
        contraction of the current box with its (k, n) table: rows x k x n multiply-adds and
        the table's entries (built twice when it is longer than a block)."""
        boundary, axes = fields["boundary"], tuple(fields["axes"])
        box = zigzag_box(shape, axes, boundary)[1] if boundary else tuple(1 if a in axes else d
                                                                            for a, d in enumerate(shape))
        size = math.prod(box)
        largest = max(math.prod(shape), boundary * len(shape), size)
        work = read_work(arrays) + ELEMENT_WORK * (size * (2 + size.bit_length()) + math.prod(shape))
        current, block = list(box), 0
        for a in axes:
            k, n = current[a], shape[a]
            entries, passes = table_blocks(k, n, known_exponent=True)
            work += math.prod(current) * (n + 2 * ELEMENT_WORK) + passes * k * n * TABLE_ENTRY_WORK
            block = max(block, entries)
            current[a] = n
            largest = max(largest, math.prod(current))
        return Cost.of(largest, work, block, product=block)  # the table block is each product's right operand

    @classmethod
    def build(cls, shape: tuple[int, ...], dtype: str, fields: Mapping[str, Any],
              arrays: Mapping[str, Stored], banks: Mapping[str, Stored]) -> "DCTTensor":
        need_finite(arrays["coefficients"], "arrays.coefficients")
        return cls(shape, tuple(fields["axes"]), arrays["coefficients"])

    def decode(self, ops: Ops) -> Any:
        # Box holding every kept index: its extent K along a transformed axis is the
        # reduction length of that axis's stage (it fixes the grid widths).
        box, flat = decode_scatter(self.shape, self.axes, self.boundary)
        values = ops.float64(*self.coefficients.numbers())
        x = ops.reshape(ops.scatter(math.prod(box), flat, values), box)
        for a in self.axes:
            n, k = self.shape[a], box[a]
            x = transform_axis(ops, x, a, lambda lo, hi, n=n, k=k: decode_dct_table(n, k, lo, hi), k, n,
                               lambda n=n, k=k: dct_table_exponent(n, k))
        return ops.to_float32(x)


@dataclass(frozen=True)
class DCT(Quantisable):
    """Encoder settings: keep a fraction ``keep`` of the coefficients, or exactly ``boundary``.

    ``axes=None`` transforms every axis (the paper's N-D frequency regularisation).
    ``step``/``rel_step`` quantise the kept coefficients (:class:`Quantisable`).
    """

    keep: float | None = 0.25
    boundary: int | None = None
    axes: Sequence[int] | None = None
    dtype: str = "float16"

    def encode(self, array: np.ndarray, source_dtype: str = "float32", hessian: Any = None) -> DCTTensor:
        """``hessian`` (kernelpack.forms._weighted): the kept coefficients fitted to the layer's
        outputs (:func:`weighted_coefficients`); they are rounded to nearest."""
        from scipy.fft import dctn

        x = np.asarray(encoder_input(array, NAME, rank=1), dtype=np.float64)
        shape = tuple(x.shape)
        axes = check_axes(tuple(range(x.ndim)) if self.axes is None
                          else sorted(a % x.ndim for a in self.axes), shape)
        boundary = self.boundary_for(x.size)
        spectrum = dctn(x, type=2, norm="ortho", axes=axes)
        positions = zigzag_positions(shape, axes, boundary)
        kept = spectrum[tuple(positions.T)]
        if hessian is not None:
            kept = weighted_coefficients(x, hessians(hessian, shape, NAME), axes, tuple(positions.T), kept)
        return DCTTensor(shape, axes, self.store(kept))

    def boundary_for(self, size: int) -> int:
        """How many coefficients a tensor of ``size`` elements keeps: ``boundary``, else ``keep``."""
        if self.boundary is not None:
            return need_int(self.boundary, "boundary", 0, size)
        need(self.keep is not None and 0.0 <= self.keep <= 1.0, "keep", "must be in [0, 1]")
        return max(1, min(size, round(self.keep * size)))


#: Conjugate-gradient iterations of the output-aware fit (fixed: the same numbers every run). On
#: PP-OCR cls's layers 16 steps reach the 32-step output error to within 0.1% (8 within 3%).
CG_ITERATIONS = 16


def weighted_coefficients(w: np.ndarray, h: np.ndarray, axes: tuple[int, ...], kept: tuple[np.ndarray, ...],
                          start: np.ndarray) -> np.ndarray:
    """The kept coefficients c minimising trace((W - W(c)) H (W - W(c))^T), W(c) the inverse DCT
    of c scattered at ``kept``: the normal equations P^T D H_op D^T P c = P^T D H_op W (D the
    orthonormal N-D DCT, H_op right-multiplication of each row group by H_g) are one
    boundary x boundary system, solved by CG_ITERATIONS steps of conjugate gradients with the
    fast transforms as operator, from ``start`` (the weight-only fit). Each step costs one dctn,
    one idctn and one (rows x K x K) product. Every step lowers the damped objective, so E is
    never above the weight-only fit's."""
    from scipy.fft import dctn, idctn

    shape, groups = w.shape, len(h)

    def weighted(x: np.ndarray) -> np.ndarray:  # rows of each group times H_g
        return (x.reshape(groups, -1, h.shape[-1]) @ h).reshape(shape)

    def operator(c: np.ndarray) -> np.ndarray:
        spectrum = np.zeros(shape)
        spectrum[kept] = c
        return dctn(weighted(idctn(spectrum, type=2, norm="ortho", axes=axes)), type=2, norm="ortho", axes=axes)[kept]

    c = np.array(start, dtype=np.float64)
    residual = dctn(weighted(w), type=2, norm="ortho", axes=axes)[kept] - operator(c)
    direction = residual.copy()
    power = float(residual @ residual)
    for _ in range(CG_ITERATIONS):
        if power <= 0:
            break
        image = operator(direction)
        curvature = float(direction @ image)
        if curvature <= 0:
            break
        alpha = power / curvature
        c += alpha * direction
        residual -= alpha * image
        new_power = float(residual @ residual)
        direction = residual + (new_power / power) * direction
        power = new_power
    return c
