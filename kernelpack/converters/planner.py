"""``plan(model, calibration, max_output_error=... | max_bytes=... | max_error=...)``: a form
per tensor, chosen for the bytes it costs and the error it makes.

Every candidate form is fitted in closed form (the forms' own encoders) and decoded
canonically with numpy, so a plan costs seconds and needs no torch for numpy input or
ONNX models.

Decisions:

* **What is planned.** Floating tensors of rank >= 2 with at least ``min_size`` elements
  (a module's or a mapping's), or an ONNX model's weights read only as Conv/ConvTranspose
  weights, Gemm/MatMul operands, Conv/ConvTranspose/Gemm biases or BatchNormalization
  parameters (:func:`kernelpack.onnx_io.weight_roles`; the last two only as float32 or
  float16, whose error the sensitivity probes measure); the rest stays dense as it is. Each is planned as the float32 tensor of its numbers. Tensors that
  a rule of ``forms`` chooses (:mod:`kernelpack.rules`; a rule's None: dense as they are) keep
  that config (not planned) but take part in every measurement.
* **Bytes** of a candidate are its stored arrays and banks compressed as the writer does
  (the smallest of raw, zstd and zstd-shuffle per array) at zstd level 3, the writer's
  default (a file written at level 19 is within about 1% of it; the header is not counted). ``max_bytes`` caps their total over the planned tensors.
* **Weight error** of a tensor is ||W - W'|| / ||W|| (0 for a zero tensor); ``max_error``
  caps it for every planned tensor.
* **Estimated output error** of a tensor, with calibration statistics (H = E[x x^T] of its
  layer's inputs, :mod:`kernelpack.converters.calibration`), is the relative layer output
  error sqrt(trace(dW H dW^T) / trace(W H W^T)); the fits are then output-aware (the
  forms' ``encode(..., hessian=H)``) where :func:`fits_with_h` allows. Without statistics it
  is the weight error (H = I). The plan's estimate is sqrt(sum over tensors of
  sensitivity * estimate^2) (the measurement below corrects its scale).
* **Sensitivity** (HAWQ-style, measured; with a graph to run and ``max_output_error`` or
  ``max_bytes``): how much of a layer's relative output error reaches the model's outputs.
  Each planned tensor alone is replaced by its hull option whose estimate is nearest
  :data:`PROBE_ERROR`, the model runs on the first calibration batch, and its sensitivity is
  (relative output error of the model / the option's estimate)^2, at least
  :data:`MIN_SENSITIVITY`. Small independent errors add in squares, so the model's error is
  about sqrt(sum of sensitivity * estimate^2). Measured on PP-OCR cls and rec, sensitivities
  span 3-4 orders of magnitude (early small layers ~10-30, late wide ones ~0.002-0.04): with
  all alike, bytes went where they bought no output accuracy. At most :data:`MAX_PROBES`
  runs: beyond it the tensors with the fewest bytes at stake (hull's largest minus smallest)
  are probed together and share the result. ``sensitivity=False`` treats every layer alike.
* **Pruning.** With statistics every candidate is first fitted weight-only (cheap) and its
  output error estimated under H. An output-aware fit of the same config keeps its size
  (bytes move by the compressibility of other numbers only) and lowers the estimate (the
  least-squares forms' damped objective never rises; GPTQ almost always), so it matters only
  for candidates that can then reach the lower hull of the tensor's candidates. Per family
  (form, quantised or not) the most and the least accurate candidates are fitted with H
  first: its probes, which measure the improvement ratio r = aware / weight-only on this
  tensor (the smaller of the two: a structured form gains most where it has most freedom,
  GPTQ where the step is coarsest). Every other candidate is fitted with H only if its
  weight-only point, improved to r * REFIT_MARGIN of its estimate, lies on or below the hull of
  the points known after the probes (later fits only lower that hull); the rest keep their
  weight-only fit (``Option.aware`` False, and ``Plan.hessians`` only names tensors whose
  chosen option was fitted with H, so the file holds exactly what was measured).
* **Allocation.** Each tensor keeps the lower convex hull of its candidates' (bytes,
  squared estimated error); a plan is a point of the Lagrangian path: starting from every
  tensor's smallest candidate, upgrades in order of steepest error reduction per byte.
  ``max_bytes`` alone: the longest prefix within the cap. ``max_error`` alone: each
  tensor's smallest candidate within the cap.
* **Measured output error** (``max_output_error``, needs calibration inputs and a graph
  to run: a module or an ONNX model): ||y' - y|| / ||y|| over all outputs concatenated, on
  the calibration inputs, y from the original weights and y' from the decoded plan (ONNX
  Runtime for ONNX models, the module's forward otherwise), or ``metric(y_ref, y_new)``
  (lists of output arrays, concatenated over batches). The path point is found by
  searching the estimate's target: start at ``max_output_error``, correct it by the ratio
  target / measured (the estimate's scale error), keep a bracket (halved in bytes when the
  correction falls outside it) until its ends differ by under :data:`BYTES_TOLERANCE` in
  bytes, at most :data:`MAX_EVALUATIONS` runs of the model; the smallest plan that measured
  within the target wins. No plan within it (the most accurate candidate of every tensor included) is
  a refusal that says the best reached.
* **Refused candidates.** A candidate whose encoder refuses a tensor is skipped, never
  silently: ``Plan.skipped``, ``Plan.table()`` and one warning list them. A tensor for
  which every candidate is refused raises (field ``candidates``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from kernelpack._backend import NumpyOps, bfloat16_bits_to_float32
from kernelpack._progress import progress as progress_bar
from kernelpack.errors import KernelpackError
from kernelpack.forms import DCT, Basis, Config, Dense, Encoded, Linear, Series
from kernelpack.forms._base import need, shown
from kernelpack.forms.dct import CG_ITERATIONS, DCTTensor
from kernelpack.pack import as_numpy, encode, state_of
from kernelpack.rules import Rule, Rules, changed_settings, read_rules, rules_of, write_rules

Candidates = Callable[[str, tuple[int, ...]], Iterable[Config]]
Metric = Callable[[list, list], float]

#: zstd level of the byte estimate (see the module doc).
BYTES_LEVEL = 3
#: End-to-end evaluations of the model at most per plan.
MAX_EVALUATIONS = 8
#: Sensitivity probes (runs of the first calibration batch) at most per plan: beyond it the
#: tensors with the fewest bytes at stake share the last probe.
MAX_PROBES = 24
#: A probe replaces its tensor by the hull option whose layer output error is nearest this
#: (in log): small enough for the output to respond linearly, large enough to register.
PROBE_ERROR = 0.03
#: Smallest sensitivity kept (a layer whose probe moved nothing still costs a little error).
MIN_SENSITIVITY = 1e-4
#: The measured search stops once the smallest plan known within the target is at most this
#: much larger than the largest known beyond it (a closer bracket costs evaluations of the
#: model for under 1% of the bytes).
BYTES_TOLERANCE = 0.01
#: Largest K (row length of W) for which candidates are fitted with H: above it one
#: Cholesky of H costs seconds per candidate on 2 cores; those fits stay weight-only and
#: only their error is estimated under H.
MAX_FIT_K = 2304
#: Multiply-adds allowed for an output-aware DCT fit (CG_ITERATIONS conjugate-gradient steps,
#: each a product with H); larger ones are fitted weight-only.
DCT_FIT_WORK = 1 << 26
#: Multiply-adds allowed per candidate for the estimate trace(dW H dW^T): larger tensors use
#: a fixed subset of W's rows (the same for every candidate of the tensor), scaled up.
ESTIMATE_WORK = 1 << 28
#: A candidate pruned from output-aware fitting must be unable to reach the hull even with this
#: much more improvement than its family's probe showed (module doc, "Pruning"); 0 refits all.
REFIT_MARGIN = 0.7
#: Tensors with more elements get a shorter candidate list (see default_candidates).
LARGE = 1 << 20


def default_candidates(name: str, shape: tuple[int, ...]) -> list[Config]:
    """Lossless dense, dense float16 (only those two for tensors of rank < 2: an ONNX model's
    biases and BatchNormalization parameters, which a relative step of their RMS could send
    to zero), quantised dense (int8/int16 codes, GPTQ with H) at six relative steps; DCT for every tensor of rank >= 2, low-rank linear where its p primaries
    are fewer than the row length K (else it stores at least as many numbers as dense); for kernels, series
    of every (Nx, Ny) below the kernel size and banks of 4..64 filters; float16 and quantised
    (rel_step 0.1) variants of the structured forms. Tensors over :data:`LARGE` elements get
    fewer keeps, alphas and banks."""
    large = math.prod(shape) > LARGE
    out: list[Config] = [Dense(), Dense(dtype="float16")]
    if len(shape) < 2:  # an ONNX model's biases and normalisations: float storage only
        return out
    out += [Dense(rel_step=s) for s in (0.02, 0.05, 0.1, 0.2, 0.35, 0.5)]
    c_out = shape[0]
    keeps = (0.1, 0.25, 0.5) if large else (0.02, 0.05, 0.1, 0.2, 0.35, 0.5)
    structured: list[Config] = [DCT(keep=k) for k in keeps]
    alphas = (0.5,) if large else (0.25, 0.5, 0.75)
    row = math.prod(shape[1:])  # p primaries of row length K store p * K + p * (C_out - p) >= C_out * K
    structured += [Linear(alpha=a) for a in alphas if 1 <= round(a * c_out) < min(c_out, row)]  # when p >= K
    if len(shape) >= 3 and shape[-1] * shape[-2] > 1:
        kh, kw = shape[-2:]
        structured += [Series(harmonics=(nx, ny)) for nx in range(1, min(kh, 8) + 1)
                       for ny in range(1, min(kw, 8) + 1) if (nx, ny) != (kh, kw)]
        slices = math.prod(shape[:-2])
        structured += [Basis(bank=n) for n in ((16, 64) if large else (4, 8, 16, 32, 64)) if n < slices]
    return out + structured + [dataclasses.replace(c, rel_step=0.1) for c in structured]


@dataclass
class Option:
    """One candidate for one tensor: its config, stored bytes (zstd level 3 estimate), weight
    error, estimated relative output error of its layer (None where not known) and whether it
    was fitted under the layer's statistics (``aware``)."""

    config: Config
    bytes: int | None
    error: float | None
    output_error: float | None = None
    #: Whether the candidate was fitted output-aware (under the tensor's statistics).
    aware: bool = False
    #: (final output error / this layer's output error)^2, measured (module doc, "Sensitivity").
    sensitivity: float = 1.0

    @property
    def estimate(self) -> float:
        """This layer's relative output error (the weight error without statistics)."""
        return self.error if self.output_error is None else self.output_error

    @property
    def share(self) -> float:
        """Its estimated share of the model's relative output error: sqrt(sensitivity) * estimate."""
        return math.sqrt(self.sensitivity) * self.estimate


