"""Calibration statistics: the second moments of what each weight multiplies, from unlabeled inputs.

An output-aware fit of a weight W minimises the layer's mean squared output change
``E ||(W - W') x||^2 = trace((W - W') H (W - W')^T)`` with ``H = E[x x^T]`` over the
layer's inputs x (GPTQ, OBS, AdaRound). This module measures H, and E[x] for fits that
fold a mean shift into the bias, from calibration inputs, for ONNX models through ONNX
Runtime (:func:`collect_onnx`, no torch) and for PyTorch models through forward hooks
(:func:`collect_torch`). Both key the result by weight name (the initializer's name, as
:func:`kernelpack.onnx_io.take_out` names it; the state_dict name ``"layer.weight"``).

Decisions (one home: :class:`LayerStats` and :func:`LayerStats.matrix`):

* **The weight as a matrix.** W has one row per output feature and K columns, the
  length of the x it multiplies. ``layout`` says how the stored tensor maps to W:
  ``rows``: the tensor's rows are W's rows (Conv (C_out, C_in/g, *k): K = C_in/g * prod(k),
  x = im2col patches in (channel, kernel position) order; Gemm weight B with transB=1;
  torch Linear; a MatMul or Gemm weight on the left of the product). ``columns``: W is the
  tensor transposed (ONNX MatMul weights (K, N), Gemm weight B with transB=0).
  ``conv_transpose``: ConvTranspose (C_in, C_out/g, *k) is the direct convolution of the
  zero-inserted input with the kernel flipped and its channel axes swapped, so W's rows
  are output channels, K = C_in/g * prod(k), and x are patches of that convolution.
  Gemm's alpha is folded into x (the layer computes alpha * W x).
* **Groups.** A grouped convolution keeps one H per group: ``h`` is (groups, K, K),
  ``mean`` (groups, K), with groups = 1 for every other layer. Output channel o of group
  g sees only group g's inputs, so the objective is the sum over groups of
  trace(dW_g H_g dW_g^T) (:meth:`LayerStats.output_error`); an average over groups would
  not be. It costs groups * K^2 numbers, never more than the ungrouped layer would.
* **Samples.** One sample is one x: one output position of one input (a patch), or one
  row of a matrix product. ``count`` is how many the layer saw (summed over calibration
  inputs and over the nodes sharing the weight), ``samples`` how many were accumulated.
* **Bounds.** Per batch and per layer use, at most ``max_patches`` samples (default
  :data:`MAX_PATCHES`) are accumulated, drawn uniformly without replacement by a
  generator seeded with (seed, crc32(weight name), batch index, use index) - the same
  draw for the ONNX and the torch collection of one model - and weighted by
  (samples seen / samples drawn) so that H stays an unbiased estimate of the mean over
  all samples (exact when nothing is drawn). Samples are gathered in the layer input's
  floating dtype (float32 for float16 and float32 inputs, float64 for float64) in chunks of
  at most :data:`CHUNK_BYTES`, each chunk's products x^T x computed in that dtype (BLAS
  float32 is twice float64's speed, and ~7 digits per chunk are far below the sampling
  noise) and accumulated into H in float64; a weight with K > ``max_k`` (default
  :data:`MAX_K` = 512 * 3 * 3, H = 170 MB) gets no statistics and a warning says so.
  Memory: the H of every collected weight (groups * K^2 * 8 bytes each) plus one batch's
  layer inputs (ONNX Runtime returns them all at once; choose ``batch_size``) plus one
  chunk. Work per batch: at most max_patches * groups * K^2 multiply-adds per layer.
* **Which nodes (ONNX).** Main-graph Conv, ConvTranspose, Gemm and MatMul nodes (default
  domain) whose weight operand is a weight that the planner may change (read only at
  weight inputs, :func:`kernelpack.onnx_io.weight_roles`) and whose other operand is not
  constant. A weight read by several such nodes of one layout gets one H over all their
  samples. Weights read inside subgraphs, by ConvTranspose with ``output_shape`` or SAME
  padding, as a MatMul operand of rank other than 2, or under two layouts get no
  statistics, and one warning lists them with the reason.
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from kernelpack._parallel import one_blas_thread
from kernelpack.errors import KernelpackError, need_module

#: Samples (patches or rows) accumulated per layer use and batch, at most.
MAX_PATCHES = 4096
#: Largest row length K for which H (K x K float64) is kept: a 512-channel 3x3 convolution.
MAX_K = 512 * 3 * 3
#: Largest float64 block of samples held at once while accumulating.
CHUNK_BYTES = 32 << 20
#: Calibration inputs run through the model this many samples at a time (ONNX and torch).
BATCH_SIZE = 8
#: Largest total of the arrays in a calibration ``.npz`` file that :func:`load_inputs` reads.
MAX_INPUT_BYTES = 4 << 30

ROWS, COLUMNS, CONV_TRANSPOSE = "rows", "columns", "conv_transpose"
RowSource = tuple[Callable[[np.ndarray], np.ndarray], int]


# --- the statistics -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerStats:
    """What one weight multiplies: ``h`` = E[x x^T] (groups, K, K) and ``mean`` = E[x]
    (groups, K), float64, over ``count`` samples of which ``samples`` were accumulated;
    ``layout`` and ``shape`` say how the weight tensor is the matrix W (module docstring)."""

    h: np.ndarray
    mean: np.ndarray
    count: int
    samples: int
    layout: str
    shape: tuple[int, ...]

    @property
    def groups(self) -> int:
        return self.h.shape[0]

    @property
    def k(self) -> int:
        return self.h.shape[-1]

    def matrix(self, weight: np.ndarray) -> np.ndarray:
        """The weight tensor (of ``shape``) as W per group, (groups, rows per group, K): a view
        where the layout allows. Row r of group g multiplies the x of ``h[g]``."""
        weight = np.asarray(weight)
        if weight.shape != self.shape:
            raise KernelpackError(f"weight of shape {list(weight.shape)} given for statistics of shape "
                                  f"{list(self.shape)}", field="shape")
        g = self.groups
        if self.layout == ROWS:
            return weight.reshape(g, weight.shape[0] // g, self.k)
        if self.layout == COLUMNS:
            return weight.reshape(self.k, -1).T[None]
        c_in, c_out_g = self.shape[:2]
        per_group = weight.reshape(g, c_in // g, c_out_g, *self.shape[2:])
        flipped = np.flip(per_group, axis=tuple(range(3, per_group.ndim)))
        return flipped.swapaxes(1, 2).reshape(g, c_out_g, self.k)

    def output_error(self, weight: np.ndarray, approx: np.ndarray) -> float:
        """sum over groups of trace((W - W') H (W - W')^T): the layer's mean over samples of the
        squared output change summed over output features (bias left out)."""
        delta = self.matrix(np.asarray(weight, np.float64) - np.asarray(approx, np.float64))
        return float(np.einsum("grk,gkl,grl->", delta, self.h, delta))


class _Accumulator:
    """Streaming sums of x x^T and x for one weight, over batches, with the subsampling rule."""

    def __init__(self, layout: str, shape: tuple[int, ...], groups: int, k: int) -> None:
        self.layout, self.shape, self.groups, self.k = layout, shape, groups, k
        self.h = np.zeros((groups, k, k))
        self.sum = np.zeros((groups, k))
        self.count = self.samples = 0

    def add(self, source: RowSource, rng: np.random.Generator, max_patches: int) -> None:
        """Accumulate ``max_patches`` of the ``total`` samples that ``rows(indices)`` gives as
        (n, groups, K) (float32 or float64), weighted total/drawn, in chunks of at most CHUNK_BYTES."""
        rows, total = source
        if total == 0:
            return
        if total > max_patches:
            indices = np.sort(rng.choice(total, size=max_patches, replace=False))
        else:
            indices = np.arange(total)
        weight = total / len(indices)
        chunk = max(1, CHUNK_BYTES // (8 * self.groups * self.k))
        for start in range(0, len(indices), chunk):
            x = rows(indices[start:start + chunk])
            self._add_products(x, weight)
            self.sum += weight * x.sum(axis=0, dtype=np.float64)
        self.count += total
        self.samples += len(indices)

    def _add_products(self, x: np.ndarray, weight: float) -> None:
        """h += weight * x^T x per group: BLAS syrk (the lower triangle of h; in place for
        float64 samples, through a float32 product for float32 ones) for one group, a batched
        product for grouped layers (whose K is small)."""
        if self.groups == 1:
            from scipy.linalg.blas import dsyrk, ssyrk

            target = self.h[0].T  # Fortran-ordered view: syrk's upper triangle is h's lower one
            xt = np.ascontiguousarray(x[:, 0]).T
            if x.dtype != np.float64:
                target += weight * ssyrk(1.0, xt, trans=0, lower=0)
                return
            out = dsyrk(weight, xt, beta=1.0, c=target, trans=0, lower=0, overwrite_c=1)
            if not np.shares_memory(out, target):
                target[...] = out
        else:
            xt = x.transpose(1, 0, 2)
            self.h += weight * np.matmul(xt.transpose(0, 2, 1), xt)

    def stats(self) -> LayerStats:
        """The means, made in place (the accumulator is spent: H is not held twice)."""
        h = self.h
        h /= self.count
        if self.groups == 1:  # syrk filled the lower triangle; the upper one is still zero
            h[0] += np.tril(h[0], -1).T
        self.h = None
        return LayerStats(h=h, mean=self.sum / self.count, count=self.count, samples=self.samples,
                          layout=self.layout, shape=self.shape)


# --- samples of one layer input ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Conv:
    """A convolution's geometry as im2col needs it. ``pads`` (begin..., end...) are explicit;
    ``auto_pad`` SAME_UPPER/SAME_LOWER computes them from the input size instead."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    groups: int
    transposed: bool = False
    output_padding: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"

    def padding(self, sizes: Sequence[int]) -> tuple[list[int], list[int]]:
        """(begin, end) padding per spatial axis for an input of spatial ``sizes``."""
        r = len(self.kernel)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            total = [max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
                     for n, s, d, k in zip(sizes, self.strides, self.dilations, self.kernel)]
            small = [t // 2 for t in total]
            big = [t - t // 2 for t in total]
            return (small, big) if self.auto_pad == "SAME_UPPER" else (big, small)
        if self.auto_pad == "VALID":
            return [0] * r, [0] * r
        return list(self.pads[:r]), list(self.pads[r:])


def _pad(x: np.ndarray, begin: Sequence[int], end: Sequence[int]) -> np.ndarray:
    """x padded with zeros on its spatial axes (axes 2...); a negative amount crops."""
    crop = (slice(None), slice(None)) + tuple(slice(max(-b, 0), x.shape[2 + i] - max(-e, 0))
                                              for i, (b, e) in enumerate(zip(begin, end)))
    x = x[crop]
    widths = [(0, 0), (0, 0)] + [(max(b, 0), max(e, 0)) for b, e in zip(begin, end)]
    return np.pad(x, widths) if any(map(any, widths)) else x


def _zero_inserted(x: np.ndarray, strides: Sequence[int]) -> np.ndarray:
    """x with s - 1 zeros between neighbours along each spatial axis (stride s)."""
    shape = x.shape[:2] + tuple(s * (n - 1) + 1 for n, s in zip(x.shape[2:], strides))
    out = np.zeros(shape, x.dtype)
    out[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = x
    return out


def _conv_rows(x: np.ndarray, conv: _Conv) -> RowSource:
    """The im2col patches of ``x`` (N, C, *spatial) under ``conv``: a getter of (n, groups, K)
    rows (float32, or float64 for float64 inputs) by flat index over (sample, *output position), and their number. A
    transposed convolution is the direct one on the zero-inserted input (module docstring)."""
    r = len(conv.kernel)
    if x.ndim != r + 2:
        raise KernelpackError(f"layer input of rank {x.ndim} for a {r}-D convolution", field="calibration")
    if conv.transposed:
        reach = [d * (k - 1) for d, k in zip(conv.dilations, conv.kernel)]
        begin, end = conv.padding(x.shape[2:])
        extra = list(conv.output_padding) or [0] * r
        x = _zero_inserted(x, conv.strides)
        begin = [a - b for a, b in zip(reach, begin)]
        end = [a - b + c for a, b, c in zip(reach, end, extra)]
        strides = (1,) * r
    else:
        begin, end = conv.padding(x.shape[2:])
        strides = conv.strides
    x = _pad(x, begin, end)
    window = [d * (k - 1) + 1 for d, k in zip(conv.dilations, conv.kernel)]
    out = tuple(max((n - w) // s + 1, 0) for n, w, s in zip(x.shape[2:], window, strides))
    if 0 in out:
        return (lambda indices: np.zeros((0, conv.groups, 0))), 0
    view = np.lib.stride_tricks.sliding_window_view(x, window, axis=tuple(range(2, 2 + r)))
    view = view[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
                + tuple(slice(None, None, d) for d in conv.dilations)]
    grid = (x.shape[0],) + out

    def rows(indices: np.ndarray) -> np.ndarray:
        where = np.unravel_index(indices, grid)
        patches = view[(where[0], slice(None)) + tuple(where[1:])]  # (n, C, *kernel)
        return patches.reshape(len(indices), conv.groups, -1).astype(_sample_dtype(x.dtype), copy=False)

    return rows, math.prod(grid)


def _matrix_rows(x: np.ndarray, scale: float = 1.0) -> RowSource:
    """Rows of a 2-D array of samples (n, K), times ``scale`` (Gemm's alpha), as (n, 1, K)."""
    dtype = _sample_dtype(x.dtype)
    return (lambda indices: (np.asarray(x[indices], dtype) * dtype.type(scale))[:, None, :]), x.shape[0]


def _sample_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype samples are gathered and multiplied in: float64 for float64 inputs, else float32."""
    return np.dtype(np.float64 if dtype == np.float64 else np.float32)


def _rng(seed: int, name: str, batch: int, use: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8")), batch, use])


def _check_k(name: str, k: int, max_k: int, skipped: dict[str, str]) -> bool:
    if k > max_k:
        skipped[name] = f"K = {k} > max_k = {max_k} (H would take {k * k * 8 / 1e6:.0f} MB)"
        return False
    return True


def _warn_skipped(skipped: Mapping[str, str]) -> None:
    if skipped:
        listed = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        warnings.warn(f"calibration: no statistics for {len(skipped)} weight(s), whose fits stay "
                      f"weight-only: {listed}", RuntimeWarning, stacklevel=3)


# --- ONNX ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Use:
    """One node's use of a weight: which value it multiplies and how that becomes samples."""

    weight: str
    data: str
    layout: str
    groups: int
    k: int
    source: Callable[[np.ndarray], RowSource]


def _attributes(node: Any) -> dict[str, Any]:
    onnx = need_module("onnx", "ONNX models", "onnx")
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _conv_use(node: Any, shape: tuple[int, ...]) -> _Use | str:
    """The use of a Conv/ConvTranspose weight, or why it cannot be collected."""
    at = _attributes(node)
    r = len(shape) - 2
    transposed = node.op_type == "ConvTranspose"
    auto_pad = _text(at.get("auto_pad", "NOTSET"))
    if transposed and ("output_shape" in at or auto_pad not in ("NOTSET", "VALID")):
        return "ConvTranspose with output_shape or SAME padding is not supported"
    groups = int(at.get("group", 1))
    conv = _Conv(kernel=tuple(shape[2:]), strides=tuple(at.get("strides", [1] * r)),
                 dilations=tuple(at.get("dilations", [1] * r)), pads=tuple(at.get("pads", [0] * 2 * r)),
                 groups=groups, transposed=transposed, output_padding=tuple(at.get("output_padding", [])),
                 auto_pad=auto_pad)
    c_in_g = shape[0] // groups if transposed else shape[1]
    return _Use(node.input[1], node.input[0], CONV_TRANSPOSE if transposed else ROWS, groups,
                c_in_g * math.prod(shape[2:]), lambda x: _conv_rows(x, conv))


def _matrix_use(node: Any, index: int, shape: tuple[int, ...]) -> _Use | str:
    """The use of a Gemm/MatMul weight at input ``index`` (0: left factor, 1: right), or why not."""
    if len(shape) != 2:
        return f"{node.op_type} weight of rank {len(shape)}"
    data = node.input[1 - index]
    if node.op_type == "MatMul":
        if index == 1:  # y = x @ B, B (K, N)
            return _Use(node.input[1], data, COLUMNS, 1, shape[0], lambda x: _matrix_rows(x.reshape(-1, shape[0])))
        k = shape[1]  # y = A @ x, A (M, K): samples are the columns of x
        return _Use(node.input[0], data, ROWS, 1, k,
                    lambda x: _matrix_rows(x.reshape(1, k) if x.ndim == 1 else x.swapaxes(-1, -2).reshape(-1, k)))
    at = _attributes(node)
    alpha = float(at.get("alpha", 1.0))
    trans_a, trans_b = bool(at.get("transA", 0)), bool(at.get("transB", 0))
    if index == 1:  # y = alpha * A' B', B' = B^T if transB; samples are the rows of A'
        return _Use(node.input[1], data, ROWS if trans_b else COLUMNS, 1, shape[1] if trans_b else shape[0],
                    lambda x: _matrix_rows(x.T if trans_a else x, alpha))
    # the weight is A: W = A' (M, K); samples are the columns of B'
    return _Use(node.input[0], data, COLUMNS if trans_a else ROWS, 1, shape[0] if trans_a else shape[1],
                lambda x: _matrix_rows(x if trans_b else x.T, alpha))


def _onnx_uses(graph: Any, weights: Mapping[str, np.ndarray], max_k: int, skipped: dict[str, str]) -> list[_Use]:
    """The weight uses of the main graph's nodes whose statistics can be collected."""
    from kernelpack.onnx_io import weight_roles

    roles = {n: r for n, r in weight_roles(graph).items() if r in ("conv", "matrix")}  # biases take no H
    uses: list[_Use] = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        indices = (1,) if node.op_type.startswith("Conv") else (0, 1)
        for index in indices:
            name = node.input[index] if index < len(node.input) else ""
            other = node.input[1 - index] if node.op_type not in ("Conv", "ConvTranspose") else node.input[0]
            if name not in roles or name not in weights or other in weights:
                continue
            use = (_conv_use(node, weights[name].shape) if node.op_type.startswith("Conv")
                   else _matrix_use(node, index, weights[name].shape))
            if isinstance(use, str):
                skipped[name] = use
            else:
                uses.append(use)
    seen: dict[str, tuple[str, int, int]] = {}
    for use in uses:
        key = (use.layout, use.groups, use.k)
        if seen.setdefault(use.weight, key) != key:
            skipped[use.weight] = "read by nodes of different layouts"
    for name in set(roles) & set(weights) - {u.weight for u in uses} - set(skipped):
        skipped[name] = "read by no main-graph node with a non-constant operand (e.g. inside a subgraph)"
    return [u for u in uses if u.weight not in skipped and _check_k(u.weight, u.k, max_k, skipped)]


def _onnx_batches(inputs: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]],
                  batch_size: int) -> Iterator[Mapping[str, np.ndarray]]:
    """Batches of model inputs: a mapping of arrays (first axis = samples) cut into
    ``batch_size`` samples, or the caller's own batches as given."""
    if isinstance(inputs, Mapping):
        n = _sample_count(inputs)
        for start in range(0, n, batch_size):
            yield {k: v[start:start + batch_size] for k, v in inputs.items()}
        return
    for batch in inputs:
        if not isinstance(batch, Mapping):
            raise KernelpackError(f"a calibration batch must map input names to arrays, not "
                                  f"{type(batch).__name__}", field="calibration")
        yield batch


def _sample_count(inputs: Mapping[str, Any]) -> int:
    """The common first-axis length of the arrays of ``inputs`` (the sample count)."""
    if not inputs:
        raise KernelpackError("no calibration inputs", field="calibration")
    counts = {name: (np.shape(v)[0] if np.ndim(v) else None) for name, v in inputs.items()}
    if None in counts.values() or len(set(counts.values())) != 1:
        raise KernelpackError(f"calibration arrays must share their first axis (samples): {counts}",
                              field="calibration")
    return next(iter(counts.values()))


def _session(graph: Any, weights: Mapping[str, np.ndarray], extra_outputs: Iterable[str]) -> Any:
    """A CPU session of ``graph`` (weights taken out) that also outputs ``extra_outputs``."""
    onnx = need_module("onnx", "ONNX models", "onnx")
    ort = need_module("onnxruntime", "ONNX calibration", "onnx")
    from kernelpack.ort import with_weights

    for name in extra_outputs:
        graph.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False  # the arena keeps every exposed input's peak for good
    # ORT's idle threads spin after each run, starving the BLAS products that follow (10x slower here)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(graph.SerializeToString(), with_weights(options, weights),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own types: report as one
        raise KernelpackError(f"onnxruntime cannot build the calibration session: {exc}") from None


def collect_onnx(model: Any, inputs: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]], *,
                 max_patches: int = MAX_PATCHES, max_k: int = MAX_K, batch_size: int = BATCH_SIZE,
                 seed: int = 0) -> dict[str, LayerStats]:
    """Weight name -> :class:`LayerStats` of an ONNX model (path, bytes or ModelProto) on
    ``inputs``: arrays by model input name (first axis = samples, run ``batch_size`` at a
    time) or an iterable of such batches. Runs ONNX Runtime on a copy of the graph whose
    weight-consuming nodes' data inputs are also graph outputs (module docstring)."""
    from kernelpack.onnx_io import read_model, source_name, take_out

    path = source_name(model)
    graph, weights = take_out(read_model(model))
    skipped: dict[str, str] = {}
    uses = _onnx_uses(graph.graph, weights, max_k, skipped)
    initializers = {t.name for t in graph.graph.initializer}
    feeds = [i.name for i in graph.graph.input if i.name not in initializers]
    try:
        session = _session(graph, weights, sorted({u.data for u in uses} - set(feeds)
                                                  - {o.name for o in graph.graph.output}))
    except KernelpackError as exc:
        raise exc.located(path=path) from None
    accumulators = {u.weight: _Accumulator(u.layout, weights[u.weight].shape, u.groups, u.k) for u in uses}
    names = [o.name for o in session.get_outputs()]
    with one_blas_thread():
        for b, batch in enumerate(_onnx_batches(inputs, batch_size)):
            _onnx_batch(session, names, feeds, b, batch, uses, accumulators, max_patches, seed, path)
    return _finished(accumulators, skipped)


def _onnx_batch(session: Any, names: list[str], feeds: list[str], b: int, batch: Mapping[str, np.ndarray],
                uses: list[_Use], accumulators: Mapping[str, _Accumulator], max_patches: int, seed: int,
                path: str | None) -> None:
    """Run one batch and add every use's samples to its weight's accumulator."""
    if set(batch) != set(feeds):
        raise KernelpackError(f"calibration inputs {sorted(batch)} do not match the model's inputs "
                              f"{sorted(feeds)}", path=path, field="calibration")
    try:
        values = dict(zip(names, session.run(names, {k: np.asarray(v) for k, v in batch.items()})))
    except Exception as exc:  # ORT raises its own types: report as one
        raise KernelpackError(f"onnxruntime cannot run a calibration batch: {exc}", path=path,
                              field="calibration") from None
    values.update(batch)
    calls: dict[str, int] = defaultdict(int)
    for use in uses:
        rng = _rng(seed, use.weight, b, calls[use.weight])
        calls[use.weight] += 1
        try:
            source = use.source(np.asarray(values[use.data]))
        except KernelpackError as exc:
            raise exc.located(path=path, tensor=use.weight) from None
        accumulators[use.weight].add(source, rng, max_patches)


def _finished(accumulators: dict[str, _Accumulator], skipped: dict[str, str]) -> dict[str, LayerStats]:
    """The statistics of every layer that ran (the accumulators are spent); warns of the others."""
    out = {}
    for name, acc in accumulators.items():
        if acc.count:
            out[name] = acc.stats()
        else:
            skipped[name] = "its layer never ran on the calibration inputs"
    _warn_skipped(skipped)
    return out


# --- PyTorch ------------------------------------------------------------------------------------
def _torch_conv(module: Any) -> _Conv:
    """A torch ConvNd/ConvTransposeNd module's geometry (padding='same' as ONNX SAME_UPPER)."""
    r = len(module.kernel_size)
    padding = module.padding
    if isinstance(padding, str):
        auto_pad, pads = ("VALID" if padding == "valid" else "SAME_UPPER"), ()
    else:
        auto_pad, pads = "NOTSET", tuple(padding) * 2
    if module.padding_mode != "zeros":  # the hook pads first (module._reversed_padding_repeated_twice)
        auto_pad, pads = "NOTSET", (0,) * 2 * r
    return _Conv(kernel=tuple(module.kernel_size), strides=tuple(module.stride),
                 dilations=tuple(module.dilation), pads=pads, groups=module.groups,
                 transposed=bool(module.transposed), output_padding=tuple(module.output_padding),
                 auto_pad=auto_pad)


def _torch_batches(torch: Any, inputs: Any, batch_size: int) -> Iterator[tuple[tuple, dict]]:
    """(args, kwargs) per batch: a tensor/array or a mapping of them (first axis = samples) is cut
    into ``batch_size`` samples; any other iterable gives one batch per item (a tensor, a tuple
    of positional inputs, or a mapping of keyword inputs)."""
    def tensor(v: Any) -> Any:
        return v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))

    def one(item: Any) -> tuple[tuple, dict]:
        if isinstance(item, Mapping):
            return (), {k: tensor(v) for k, v in item.items()}
        if isinstance(item, (tuple, list)):
            return tuple(tensor(v) for v in item), {}
        return (tensor(item),), {}

    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = {"": inputs}
    if isinstance(inputs, Mapping):
        n = _sample_count(inputs)
        for start in range(0, n, batch_size):
            args, kwargs = one({k: v[start:start + batch_size] for k, v in inputs.items()})
            yield (kwargs.pop(""),) if "" in kwargs else (), kwargs
        return
    for item in inputs:
        yield one(item)


