"""Form ``basis``: every filter slice is a * g + b for one filter g of a shared bank.

From few-unique-filters.txt: depthwise (or ordinary) filters replaced by the
closest linear transformation of one filter of a small bank.

Fields: ``bank`` (the name of a bank stored once in the container, shape
(n, *filter_shape), shared by any number of tensors), and the arrays ``index``
(uint8 or uint16, one bank index per slice), ``a`` and ``b`` (one scale and one
offset per slice). A slice is a trailing block of the tensor shaped like a bank
filter; for a (C_out, C_in, kh, kw) convolution there are C_out * C_in slices.
Decode: W[s] = a[s] * bank[index[s]] + b[s] in float64 (a * g is exact: two
24-bit significands), then rounded to float32. No reduction, so no grid.

Encoder: the paper's normalisation trick. With bank filters centred and scaled
to unit norm (g^), the best a for a slice f is <g^, f> and b = mean(f); one
matrix product scores every slice against every filter and the largest |a| wins.
Since the stored bank is rounded, a and b are then re-solved by least squares
against the stored filter. Banks come from the caller or from k-means of the
tensor's own normalised slices. Output-aware (``hessian``, kernelpack.forms._weighted): the
filter and (a, b) of each slice minimise its error under the diagonal block of H for its
input channel (:func:`weighted_fit_slices`; cross-channel terms ignored); a and b are
rounded to nearest.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from kernelpack._backend import Ops
from kernelpack.forms._base import (FLOAT_DTYPES, ArraySpec, Encoded, Quantisable, Stored, encoder_input, need,
                                    need_array, need_dtype, need_finite, need_name, need_only, to_stored)
from kernelpack.forms._weighted import hessians, memo

NAME = "basis"
INDEX_DTYPES = ("uint8", "uint16")
MAX_BANK = 1 << 16


def check_bank(spec: ArraySpec, name: str) -> None:
    """A bank holds numbers: float16, bfloat16, float32, or int8/int16 codes with a ``step``.
    A reader checks every bank when it opens a file, whether a tensor names it or not
    (spec/FORMAT.md, section 5, step 4), and each ``basis`` tensor checks its own."""
    need_dtype(spec, f"banks.{name}", FLOAT_DTYPES, numbers=True)


def check_bank_values(bank: Stored, name: str) -> None:
    """A bank's numbers are finite: checked once when a reader reads the bank, not by every
    tensor that uses it (a bank of 2**27 numbers shared by 100 tensors was checked 100 times)."""
    need_finite(bank, f"banks.{name}")


@dataclass
class BasisTensor(Encoded):
    shape: tuple[int, ...]
    bank_name: str
    bank: Stored
    index: Stored
    a: Stored
    b: Stored

    form = NAME
    FIELDS = frozenset({"bank"})
    INDEX_ARRAYS = frozenset({"index"})

    @classmethod
    def bank_of(cls, fields: Mapping[str, Any]) -> str | None:
        return fields.get("bank")

    def fields(self) -> dict[str, Any]:
        return {"bank": self.bank_name}

    def arrays(self) -> dict[str, Stored]:
        return {"index": self.index, "a": self.a, "b": self.b}

    def banks(self) -> dict[str, Stored]:
        return {self.bank_name: self.bank}

    @classmethod
    def check(cls, shape: tuple[int, ...], dtype: str, fields: Mapping[str, Any],
              arrays: Mapping[str, ArraySpec], banks: Mapping[str, ArraySpec]) -> None:
        name = fields.get("bank")
        need(isinstance(name, str) and name in banks, "bank", f"names no bank of this file: {name!r}")
        bank = banks[name]
        check_bank(bank, name)
        filt = bank.shape[1:]
        need(len(shape) >= len(filt) and tuple(shape[len(shape) - len(filt):]) == filt, "shape",
             f"must end with the bank's filter shape {list(filt)}")
        need(min(shape) >= 1, "shape", "must have no empty axis")
        slices = (math.prod(shape[:len(shape) - len(filt)]),)
        need_only(arrays, {"index", "a", "b"})
        need_array(arrays, "index", INDEX_DTYPES, slices)
        need_array(arrays, "a", FLOAT_DTYPES, slices, numbers=True)
        need_array(arrays, "b", FLOAT_DTYPES, slices, numbers=True)

    @classmethod
    def build(cls, shape: tuple[int, ...], dtype: str, fields: Mapping[str, Any],
              arrays: Mapping[str, Stored], banks: Mapping[str, Stored]) -> "BasisTensor":
        bank = banks[fields["bank"]]
        index = arrays["index"]
        need(index.data.size == 0 or int(index.data.max()) < bank.data.shape[0], "arrays.index",
             f"holds a bank index >= the bank size {bank.data.shape[0]}")
        need_finite(arrays["a"], "arrays.a")
        need_finite(arrays["b"], "arrays.b")
        return cls(shape, fields["bank"], bank, index, arrays["a"], arrays["b"])

    def decode(self, ops: Ops) -> Any:
        # The chosen filters are gathered from the stored bank before they are widened: a bank
        # shared by many tensors is never widened whole per tensor (the same bits: widening and
        # dequantising are elementwise).
        n_slices = self.index.data.shape[0]
        chosen = self.bank.rows(self.index.data.astype(np.intp))
        filters = ops.reshape(ops.float64(*chosen.numbers()), (n_slices, -1))
        a = ops.reshape(ops.float64(*self.a.numbers()), (n_slices, 1))
        b = ops.reshape(ops.float64(*self.b.numbers()), (n_slices, 1))
        weights = filters * a  # exact in float64 (two 24-bit significands)
        weights += b  # in place: the one rounding of the float64 sum, no second temporary
        return ops.to_float32(ops.reshape(weights, self.shape))


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm (constant rows become zero)."""
    centred = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1, keepdims=True)
    return np.divide(centred, norm, out=np.zeros_like(centred), where=norm > 0)