#: A candidate an encoder refused for one tensor, and the refusal's reason.
Skipped = tuple[Config, str]


class Plan(dict):
    """A mapping tensor name -> form config (pass it to ``save``, ``compress_`` or
    ``pack_onnx``), with the chosen options, the candidates skipped per tensor, and the
    measured end-to-end output error on the calibration inputs (``measured``, None when
    not measured) and the estimated one (``estimated``).

    ``hessians`` holds the calibration statistics of the tensors whose chosen config was
    fitted output-aware: ``save(..., forms=plan)`` and ``pack_onnx`` fit those tensors under
    the same statistics, so the file holds exactly the tensors the plan measured. A plan
    read back from JSON has none (its configs are re-fitted to the weights alone, unless
    ``hessians`` are given again)."""

    def __init__(self, options: Mapping[str, Option], skipped: Mapping[str, list[Skipped]] | None = None,
                 measured: float | None = None, evaluations: int = 0,
                 hessians: Mapping[str, Any] | None = None, probes: int = 0) -> None:
        super().__init__({name: option.config for name, option in options.items()})
        self.options = dict(options)
        self.hessians = dict(hessians or {})
        self.skipped = {name: list(s) for name, s in (skipped or {}).items() if s}
        self.measured = measured
        self.evaluations = evaluations
        self.probes = probes

    def __repr__(self) -> str:
        """What the plan costs and loses, then its configs (the mapping ``save`` reads)."""
        measured = "" if self.measured is None else f", measured output error {self.measured:.4g}"
        estimated = self.estimated
        error = "" if estimated is None else f", estimated error {estimated:.4g}"
        return f"<kernelpack.Plan {len(self)} tensors, {self.bytes:,} bytes{error}{measured}: {dict(self)!r}>"

    @property
    def bytes(self) -> int:
        return sum(o.bytes or 0 for o in self.options.values())

    @property
    def estimated(self) -> float | None:
        if any(o.error is None for o in self.options.values()):
            return None
        return math.sqrt(sum(o.share ** 2 for o in self.options.values()))

    @property
    def worst_error(self) -> float | None:
        errors = [o.error for o in self.options.values() if o.error is not None]
        return max(errors, default=None)

    def table(self) -> str:
        """A plain-text report: one row per planned tensor, then totals and errors."""
        rows = [f"{'tensor':40} {'config':44} {'bytes':>10} {'weight err':>10} {'output err':>10}"]
        rows += [f"{n:40} {_short(o.config):44} {_num(o.bytes, 'd'):>10} {_num(o.error, '.4f'):>10} "
                 f"{_num(o.output_error, '.4f'):>10}" for n, o in self.options.items()]
        rows.append(f"{'total':85} {self.bytes:>10}")
        rows.append(f"estimated output error {_num(self.estimated, '.4f')}, measured end to end "
                    f"{_num(self.measured, '.4f')} ({self.evaluations} evaluation(s) on the calibration inputs, "
                    f"{self.probes} sensitivity probe(s) on their first batch)")
        if self.skipped:
            rows.append("skipped (the encoder refused them):")
            rows += [f"{n:40} {_short(c):44} {reason}" for n, s in self.skipped.items() for c, reason in s]
        return "\n".join(rows)

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the plan as the form config that ``kernelpack pack --config`` reads: one rule
        per tensor whose pattern matches exactly that name, no default."""
        write_rules(Rules(tuple(Rule(_exact_pattern(name), config) for name, config in self.items())), path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Plan":
        """A plan written by :meth:`to_json` (configs only: bytes and errors are not stored)."""
        rules = read_rules(path)
        need(rules.default is None and all(_exact_name(r.pattern) is not None and r.config is not None
                                           and r == Rule(r.pattern, r.config) for r in rules.rules), "rules",
             f"{os.fspath(path)} is a form config of patterns, not a plan (one exact name and config per rule)")
        return cls({_exact_name(r.pattern): Option(r.config, None, None) for r in rules.rules})


_SPECIAL = "*?["


def _exact_pattern(name: str) -> str:
    """An fnmatch pattern matching exactly ``name`` (each special character in brackets)."""
    return "".join(f"[{c}]" if c in _SPECIAL else c for c in name)


def _exact_name(pattern: str) -> str | None:
    """The one name an :func:`_exact_pattern` matches, or None for any other pattern."""
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "[" and i + 2 < len(pattern) and pattern[i + 2] == "]" and pattern[i + 1] in _SPECIAL:
            out.append(pattern[i + 1])
            i += 3
        elif pattern[i] in _SPECIAL:
            return None
        else:
            out.append(pattern[i])
            i += 1
    return "".join(out)


def _num(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _short(config: Config) -> str:
    """``series harmonics=(2, 1)``: the form and its settings that differ from the defaults."""
    changed = [f"{k}={_brief(v)}" for k, v in changed_settings(config).items()]
    return " ".join([type(config).__name__.lower(), *changed])[:44]


def _brief(value: Any) -> str:
    return f"array{list(value.shape)}" if hasattr(value, "shape") else repr(value)


def stored_bytes(encoded: Encoded, level: int = BYTES_LEVEL) -> int:
    """Bytes of a tensor's stored arrays and banks as the writer compresses them (at ``level``)."""
    from kernelpack._backend import NUMPY_DTYPES
    from kernelpack.codecs import CODECS, _compress

    total = 0
    for stored in list(encoded.arrays().values()) + list(encoded.banks().values()):
        dtype = NUMPY_DTYPES[stored.dtype]
        raw = np.asarray(stored.data, dtype=dtype, order="C").tobytes()
        total += len(_compress(raw, dtype, level, CODECS)[1])
    return total