def collect_torch(model: Any, inputs: Any, *, max_patches: int = MAX_PATCHES, max_k: int = MAX_K,
                  batch_size: int = BATCH_SIZE, seed: int = 0) -> dict[str, LayerStats]:
    """State-dict weight name ("layer.weight") -> :class:`LayerStats` of a PyTorch model's
    Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear layers on ``inputs`` (see
    :func:`_torch_batches`), through forward pre-hooks, in eval mode under no_grad (the
    model's mode is restored afterwards). Same definitions and draws as :func:`collect_onnx`."""
    torch = need_module("torch", "PyTorch calibration", "demo")
    nn = torch.nn
    skipped: dict[str, str] = {}
    accumulators: dict[str, _Accumulator] = {}
    state = {"batch": 0, "calls": defaultdict(int)}

    def hook_for(name: str, module: Any) -> Callable[..., None]:
        linear = isinstance(module, nn.Linear)
        conv = None if linear else _torch_conv(module)
        shape = tuple(module.weight.shape)
        groups = 1 if linear else module.groups
        k = shape[1] if linear else (shape[0] // groups if conv.transposed else shape[1]) * math.prod(shape[2:])
        layout = CONV_TRANSPOSE if conv is not None and conv.transposed else ROWS
        accumulators[name] = _Accumulator(layout, shape, groups, k)

        def hook(_module: Any, args: tuple) -> None:
            x = args[0].detach()
            if not linear and module.padding_mode != "zeros":
                x = torch.nn.functional.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            x = x.cpu().to(torch.float64 if x.dtype == torch.float64 else torch.float32).numpy()
            source = _matrix_rows(x.reshape(-1, k)) if linear else _conv_rows(x, conv)
            use = state["calls"][name]
            state["calls"][name] += 1
            accumulators[name].add(source, _rng(seed, name, state["batch"], use), max_patches)
        return hook

    handles = []
    for prefix, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(
                getattr(module, "weight", None), torch.Tensor):
            name = f"{prefix}.weight" if prefix else "weight"
            k = module.weight.shape[1] if isinstance(module, nn.Linear) else math.prod(module.weight.shape[1:])
            if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
                k = module.weight.shape[0] // module.groups * math.prod(module.weight.shape[2:])
            if _check_k(name, k, max_k, skipped):
                handles.append(module.register_forward_pre_hook(hook_for(name, module)))
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), one_blas_thread():
            for args, kwargs in _torch_batches(torch, inputs, batch_size):
                state["calls"] = defaultdict(int)
                model(*args, **kwargs)
                state["batch"] += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    return _finished(accumulators, skipped)