#: k-means runs on at most this many slices (a seeded uniform sample of the rest): the
#: clustering's cost is linear in the slices, and 2^14 points place 64 centroids in 9 or 49
#: dimensions as well as 2^18 do, while a 512 x 512 x 3 x 3 layer took 2 s per bank (the
#: ResNet-50 plan spent half its time there). Every slice is still fitted to the bank.
KMEANS_SAMPLES = 1 << 14


def kmeans_bank(slices: np.ndarray, n_filters: int, seed: int = 0) -> np.ndarray:
    """A bank of ``n_filters`` normalised filters: k-means (k-means++ start) of normalised slices
    (at most :data:`KMEANS_SAMPLES` of them, drawn with ``seed``).

    Sign is folded first (a may be negative), so f and -f land in one cluster.
    """
    from scipy.cluster.vq import kmeans2

    if len(slices) > KMEANS_SAMPLES:
        pick = np.random.default_rng(seed).choice(len(slices), KMEANS_SAMPLES, replace=False)
        slices = slices[np.sort(pick)]
    unit = normalize_rows(slices)
    peak = np.argmax(np.abs(unit), axis=1)
    unit = unit * np.sign(unit[np.arange(len(unit)), peak])[:, None]
    k = min(n_filters, len(unit))
    centroids, _ = kmeans2(unit, k, minit="++", seed=seed)
    return normalize_rows(centroids)


@dataclass(frozen=True)
class Basis(Quantisable):
    """Encoder settings.

    ``bank``: an int builds a bank of that many filters by k-means of the tensor's
    own slices; an array (n, *filter_shape) is a bank given by the caller, shared by
    every tensor that uses the same array. ``bank_name`` names it in the file
    (default: derived from its contents). ``step``/``rel_step`` quantise the bank, then
    ``a`` and ``b`` (fitted against the stored bank) (:class:`Quantisable`).
    """

    bank: int | np.ndarray = 16
    bank_name: str | None = None
    dtype: str = "float16"
    seed: int = 0

    def encode(self, array: np.ndarray, source_dtype: str = "float32", hessian: Any = None) -> BasisTensor:
        """``hessian`` (kernelpack.forms._weighted): slices fitted to the layer's outputs
        (:func:`weighted_fit_slices`); the k-means bank stays the weight-only one."""
        # A given bank is (n, *filter_shape); a k-means bank's filters are the kernels (kh, kw).
        given = None if isinstance(self.bank, (int, np.integer)) else np.asarray(
            encoder_input(self.bank, NAME, rank=2, field="bank"), np.float64)
        w = np.asarray(encoder_input(array, NAME, rank=2 if given is None else given.ndim - 1), np.float64)
        filt = given.shape[1:] if given is not None else w.shape[-2:]
        need(tuple(w.shape[w.ndim - len(filt):]) == tuple(filt), "shape",
             f"tensor shape {list(w.shape)} does not end with the filter shape {list(filt)}")
        slices = w.reshape(-1, math.prod(filt))
        if given is None:
            need(1 <= int(self.bank) <= MAX_BANK, "bank", f"bank size must be in [1, {MAX_BANK}]")
            unit_bank = memo("kmeans", (slices, int(self.bank), self.seed),  # one bank for every variant
                             lambda: kmeans_bank(slices, int(self.bank), self.seed))
        else:
            need(1 <= len(given) <= MAX_BANK, "bank", f"bank size must be in [1, {MAX_BANK}]")
            unit_bank = normalize_rows(given.reshape(len(given), -1))
        bank = self.store(unit_bank.reshape((-1,) + tuple(filt)))
        stored_bank = bank.values().astype(np.float64).reshape(len(unit_bank), -1)
        if hessian is None:
            index, a, b = fit_slices(slices, stored_bank)
        else:
            need(w.ndim > len(filt), "hessian", "an output-aware basis fit needs slices inside the rows of W "
                 f"(rank > the filter's), got shape {list(w.shape)}")
            index, a, b = weighted_fit_slices(slices, stored_bank, hessians(hessian, w.shape, NAME))
        name = need_name(self.bank_name or content_name(bank), "bank")
        idx_dtype = "uint8" if len(unit_bank) <= 256 else "uint16"
        return BasisTensor(tuple(w.shape), name, bank, to_stored(index, idx_dtype), self.store(a), self.store(b))