def measure(array: np.ndarray, config: Config, name: str | None = None, hessian: Any = None) -> Option:
    """Fit ``config`` to ``array`` (as a float32 tensor; output-aware under ``hessian``), decode
    canonically, measure bytes and weight error. A refusal is a KernelpackError naming ``name``."""
    return _measured(np.asarray(array, np.float32), config, name, hessian)[0]


def _measured(array32: np.ndarray, config: Config, name: str | None, hessian: Any,
              estimator: "_Estimator | None" = None, array64: np.ndarray | None = None,
              exact: bool = True) -> tuple[Option, np.ndarray, Encoded | None]:
    """The option and the decoded tensor (float64) of one candidate, and the encoded tensor
    when its decode was only approximate (``exact=False``: a dct tensor's float inverse DCT,
    :func:`_approximate`). ``array64`` (the same numbers in float64) goes to the structured
    forms: one array for all candidates, so that factorisations keyed by it are reused
    (:func:`kernelpack.forms._weighted.reuse_factors`)."""
    if hessian is None and (array64 is None or isinstance(config, Dense)):
        encoded = encode(name, array32, config)
    else:
        given = array32 if isinstance(config, Dense) else array64
        try:
            encoded = config.encode(given, "float32", hessian=hessian)
        except KernelpackError as exc:
            raise exc.located(tensor=name) from None
    approximate = not exact and isinstance(encoded, DCTTensor)
    decoded = _approximate(encoded) if approximate else encoded.decode(NumpyOps()).astype(np.float64)
    option = Option(config, stored_bytes(encoded), *_errors(array32, decoded, estimator), hessian is not None)
    return option, decoded, encoded if approximate else None


def _errors(array32: np.ndarray, decoded: np.ndarray, estimator: "_Estimator | None") -> tuple[float, float | None]:
    """The weight error of ``decoded`` and its estimated output error (None without statistics)."""
    norm = float(np.linalg.norm(array32))
    error = float(np.linalg.norm(decoded - array32)) / norm if norm > 0 else 0.0
    return error, None if estimator is None else estimator.relative(decoded)


def _approximate(encoded: DCTTensor) -> np.ndarray:
    """A dct tensor's values by scipy's float inverse DCT (O(n log n) per axis, against the
    canonical decode's fixed-point products of O(n^2)): equal to the decode to ~1e-12 relative,
    enough to rank candidates; the plan's chosen candidates are decoded canonically."""
    from scipy.fft import idctn

    from kernelpack._exact import zigzag_positions

    spectrum = np.zeros(encoded.shape)
    spectrum[tuple(zigzag_positions(encoded.shape, encoded.axes, encoded.boundary).T)] = \
        encoded.coefficients.values().astype(np.float64)
    return idctn(spectrum, type=2, norm="ortho", axes=encoded.axes).astype(np.float32).astype(np.float64)