# --- calibration files --------------------------------------------------------------------------
def load_inputs(path: str | os.PathLike, max_bytes: int = MAX_INPUT_BYTES) -> dict[str, np.ndarray]:
    """The arrays of a calibration ``.npz`` file (one per model input, first axis = samples),
    read without pickle; each array's header is checked against ``max_bytes`` (all arrays
    together) before its data is read, so a small file cannot make it allocate much."""
    path = os.fspath(path)
    fmt = np.lib.format
    try:
        with zipfile.ZipFile(path) as archive:
            headers = {}
            for member in archive.namelist():
                with archive.open(member) as f:
                    version = fmt.read_magic(f)
                    shape, _, dtype = (fmt.read_array_header_1_0(f) if version == (1, 0)
                                       else fmt.read_array_header_2_0(f))
                if dtype.hasobject:
                    raise KernelpackError("holds an object array (pickled data): refused", path=path, tensor=member)
                headers[member] = math.prod(shape) * dtype.itemsize
            if sum(headers.values()) > max_bytes:
                raise KernelpackError(f"its arrays take {sum(headers.values())} bytes, more than max_bytes = "
                                      f"{max_bytes}", path=path)
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except KernelpackError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise KernelpackError(f"cannot read as calibration inputs (.npz of arrays): {exc}", path=path) from None
    try:
        _sample_count(arrays)
    except KernelpackError as exc:
        raise exc.located(path=path) from None
    return arrays


def split(inputs: Mapping[str, np.ndarray], fraction: float, seed: int = 0
          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(calibration, held-out): a random ``fraction`` of the samples and the rest, disjoint,
    each part in the original sample order; both parts get at least one sample."""
    n = _sample_count(inputs)
    if not 0 < fraction < 1:
        raise KernelpackError(f"the calibration fraction must lie strictly between 0 and 1, not {fraction}",
                              field="fraction")
    if n < 2:
        raise KernelpackError(f"{n} sample(s) cannot be split into calibration and held-out parts",
                              field="calibration")
    order = np.random.default_rng(seed).permutation(n)
    cut = min(max(int(round(fraction * n)), 1), n - 1)
    parts = np.sort(order[:cut]), np.sort(order[cut:])
    return tuple({k: np.asarray(v)[part] for k, v in inputs.items()} for part in parts)
