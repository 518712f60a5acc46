"""Output-aware fitting, the part every form shares: the layer-input second moments H, their
damping and factorisation, and GPTQ-style error-feedback rounding.

An output-aware encoder (``config.encode(array, source_dtype, hessian=H)``) minimises the
layer's output error ``E(W') = trace((W - W') H (W - W')^T)`` instead of ``||W - W'||^2``,
with ``H = E[x x^T]`` over the layer's inputs (kernelpack.converters.calibration). The
decode and the file format do not change: only which numbers are stored.

Decisions (one home):

* **What H is.** ``hessian`` is H for the tensor viewed as the matrix
  W = ``array.reshape(shape[0], -1)`` (conv: rows = output channels, K = C_in/groups * kh * kw
  in im2col order), either (K, K) or (groups, K, K): a grouped layer's rows split into
  ``groups`` consecutive blocks, block g multiplying the inputs of ``H[g]``, and the objective
  is the sum over groups (calibration's ``layout='rows'``). A calibration ``LayerStats``
  (anything with ``h`` and ``layout``) is accepted too: ``rows`` as above; the dense form also
  takes every other layout (a MatMul weight (K, N), a ConvTranspose kernel) through
  ``LayerStats.matrix``, since its codes are elementwise; the structured forms refuse them.
* **Damping, always.** H is replaced by ``H + DAMPING * mean(diag H) * I`` (GPTQ's
  ``percdamp``, 0.01) before any fit, singular or not: calibration H of a layer with dead
  inputs or fewer samples than K is singular, and one rule for all keeps fits deterministic.
  The damped fit minimises ``E + DAMPING * mean(diag H) * ||W - W'||^2``, so for the
  least-squares forms its E is never above the weight-only fit's (that fit minimises the
  second term alone). An all-zero H (the layer only ever sees zeros) becomes I: the
  weight-only objective. Gram matrices derived from H (B^T H B, W_p H W_p^T) are factored as
  they are, with a numerical :data:`RIDGE` only where their Cholesky fails (a rank-deficient
  map: there the damped fit would shrink the solution, the ridge only picks one).
* **Error feedback.** Quantised numbers are rounded by :func:`feedback_codes` (Frantar et al.,
  GPTQ): columns in order of decreasing diag(H) (GPTQ's ``act_order``), each rounded to the
  grid and its error spread over the columns not yet rounded with the upper Cholesky factor of
  H^-1, in blocks of :data:`BLOCK` columns. The step is the config's (one per array, as
  today); codes are clipped to the code dtype that round-to-nearest gives (so an array RTN
  stores as int8 stays int8). GPTQ is greedy: it usually beats round-to-nearest on E by a
  wide margin for correlated H, but it is not a guarantee per array.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Callable, Iterator

import numpy as np

from kernelpack.forms._base import CODE_DTYPES, Quantisable, Stored, need, quantise, to_stored
from kernelpack.errors import KernelpackError

#: GPTQ's relative damping: H + DAMPING * mean(diag H) * I.
DAMPING = 0.01
#: Columns rounded per block of the error feedback (GPTQ's lazy batch updates).
BLOCK = 128
ROWS = "rows"
#: Relative ridge of a derived Gram matrix that is singular (B^T H B of more coefficients than
#: kernel points, W_p H W_p^T of more primaries than inputs): numerical only, so that the fit
#: stays exact on the range (close to the minimum-norm solution) instead of shrinking by DAMPING.
RIDGE = 1e-10


def is_stats(hessian: Any) -> bool:
    """Whether ``hessian`` is a calibration LayerStats (duck-typed: forms do not import the
    converters)."""
    return hasattr(hessian, "h") and hasattr(hessian, "layout")


#: Per thread, the factorisations kept while :func:`reuse_factors` is active (``cache`` absent: not kept).
_LOCAL = threading.local()


@contextlib.contextmanager
def reuse_factors() -> Iterator[None]:
    """Within it, the damped H of one ``hessian`` object, Cholesky factors and GPTQ factors of
    one matrix, and linear's pivots of one filter matrix are computed once: the planner fits
    dozens of candidates of one tensor under one H. Keys are array identities (data address,
    shape, strides, dtype) and object ids; the cache holds every keyed object, so no address
    is reused while it lives. One cache per thread (the planner measures tensors on several
    threads at once); nests."""
    outer = getattr(_LOCAL, "cache", None)
    _LOCAL.cache = {} if outer is None else outer
    try:
        yield
    finally:
        _LOCAL.cache = outer


def memo(kind: str, parts: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()``, once per ``kind`` and identical ``parts`` while :func:`reuse_factors` is
    active in this thread."""
    cache = getattr(_LOCAL, "cache", None)
    if cache is None:
        return compute()
    key = (kind,) + tuple((a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)
                          if isinstance(a, np.ndarray) else a if isinstance(a, (int, str, tuple)) else id(a)
                          for a in parts)
    if key not in cache:
        cache[key] = (parts, compute())
    return cache[key][1]