class _Estimator:
    """sqrt(trace(dW H dW^T) / trace(W H W^T)) of one tensor, on a fixed subset of W's rows when
    the full product would exceed ESTIMATE_WORK multiply-adds. The product with H runs in
    float32 (twice BLAS's float64 speed): an estimate needs ~6 digits, and dW is formed in
    float64 before it is rounded, so its relative precision is kept."""

    def __init__(self, weight: np.ndarray, stats: Any) -> None:
        self.stats = stats
        h = np.asarray(stats.h if hasattr(stats, "h") else stats)
        self.h = (h[None] if h.ndim == 2 else h).astype(np.float32)
        matrix = self._matrix(weight)
        rows_per_group = matrix.shape[1]
        k = self.h.shape[-1]
        keep = max(1, min(rows_per_group, ESTIMATE_WORK // max(1, self.h.shape[0] * k * k)))
        self.rows = np.sort(np.random.default_rng(0).choice(rows_per_group, keep, replace=False))
        self.weight = weight
        self.reference = self._energy(matrix)

    def _matrix(self, tensor: np.ndarray) -> np.ndarray:
        if hasattr(self.stats, "matrix"):
            return self.stats.matrix(tensor)
        return tensor.reshape(self.h.shape[0], -1, self.h.shape[-1])

    def _energy(self, matrix: np.ndarray) -> float:
        m = matrix[:, self.rows].astype(np.float32)
        return float(np.einsum("grk,grk->", (m @ self.h).astype(np.float64), m))

    def relative(self, decoded: np.ndarray) -> float:
        if self.reference <= 0:
            return 0.0
        return math.sqrt(max(self._energy(self._matrix(decoded - self.weight)), 0.0) / self.reference)


def fits_with_h(config: Config, stats: Any, shape: tuple[int, ...]) -> bool:
    """Whether a candidate is fitted output-aware: statistics exist, K <= MAX_FIT_K, and the
    form takes their layout (dense any; the structured forms only W's rows = the tensor's)."""
    if stats is None:
        return False
    k = np.shape(stats.h if hasattr(stats, "h") else stats)[-1]
    if k > MAX_FIT_K:
        return False
    if isinstance(config, Dense):  # float storage rounds to nearest whatever H is; dq's trellis
        return config.quantised and not config.dq  # chooses codes itself
    if getattr(stats, "layout", "rows") != "rows":
        return False
    if isinstance(config, DCT):  # CG_ITERATIONS products with H
        return CG_ITERATIONS * shape[0] * k * k <= DCT_FIT_WORK
    return isinstance(config, Linear) or len(shape) >= 3  # series and basis fit kernels inside W's rows


def plannable(array: np.ndarray, min_size: int) -> bool:
    return array.dtype.kind == "f" and array.ndim >= 2 and array.size >= min_size


# --- the model: tensors, statistics, evaluation ----------------------------------------------------
def _is_onnx(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike, bytes, bytearray)) or (
        hasattr(model, "graph") and hasattr(model, "SerializeToString"))


def _is_module(model: Any) -> bool:
    return hasattr(model, "state_dict") and hasattr(model, "named_modules")


class _Model:
    """What the planner needs of a model: its tensors, which to plan, calibration statistics,
    and (for modules and ONNX models with calibration inputs) an end-to-end evaluation."""

    def __init__(self, model: Any, calibration: Any, min_size: int, metric: Metric | None) -> None:
        self.model, self.calibration, self.metric = model, calibration, metric
        self.evaluations = self.probes = 0
        if _is_onnx(model):
            from kernelpack.onnx_io import read_model, take_out, weight_roles

            self.proto = read_model(model)
            self.graph, weights = take_out(self.proto)
            roles = weight_roles(self.graph.graph)
            self.tensors = {n: np.asarray(a) for n, a in weights.items()}
            self.dtypes = {n: a.dtype.name for n, a in weights.items()}
            self.planned = [n for n, a in weights.items() if n in roles and a.dtype in (np.float16, np.float32)
                            and np.isfinite(a).all()]
            self.kind = "onnx"
        else:
            self.tensors, self.dtypes = _arrays(model)
            self.planned = [n for n, a in self.tensors.items() if plannable(a, min_size)]
            self.kind = "module" if _is_module(model) else "mapping"
        if calibration is not None and self.kind == "mapping":
            raise KernelpackError("calibration inputs need a model to run (an nn.Module or an ONNX model); "
                                  "a state dict has no graph, so its plans are weight-only: drop calibration",
                                  field="calibration")
        self._reference: list | None = None
        self._probe_reference: list | None = None

    def stats(self) -> dict[str, Any]:
        if self.calibration is None:
            return {}
        from kernelpack.converters import calibration as cal

        if self.kind == "onnx":
            return cal.collect_onnx(self.proto, self.calibration)
        return cal.collect_torch(self.model, self.calibration)

    @property
    def can_run(self) -> bool:
        return self.calibration is not None and self.kind in ("onnx", "module")

    def error(self, weights: Mapping[str, np.ndarray]) -> float:
        """The end-to-end output error with ``weights`` (decoded, by name) replacing the originals."""
        if self._reference is None:
            self._reference = self._run({})
        outputs = self._run(weights)
        self.evaluations += 1
        if self.metric is not None:
            return float(self.metric(self._reference, outputs))
        return _relative(outputs, self._reference)

    def probe(self, weights: Mapping[str, np.ndarray]) -> float:
        """||y' - y|| / ||y|| on the first calibration batch only (the sensitivity probes: a
        metric of the caller's may be discrete, and small changes must register)."""
        if self._probe_reference is None:
            self._probe_reference = self._run({}, batches=1)
        self.probes += 1
        return _relative(self._run(weights, batches=1), self._probe_reference)

    def _run(self, weights: Mapping[str, np.ndarray], batches: int | None = None) -> list[np.ndarray]:
        return self._run_onnx(weights, batches) if self.kind == "onnx" else self._run_torch(weights, batches)

    def _run_onnx(self, weights: Mapping[str, np.ndarray], batches: int | None = None) -> list[np.ndarray]:
        from kernelpack.converters.calibration import _onnx_batches, _session, BATCH_SIZE

        full = {n: (np.asarray(weights[n], a.dtype) if n in weights else a) for n, a in self.tensors.items()}
        graph = type(self.graph)()
        graph.CopyFrom(self.graph)
        session = _session(graph, full, [])
        names = [o.name for o in session.get_outputs()]
        parts: list[list[np.ndarray]] = [[] for _ in names]
        try:
            for batch in itertools.islice(_onnx_batches(self.calibration, BATCH_SIZE), batches):
                for i, y in enumerate(session.run(names, {k: np.asarray(v) for k, v in batch.items()})):
                    parts[i].append(np.asarray(y))
        except KernelpackError:
            raise
        except Exception as exc:  # ORT raises its own types: report as one
            raise KernelpackError(f"onnxruntime cannot run the calibration inputs: {exc}", field="calibration") from None
        return [np.concatenate(p) if p and p[0].ndim else np.asarray(p) for p in parts]

    def _run_torch(self, weights: Mapping[str, np.ndarray], batches: int | None = None) -> list[np.ndarray]:
        import torch

        from kernelpack.converters.calibration import BATCH_SIZE, _torch_batches

        state = self.model.state_dict()
        saved = {n: state[n].detach().clone() for n in weights}
        training = self.model.training
        self.model.eval()
        parts: list[list[np.ndarray]] = []
        try:
            with torch.no_grad():
                for n, w in weights.items():
                    state[n].copy_(torch.as_tensor(np.asarray(w), dtype=state[n].dtype))
                for args, kwargs in itertools.islice(_torch_batches(torch, self.calibration, BATCH_SIZE), batches):
                    flat = _flatten(self.model(*args, **kwargs))
                    parts = parts or [[] for _ in flat]
                    for i, y in enumerate(flat):
                        parts[i].append(y.detach().cpu().double().numpy())
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    state[n].copy_(w)
            self.model.train(training)
        return [np.concatenate(p) for p in parts]


def _relative(outputs: list, reference: list) -> float:
    """||y' - y|| / ||y|| over all outputs concatenated (||y' - y|| where y is all zero)."""
    num = sum(float(np.sum((np.asarray(a, np.float64) - b) ** 2)) for a, b in zip(outputs, reference))
    den = sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in reference)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _flatten(y: Any) -> list:
    if isinstance(y, (tuple, list)):
        return [t for v in y for t in _flatten(v)]
    if isinstance(y, Mapping):
        return [t for v in y.values() for t in _flatten(v)]
    return [y]