def content_name(bank: Stored) -> str:
    """The default name of a bank: from its stored bytes (and step), so equal banks share one entry."""
    step = b"" if bank.step is None else np.float64(bank.step).tobytes() + (b"dq" if bank.dq else b"")
    return "bank-" + hashlib.sha256(bank.data.tobytes() + step).hexdigest()[:16]


def fit_slices(slices: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closest a * g + b for every slice (rows) over every bank filter g (rows).

    Choice of g by the normalisation trick (one matmul), then exact least squares
    for a and b against the chosen stored filter.
    """
    scores = slices @ normalize_rows(bank).T  # a for every (slice, filter) pair
    index = np.argmax(np.abs(scores), axis=1)
    g = bank[index]
    g_mean = g.mean(axis=1, keepdims=True)
    gc = g - g_mean
    denom = np.einsum("ij,ij->i", gc, gc)
    a = np.divide(np.einsum("ij,ij->i", gc, slices), denom, out=np.zeros(len(g)), where=denom > 0)
    b = slices.mean(axis=1) - a * g_mean[:, 0]
    return index, a, b


def weighted_fit_slices(slices: np.ndarray, bank: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`fit_slices` under the output-error metric: slice c of a row of group g (columns
    c*f .. c*f+f of W) is measured by M = the diagonal block of H_g for those columns, and
    gets the filter g and (a, b) minimising (s - a g - b)^T M (s - a g - b), a 2 x 2 solve per
    (slice, filter). Cross-slice terms of H (between input channels) are ignored: with them
    the slices of a row would no longer be fitted one by one."""
    groups, k = h.shape[0], h.shape[-1]
    f = bank.shape[1]
    per_row = k // f
    grid = slices.reshape(groups, -1, per_row, f)
    index = np.empty(grid.shape[:-1], np.intp)
    a, b = np.empty(grid.shape[:-1]), np.empty(grid.shape[:-1])
    for g in range(groups):
        for c in range(per_row):
            m = h[g, c * f:(c + 1) * f, c * f:(c + 1) * f]
            index[g, :, c], a[g, :, c], b[g, :, c] = _metric_fit(grid[g, :, c], bank, m)
    return index.reshape(-1), a.reshape(-1), b.reshape(-1)


def _metric_fit(slices: np.ndarray, bank: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best (filter, a, b) of each slice under the positive definite metric ``m``: the filter
    whose span {g, 1} removes most of |s|_M^2, the 2 x 2 normal equations for a and b (b alone
    where g is constant in this metric)."""
    mg = bank @ m  # (n, f)
    ones = m.sum(axis=1)  # M 1
    gmg, gm1, omo = np.einsum("nf,nf->n", mg, bank), mg.sum(axis=1), float(ones.sum())
    smg, sm1 = slices @ mg.T, slices @ ones  # (r, n), (r,)
    det = gmg * omo - gm1 ** 2
    flat = det <= 1e-12 * np.maximum(gmg * omo, 1e-300)
    safe = np.where(flat, 1.0, det)
    gain = np.where(flat, sm1[:, None] ** 2 / omo,
                    (omo * smg ** 2 - 2 * gm1 * smg * sm1[:, None] + gmg * sm1[:, None] ** 2) / safe)
    index = np.argmax(gain, axis=1)
    rows = np.arange(len(slices))
    chosen_det, chosen_flat = safe[index], flat[index]
    a = np.where(chosen_flat, 0.0, (omo * smg[rows, index] - gm1[index] * sm1) / chosen_det)
    b = np.where(chosen_flat, sm1 / omo, (gmg[index] * sm1 - gm1[index] * smg[rows, index]) / chosen_det)
    return index, a, b