def hessians(hessian: Any, shape: tuple[int, ...], form: str) -> np.ndarray:
    """The damped H per group, (groups, K, K) float64, for the rows layout of ``shape``;
    KernelpackError (field ``hessian``) when it does not fit the tensor (checked on the first call
    for one ``hessian`` and ``shape``; a refused one is not kept)."""
    return memo("hessians", (hessian, tuple(shape)), lambda: _damped(hessian, shape, form))


def _damped(hessian: Any, shape: tuple[int, ...], form: str) -> np.ndarray:
    if is_stats(hessian):
        need(hessian.layout == ROWS, "hessian", f"the {form} form fits H for a weight whose rows are the "
             f"tensor's rows (layout 'rows'), got statistics of layout {hessian.layout!r}")
        hessian = hessian.h
    need(len(shape) >= 2, "hessian", f"an output-aware {form} fit needs a tensor of rank >= 2, got shape "
         f"{list(shape)}")
    h = np.asarray(hessian, dtype=np.float64)
    h = h[None] if h.ndim == 2 else h
    k = math.prod(shape[1:])
    need(h.ndim == 3 and h.shape[1:] == (k, k) and h.shape[0] >= 1 and shape[0] % h.shape[0] == 0, "hessian",
         f"must be (K, K) or (groups, K, K) with K = {k} and groups dividing {shape[0]} for a tensor of shape "
         f"{list(shape)}, got {list(np.shape(hessian))}")
    need(bool(np.isfinite(h).all()), "hessian", "holds a NaN or infinity")
    return damp(0.5 * (h + h.transpose(0, 2, 1)))


def damp(h: np.ndarray, relative: float = DAMPING) -> np.ndarray:
    """``H + relative * mean(diag H) * I`` per matrix (of a stack or one; an all-zero H becomes I)."""
    scale = relative * np.einsum("...ii->...", h)[..., None, None] / h.shape[-1]
    return np.where(scale > 0, h + scale * np.eye(h.shape[-1]), np.eye(h.shape[-1]))


def cholesky(g: np.ndarray) -> np.ndarray:
    """Lower Cholesky factors of a stack of symmetric PSD matrices, with a RIDGE (:func:`damp`)
    where one is singular; KernelpackError when even that fails (H was not a second moment)."""
    return memo("cholesky", (g,), lambda: _cholesky(g))