# --- the plan ------------------------------------------------------------------------------------
def plan(model: Any, calibration: Any = None, *, max_output_error: float | None = None,
         max_bytes: int | None = None, max_error: float | None = None, metric: Metric | None = None,
         candidates: Candidates | Sequence[Config] | None = None, progress: bool | None = None,
         min_size: int = 64, forms: Any = None, stats: Mapping[str, Any] | None = None,
         output_aware: bool = True, threads: int | None = None, sensitivity: bool = True) -> Plan:
    """Propose a form per tensor of ``model`` that meets a budget (see the module doc).

    Args:
        model: an nn.Module, a mapping of names to arrays (weight-only: no graph to run), or
            an ONNX model (path, bytes or ModelProto).
        calibration: model inputs by name (first axis = samples) or an iterable of such
            batches; a module also takes a tensor. Plan on calibration inputs, score on others.
        max_output_error: the budget in the model's outputs (relative RMS error on
            ``calibration``, or ``metric``'s); needs a graph to run.
        max_bytes: the budget in file bytes.
        max_error: the budget in weight error (relative RMS over the planned tensors).
        metric: ``metric(reference_outputs, outputs) -> error`` instead of the relative RMS.
        candidates: the configs to choose among (default: every form at several settings).
        progress: a tqdm bar (default: when stderr is a terminal).
        min_size: tensors with fewer elements stay as they are.
        forms: configs fixed beforehand (rules as for ``save``).
        stats: precomputed statistics by tensor name (``LayerStats`` or H for the tensor's
            rows) instead of collecting them.
        output_aware: False ignores the statistics (weight-only fits and estimates) but
            still measures.
        threads: tensors measured at once (None: one per CPU core); the plan is the same
            with any number.
        sensitivity: False skips the sensitivity probes (every layer's share counts alike).

    Returns:
        A :class:`Plan`: a mapping of tensor names to configs, which ``save``, ``compress_``
        and ``pack_onnx`` take as ``forms``; ``table()`` says what each tensor costs and loses.

    Raises:
        KernelpackError: field ``budget`` when no choice meets the budgets, field
            ``candidates`` when every candidate's encoder refuses a tensor.

    Example:
        >>> import numpy as np, kernelpack
        >>> rng = np.random.default_rng(0)
        >>> weights = {"conv.weight": rng.standard_normal((16, 8, 3, 3)).astype(np.float32)}
        >>> chosen = kernelpack.plan(weights, max_error=0.05, progress=False)
        >>> list(chosen)
        ['conv.weight']
        >>> _ = kernelpack.save(weights, "planned.kpk", forms=chosen)
    """
    _check_budgets(max_bytes, max_error, max_output_error, min_size)
    if metric is not None and not callable(metric):
        raise KernelpackError(f"must be a function (y_ref, y_new) -> float, got {shown(metric)}", field="metric")
    subject = _Model(model, calibration, min_size, metric)
    if max_output_error is not None and not subject.can_run and stats is None:
        raise KernelpackError("max_output_error needs calibration inputs and a model to run (an nn.Module or "
                              "an ONNX model); for a state dict give max_error or max_bytes", field="calibration")
    fixed = {n: m.config or Dense() for n, m in rules_of(forms).assign(subject.tensors).items()}
    names = [n for n in subject.planned if n not in fixed]
    layer_stats = stats if stats is not None else (subject.stats() if names else {})
    if not output_aware:
        layer_stats = {}
    choose = _candidate_fn(candidates)
    configs = {name: _tensor_configs(choose, name, subject) for name in names}  # checked before any fit
    keep_decoded = subject.can_run

    def measure_tensor(name: str) -> tuple[list[Option], list[Skipped], list[np.ndarray]]:
        return _measure_all(name, subject.tensors[name], configs[name], layer_stats.get(name),
                            subject.dtypes[name], max_error)

    bar = progress_bar(None, progress, "plan", "tensor", total=len(names))
    try:
        measured = _map_tensors(measure_tensor, names, threads, bar,
                                lambda n: subject.tensors[n].size * len(configs[n]))
    finally:
        bar.close()
    options = {name: hull for name, (hull, _, _) in measured.items()}
    skipped = {name: refused for name, (_, refused, _) in measured.items()}
    decoded = {name: {id(o): out for o, out in zip(hull, outs)} for name, (hull, _, outs) in measured.items()
               if keep_decoded}
    if sensitivity and keep_decoded and (max_output_error is not None or max_bytes is not None):
        _sensitivities(subject, options, decoded, progress)
    path = _Path(options)
    fixed_weights = _fixed_decoded(subject, fixed) if keep_decoded else {}

    bars: list[Any] = []  # the evaluations' bar, made on the first one

    def evaluate(point: dict[str, Option]) -> float:
        weights = {**fixed_weights, **{n: decoded[n][id(o)] for n, o in point.items()}}
        if not bars:
            bars.append(progress_bar(None, progress, "measure", "run", total=MAX_EVALUATIONS))
        error = subject.error(weights)
        bars[0].update()
        bars[0].set_postfix(error=f"{error:.4g}", bytes=_total(point))
        return error

    try:
        picked, measured_error = _choose(subject, path, evaluate, names, max_output_error, max_bytes)
    finally:
        for bar in bars:
            bar.close()
    hessians = {n: layer_stats[n] for n in names if picked[n].aware}
    result = Plan({n: picked[n] for n in names}, skipped, measured_error, subject.evaluations, hessians,
                  subject.probes)
    _warn_skipped(result)
    return result


def _choose(subject: _Model, path: "_Path", evaluate: Callable[[dict[str, Option]], float], names: list[str],
            max_output_error: float | None, max_bytes: int | None) -> tuple[dict[str, Option], float | None]:
    """The path point the budgets pick (module doc, "Allocation" and "Measured"), and its
    measured output error (None when not measured)."""
    measured_error = None
    if max_output_error is not None and subject.can_run:
        picked, measured_error = _search(path, evaluate, max_output_error, max_bytes)
    elif max_output_error is not None:  # statistics without a graph: the estimate only
        picked = path.within_estimate(max_output_error)
        if picked is None or (max_bytes is not None and _total(picked) > max_bytes):
            raise KernelpackError(f"no plan has an estimated output error <= {max_output_error} within the "
                                  f"budget; the best estimate is {path.estimate(path.point(len(path))):.4g}",
                                  field="budget")
    elif max_bytes is not None:
        picked = path.within_bytes(max_bytes)
        if subject.can_run:
            measured_error = evaluate(picked)
    else:
        picked = path.point(0)  # the smallest of each tensor (within max_error)
        if subject.can_run and names:
            measured_error = evaluate(picked)
    return picked, measured_error


def _sensitivities(subject: _Model, options: Mapping[str, list[Option]],
                   decoded: Mapping[str, Mapping[int, np.ndarray]], progress: bool | None) -> None:
    """Each planned tensor's sensitivity (module doc, "Sensitivity"), set on its options."""
    probe_of = {}
    for name, hull in options.items():
        lossy = [o for o in hull if o.estimate > 0]
        if lossy:
            probe_of[name] = min(lossy, key=lambda o: abs(math.log(o.estimate / PROBE_ERROR)))
    ranked = sorted(probe_of, key=lambda n: options[n][-1].bytes - options[n][0].bytes, reverse=True)
    alone = ranked if len(ranked) <= MAX_PROBES else ranked[:MAX_PROBES - 1]
    groups = [[n] for n in alone] + ([ranked[len(alone):]] if len(ranked) > len(alone) else [])
    bar = progress_bar(None, progress, "probe", "run", total=len(groups))
    try:
        for group in groups:
            final = subject.probe({n: decoded[n][id(probe_of[n])] for n in group})
            value = max(final ** 2 / sum(probe_of[n].estimate ** 2 for n in group), MIN_SENSITIVITY)
            for name in group:
                for option in options[name]:
                    option.sensitivity = value
            bar.update()
    finally:
        bar.close()


def _fixed_decoded(subject: _Model, fixed: Mapping[str, Config]) -> dict[str, np.ndarray]:
    """The decoded values of the tensors ``forms`` fixed (lossy ones take part in measurements)."""
    return {n: encode(n, subject.tensors[n], c).decode(NumpyOps()) for n, c in fixed.items()}


def _total(point: Mapping[str, Option]) -> int:
    return sum(o.bytes for o in point.values())


class _Path:
    """The Lagrangian path of plans: point i is the smallest candidate of every tensor after the
    first i hull upgrades in order of steepest error reduction per byte."""

    def __init__(self, options: Mapping[str, list[Option]]) -> None:
        self.options = options
        steps = [(_slope(opts[i], opts[i + 1]), name, i + 1) for name, opts in options.items()
                 for i in range(len(opts) - 1)]
        steps.sort(key=lambda s: (s[0], s[1], s[2]))  # hull slopes increase along a tensor: order kept
        self.steps = [(name, level) for _, name, level in steps]
        self.bytes = np.cumsum([_total(self.point(0))] + [
            options[n][lv].bytes - options[n][lv - 1].bytes for n, lv in self.steps])
        squares = [sum(o[0].share ** 2 for o in options.values())]
        for n, lv in self.steps:
            squares.append(squares[-1] + options[n][lv].share ** 2 - options[n][lv - 1].share ** 2)
        self.squares = np.maximum(np.array(squares), 0.0)

    def __len__(self) -> int:
        return len(self.steps)

    def point(self, i: int) -> dict[str, Option]:
        level = {n: 0 for n in self.options}
        for n, lv in self.steps[:i]:
            level[n] = lv
        return {n: opts[level[n]] for n, opts in self.options.items()}

    def estimate(self, point: Mapping[str, Option]) -> float:
        return math.sqrt(sum(o.share ** 2 for o in point.values()))

    def index_within_estimate(self, target: float) -> int | None:
        ok = np.nonzero(np.sqrt(self.squares) <= target)[0]
        return int(ok[0]) if len(ok) else None

    def within_estimate(self, target: float) -> dict[str, Option] | None:
        i = self.index_within_estimate(target)
        return None if i is None else self.point(i)

    def last_within_bytes(self, max_bytes: int) -> int:
        i = int(np.searchsorted(self.bytes, max_bytes, side="right")) - 1
        if i < 0:
            raise KernelpackError(f"max_bytes={max_bytes} is below the smallest plan ({int(self.bytes[0])} bytes)",
                                  field="budget")
        return i

    def index_of_bytes(self, size: float, low: int, high: int) -> int:
        """The point strictly between ``low`` and ``high`` whose bytes are nearest ``size``
        from above (``low`` + 1 when ``high`` is the next one: then there is none between)."""
        i = int(np.searchsorted(self.bytes, size, side="left"))
        return min(max(i, low + 1), max(high - 1, low + 1))

    def within_bytes(self, max_bytes: int) -> dict[str, Option]:
        return self.point(self.last_within_bytes(max_bytes))