def _cholesky(g: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.cholesky(g)
    except np.linalg.LinAlgError:
        pass
    try:
        return np.linalg.cholesky(damp(g, RIDGE))
    except np.linalg.LinAlgError:
        raise KernelpackError("is not positive semi-definite (not a second moment E[x x^T])",
                              field="hessian") from None


def spd_solve(g: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``g^-1 rhs`` for a stack of symmetric PSD ``g`` (.., n, n) by Cholesky (no SVD): one
    scipy triangular solve pair with all right-hand sides for a single matrix, batched
    triangular solves (numpy, one call) for a stack."""
    factors = cholesky(g)
    shape = np.broadcast_shapes(g.shape[:-2], rhs.shape[:-2]) + rhs.shape[-2:]
    if len(shape) == 2 or math.prod(shape[:-2]) == 1:
        from scipy.linalg import solve_triangular

        low, b = factors.reshape(factors.shape[-2:]), rhs.reshape(rhs.shape[-2:])
        y = solve_triangular(low, b, lower=True)
        return solve_triangular(low, y, lower=True, trans="T").reshape(shape)
    factors = np.broadcast_to(factors, shape[:-2] + factors.shape[-2:])
    y = np.linalg.solve(factors, np.broadcast_to(rhs, shape))
    return np.linalg.solve(np.swapaxes(factors, -1, -2), y)


def row_groups(rows: int, groups: int) -> np.ndarray:
    """The group of each row of W (consecutive blocks)."""
    return np.arange(rows) // (rows // groups)


def output_error(w: np.ndarray, approx: np.ndarray, hessian: Any) -> float:
    """``sum_g trace((W_g - W'_g) H_g (W_g - W'_g)^T)`` for tensors of the rows layout and an
    undamped (K, K) or (groups, K, K) H."""
    h = np.asarray(hessian.h if is_stats(hessian) else hessian, np.float64)
    h = h[None] if h.ndim == 2 else h
    delta = (np.asarray(w, np.float64) - np.asarray(approx, np.float64)).reshape(h.shape[0], -1, h.shape[-1])
    return float(np.einsum("grk,gkl,grl->", delta, h, delta))


def feedback_codes(w: np.ndarray, h: np.ndarray, steps: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """GPTQ codes (float64 integers) of the rows ``w`` (groups, n, K), group g under ``h[g]``,
    row i rounded with ``steps[i]`` and clipped to [-limits[i], limits[i]] (rows are independent
    in GPTQ: one pass serves every step). Every group advances column by column together, so
    the Python loop runs K times per call, whatever the groups and rows. Columns are held
    contiguous ((groups, K, n)), and the feedback of a block's earlier columns is applied to a
    column only when it is rounded (one small product), as GPTQ's lazy batch updates do across
    blocks: 2x faster than updating the rest of the block after every column."""
    order, u = memo("gptq", (h,), lambda: _feedback_factor(h))
    k = h.shape[-1]
    x = _permuted(np.asarray(w, np.float64), order) / steps[:, None]
    x = np.ascontiguousarray(x.transpose(0, 2, 1))
    diagonal = np.diagonal(u, axis1=1, axis2=2)
    bound = np.asarray(limits, np.float64)
    codes = np.empty_like(x)
    errors = np.empty((h.shape[0], BLOCK, x.shape[2]))
    for lo in range(0, k, BLOCK):
        hi = min(lo + BLOCK, k)
        for j in range(lo, hi):
            column, code, err = x[:, j], codes[:, j], errors[:, j - lo]
            if j > lo:
                column -= np.matmul(u[:, None, lo:j, j], errors[:, :j - lo])[:, 0]
            np.clip(np.rint(column, out=code), -bound, bound, out=code)
            np.subtract(column, code, out=err)
            err /= diagonal[:, j, None]
        if hi < k:
            x[:, hi:] -= np.matmul(u[:, lo:hi, hi:].transpose(0, 2, 1), errors[:, :hi - lo])
    return _permuted(codes.transpose(0, 2, 1), np.argsort(order, axis=1))


def _permuted(x: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``x[g, :, order[g]]`` for every group g of (groups, n, K) ``x`` (one fancy index for one
    group: numpy's take_along_axis is several times slower)."""
    if len(order) == 1:
        return x[:, :, order[0]]
    return np.take_along_axis(x, order[:, None, :], axis=2)


def _feedback_factor(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's column order per matrix of the stack ``h`` (decreasing diag H) and the upper U
    with H^-1 = U^T U in that order."""
    order = np.argsort(-np.diagonal(h, axis1=1, axis2=2), axis=1, kind="stable")
    permuted = np.take_along_axis(np.take_along_axis(h, order[:, :, None], axis=1), order[:, None, :], axis=2)
    # Upper U with H^-1 = U^T U, without forming H^-1: with P the reversal and P H P = L L^T,
    # U = P L^-1 P (one Cholesky and one triangular inverse).
    low = cholesky(np.ascontiguousarray(permuted[:, ::-1, ::-1]))
    if len(h) == 1:
        from scipy.linalg import solve_triangular

        inverse = solve_triangular(low[0], np.eye(h.shape[-1]), lower=True)[None]
    else:
        inverse = np.linalg.solve(low, np.broadcast_to(np.eye(h.shape[-1]), low.shape))
    return order, np.ascontiguousarray(inverse[:, ::-1, ::-1])


def feedback_store(config: Quantisable, values: np.ndarray, h: np.ndarray, groups: np.ndarray,
                   shape: tuple[int, ...] | None = None) -> Stored:
    """``config.store(values)`` with the rows of ``values`` (n, K) rounded by error feedback,
    row i under ``h[groups[i]]``, stored in ``shape`` (default: as given): the step is the
    config's, the code dtype the one round-to-nearest takes (float storage is rounded to
    nearest: H does not change it)."""
    shape = values.shape if shape is None else shape
    choice = config.code_choice
    if choice is not None:
        raise KernelpackError(f"{choice[1]} and error feedback (a hessian) both choose the codes: give one of them",
                              field=choice[0])
    step = config.step_for(values)
    if step is None:
        return to_stored(values.reshape(shape), getattr(config, "dtype"))
    limit = CODE_DTYPES[quantise(values, step).dtype] - 1  # refuses what RTN would refuse
    codes = grouped_rows(lambda stack: feedback_codes(stack, h, np.full(stack.shape[1], step),
                                                      np.full(stack.shape[1], limit)), values, groups, len(h))
    return quantise((codes * step).reshape(shape), step)  # exact: integer codes, one step


def grouped_rows(fit: Callable[[np.ndarray], np.ndarray], values: np.ndarray, groups: np.ndarray,
                 count: int) -> np.ndarray:
    """``fit`` applied to the rows of ``values`` (n, K) stacked by group, (count, m, K) with m the
    largest group's row count (other groups padded with zero rows, which GPTQ rounds to zero on
    their own), and its result scattered back to (n, K)."""
    counts = np.bincount(groups, minlength=count)
    order = np.argsort(groups, kind="stable")
    within = np.empty(len(groups), np.intp)  # the position of each row inside its group
    within[order] = np.arange(len(groups)) - np.repeat(np.cumsum(counts) - counts, counts)
    stack = np.zeros((count, int(counts.max(initial=0)), values.shape[1]))
    stack[groups, within] = values
    return fit(stack)[groups, within]