def _search(path: _Path, evaluate: Callable[[dict[str, Option]], float], target: float,
            max_bytes: int | None) -> tuple[dict[str, Option], float]:
    """The smallest path point that measures within ``target`` (module doc, "Measured").

    Until a point within the target is known, the next point is the first whose estimate is
    within the corrected goal, and never one known too inaccurate (below it, the goal drops
    to 0.7 times the estimate of the largest such point). Once bracketed, the corrected goal's
    point if it lies inside the bracket, else the point halfway in bytes; the search stops
    when the bracket's bytes differ by less than :data:`BYTES_TOLERANCE`."""
    top = len(path) if max_bytes is None else path.last_within_bytes(max_bytes)
    results: dict[int, float] = {}
    low, high = -1, None  # indices known too inaccurate / within the target
    goal = target
    while len(results) < MAX_EVALUATIONS:
        if low >= 0 and high is None:
            goal = min(goal, 0.7 * math.sqrt(path.squares[low]))
        i = path.index_within_estimate(goal)
        i = top if i is None else min(i, top)
        if high is not None and not low < i < high:
            i = path.index_of_bytes(math.sqrt(max(path.bytes[max(low, 0)], 1) * path.bytes[high]), low, high)
        if i in results or (i <= low and i == top):
            break
        e = results[i] = evaluate(path.point(i))
        if e <= target:
            high = i
        else:
            low = i
        if high is not None and (high - low <= 1 or (low >= 0 and path.bytes[high] <= (1 + BYTES_TOLERANCE)
                                                     * path.bytes[low])):
            break
        goal = goal * min(max(target / e, 0.1), 10.0) if e > 0 else goal * 10.0
    if high is None:
        best = min(results.values())
        raise KernelpackError(f"no plan meets max_output_error={target}: the most accurate plan tried measured "
                              f"{best:.4g} on the calibration inputs ({int(path.bytes[min(results, key=results.get)])} "
                              "bytes)" + (f" within max_bytes={max_bytes}" if max_bytes is not None else ""),
                              field="budget")
    return path.point(high), results[high]


def _check_budgets(max_bytes: Any, max_error: Any, max_output_error: Any, min_size: Any) -> None:
    """The budgets are numbers (checked before any fit, which may take minutes)."""
    need(max_bytes is not None or max_error is not None or max_output_error is not None, "budget",
         "give max_output_error, max_bytes, max_error or several")
    if max_bytes is not None:
        need(isinstance(max_bytes, (int, np.integer)) and not isinstance(max_bytes, bool) and max_bytes >= 0,
             "max_bytes", f"must be an integer >= 0, got {shown(max_bytes)}")
    for field, value in (("max_error", max_error), ("max_output_error", max_output_error)):
        if value is not None:
            need(isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
                 and math.isfinite(value) and value >= 0, field, f"must be a finite number >= 0, got {shown(value)}")
    need(isinstance(min_size, (int, np.integer)) and not isinstance(min_size, bool), "min_size",
         f"must be an integer, got {shown(min_size)}")


def _tensor_configs(choose: Candidates, name: str, subject: _Model) -> list[Config]:
    """The candidates for one planned tensor; for a tensor not stored as float32 without
    the default list's quantised dense (its codes stand for float32 numbers)."""
    configs = _configs(choose, name, subject.tensors[name].shape)
    if subject.dtypes[name] != "float32" and choose is default_candidates:
        configs = [c for c in configs if not (isinstance(c, Dense) and c.quantised)]
    return configs


def _map_tensors(fn: Callable[[str], Any], names: list[str], threads: int | None, bar: Any,
                 cost: Callable[[str], int]) -> dict[str, Any]:
    """``{name: fn(name)}`` in the order of ``names``, on up to ``threads`` threads (None: one
    per core), costliest first, each finished tensor counted on ``bar``. Tensors are
    independent and each fit is deterministic, so the result does not depend on the threads.
    BLAS runs on one thread for the duration, whatever ``threads`` is (a process-wide setting,
    restored after: the fits are many small products, where BLAS's own threads only collide
    with the tensor threads, and a product's sums would otherwise depend on how many there
    are: on one tensor thread the measured output errors moved in the 9th digit). A failure is
    that of the first failing tensor in the order of ``names``, as in a loop: once one fails,
    the tensors after it in that order are cancelled (those running finish), the ones before
    it still run, and an earlier failure among them is raised instead. (Cancelling every
    tensor not yet started made the error depend on which threads had started: a test saw
    the later of two failing tensors one run in ten.)"""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    from kernelpack._parallel import one_blas_thread, worker_count

    workers = worker_count(threads, len(names))
    if workers == 1:
        out = {}
        with one_blas_thread():  # the same sums as on several threads
            for name in names:
                out[name] = fn(name)
                bar.update()
        return out
    with one_blas_thread(), ThreadPoolExecutor(workers, thread_name_prefix="kernelpack-plan") as pool:
        futures = {}
        for name in sorted(names, key=cost, reverse=True):
            futures[name] = pool.submit(fn, name)
            futures[name].add_done_callback(lambda f: f.cancelled() or bar.update())
        wait(futures.values(), return_when=FIRST_EXCEPTION)
        first = next((i for i, n in enumerate(names) if futures[n].done() and futures[n].exception() is not None),
                     None)
        if first is not None:
            for name in names[first + 1:]:
                futures[name].cancel()
    failed = [futures[n] for n in names if futures[n].done() and not futures[n].cancelled()
              and futures[n].exception() is not None]
    if failed:
        raise failed[0].exception()
    return {name: futures[name].result() for name in names}


def _configs(choose: Candidates, name: str, shape: tuple[int, ...]) -> list[Config]:
    """The candidates for one tensor, each checked to be a form config."""
    configs = choose(name, shape)
    if not isinstance(configs, Iterable):
        raise KernelpackError(f"must give form configs, got {shown(configs)}", tensor=name, field="candidates")
    configs = list(configs)
    bad = next((c for c in configs if not isinstance(c, Config)), None)
    if bad is not None:
        raise KernelpackError(f"{shown(bad)} is not a form config (Dense, DCT, Series, Basis or Linear)",
                              tensor=name, field="candidates")
    return configs


def _measure_all(name: str, array: np.ndarray, configs: list[Config], stats: Any, dtype: str = "float32",
                 max_error: float | None = None) -> tuple[list[Option], list[Skipped], list[np.ndarray]]:
    """The lower hull of one tensor's candidates within ``max_error`` (factorisations of its H
    shared by all of them), the candidates whose encoder refused it, with why, and the hull's
    decoded tensors; refused by every candidate, or none within ``max_error``, is an error.
    With statistics, output-aware fits only where :func:`_refit` says they can matter
    (module doc, "Pruning"). dct candidates are ranked on their approximate values, and the
    hull's are then decoded canonically (their errors are the canonical decode's) until the
    hull holds only canonical decodes."""
    from kernelpack.forms._weighted import reuse_factors

    array32 = np.asarray(array, np.float32)
    array64 = array32.astype(np.float64)
    estimator = None if stats is None else _Estimator(array64, stats)
    skipped: list[Skipped] = []

    def fit(config: Config, hessian: Any) -> tuple[Option, np.ndarray, Encoded | None] | None:
        try:
            own = isinstance(config, Dense) and not config.quantised and dtype in ("float16", "float32")
            return (_measured(array.astype(dtype), config, name, None, estimator) if own else
                    _measured(array32, config, name, hessian, estimator, array64, exact=False))
        except KernelpackError as exc:
            skipped.append((config, str(KernelpackError(exc.reason, field=exc.field))))  # the tensor is known
            return None

    with reuse_factors():
        aware = [fits_with_h(c, stats, array.shape) for c in configs]
        results = [fit(c, None) for c in configs]  # weight-only first: cheap, and an upper bound
        if any(aware):
            _refit(configs, results, aware, lambda i: fit(configs[i], stats))
    kept = [r for r in results if r is not None]
    if not kept:
        raise KernelpackError(f"no candidate form can encode it{_skipped_note(skipped)}", tensor=name,
                              field="candidates")
    while True:
        kept = _within(kept, max_error, name, skipped)
        hull = _hull([option for option, _, _ in kept])
        on_hull = {id(o) for o in hull}
        pending = [i for i, (option, _, encoded) in enumerate(kept) if encoded is not None and id(option) in on_hull]
        if not pending:
            break
        for i in pending:
            option, _, encoded = kept[i]
            decoded = encoded.decode(NumpyOps()).astype(np.float64)
            error, output_error = _errors(array32, decoded, estimator)
            kept[i] = (dataclasses.replace(option, error=error, output_error=output_error), decoded, None)
    by_id = {id(option): decoded for option, decoded, _ in kept}
    return hull, skipped, [by_id[id(o)].astype(np.float32) for o in hull]


def _within(kept: list, max_error: float | None, name: str, skipped: list[Skipped]) -> list:
    """The measured candidates within ``max_error`` (all without one); none is an error."""
    if max_error is None:
        return kept
    within = [r for r in kept if r[0].error <= max_error]
    if not within:
        raise KernelpackError(f"no candidate form is within max_error={max_error}{_skipped_note(skipped)}",
                              tensor=name, field="budget")
    return within


def _family(config: Config) -> tuple[type, bool]:
    return type(config), config.quantised


def _refit(configs: list[Config], results: list[tuple | None], aware: list[bool],
           fit: Callable[[int], tuple | None]) -> None:
    """Replace the weight-only results of the candidates worth an output-aware fit by that fit
    (module doc, "Pruning"): first each family's most and least accurate candidates (its
    probes, which measure how much H helps that form on this tensor), then every other
    candidate that, improved by the probes' best ratio times REFIT_MARGIN, would lie on or
    below the lower hull of the points known after the probes."""
    todo = [i for i, r in enumerate(results) if aware[i] and r is not None]
    families: dict[tuple[type, bool], list[int]] = {}
    for i in todo:
        families.setdefault(_family(configs[i]), []).append(i)
    ratio, probes = {}, set()
    for family, members in families.items():
        by_estimate = sorted(members, key=lambda i: results[i][0].estimate)
        ratio[family] = 1.0
        for i in {by_estimate[0], by_estimate[-1]}:
            before = results[i][0].estimate
            results[i] = fit(i)
            after = results[i][0].estimate if results[i] is not None else 0.0  # refused: fit (and list) all
            ratio[family] = min(ratio[family], after / before if before > 0 else 1.0)
            probes.add(i)
    hull = _hull([r[0] for r in results if r is not None])
    for i in todo:
        if i in probes or results[i] is None:
            continue
        option = results[i][0]
        hoped = ratio[_family(configs[i])] * REFIT_MARGIN * option.estimate
        if _below_hull(hull, option.bytes, hoped ** 2):
            results[i] = fit(i)


def _below_hull(hull: list[Option], size: int, square: float) -> bool:
    """Whether the point (size, square) lies on or below the lower convex hull ``hull`` (by
    increasing bytes, decreasing error) of (bytes, estimate^2): a point there is a hull vertex."""
    if not hull or size <= hull[0].bytes:
        return True
    if size >= hull[-1].bytes:
        return square < hull[-1].estimate ** 2
    right = next(j for j, o in enumerate(hull) if o.bytes >= size)
    a, b = hull[right - 1], hull[right]
    chord = a.estimate ** 2 + (b.estimate ** 2 - a.estimate ** 2) * (size - a.bytes) / (b.bytes - a.bytes)
    return square <= chord


def _warn_skipped(result: Plan) -> None:
    if result.skipped:
        count = sum(map(len, result.skipped.values()))
        name, ((config, reason), *_) = next(iter(result.skipped.items()))
        warnings.warn(f"plan skipped {count} candidate(s) whose encoder refused a tensor, e.g. {_short(config)} "
                      f"for tensor '{name}': {reason} (all listed in Plan.skipped and Plan.table())", stacklevel=3)


def _skipped_note(skipped: list[Skipped]) -> str:
    """What an error says about the refused candidates: how many, and the first reason."""
    return f" ({len(skipped)} refused, e.g. {_short(skipped[0][0])}: {skipped[0][1]})" if skipped else ""


def _arrays(model: Any) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """float64 numpy of every floating tensor of a model (its plain state) or of a mapping,
    and the tensors' own dtypes."""
    out, dtypes = {}, {}
    for name, value in state_of(model).items():
        if isinstance(value, Encoded):
            continue  # already in a stored form (trained in place)
        try:
            array, dtype = as_numpy(value)
        except KernelpackError as exc:
            raise exc.located(tensor=name) from None
        if dtype in ("float16", "bfloat16", "float32", "float64"):
            array = bfloat16_bits_to_float32(array) if dtype == "bfloat16" else array
            out[name] = np.asarray(array, dtype=np.float64)
            dtypes[name] = dtype
    return out, dtypes


def _candidate_fn(candidates: Candidates | Sequence[Config] | None) -> Candidates:
    if candidates is None:
        return default_candidates
    if callable(candidates):
        return candidates
    need(isinstance(candidates, Iterable) and not isinstance(candidates, (str, bytes)), "candidates",
         f"must be a list of form configs or a function of (name, shape), got {shown(candidates)}")
    fixed = list(candidates)
    return lambda name, shape: fixed


def _hull(options: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (bytes, estimate^2), by increasing bytes."""
    best: dict[int, Option] = {}
    for o in options:  # per byte count the smallest error
        if o.bytes not in best or o.estimate < best[o.bytes].estimate:
            best[o.bytes] = o
    hull: list[Option] = []
    for o in sorted(best.values(), key=lambda o: o.bytes):
        if hull and o.estimate >= hull[-1].estimate:
            continue  # more bytes, no better
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-1], o):
            hull.pop()  # hull[-1] lies above the chord: never the best at any trade-off
        hull.append(o)
    return hull


def _slope(a: Option, b: Option) -> float:
    """Squared-error reduction per byte from a to b (negative: error falls), in shares of the
    model's output error (one tensor's options share one sensitivity: its hull is the same)."""
    return (b.share ** 2 - a.share ** 2) / (b.bytes - a.bytes)
