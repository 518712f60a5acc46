"""``plan(model, max_bytes=..., max_error=...)``: a per-tensor form config meeting a budget.

Every candidate form is fitted in closed form (the forms' own encoders) and decoded
canonically with numpy, so a plan costs seconds and needs no torch for numpy input
(ONNX models). Per-layer and anisotropic orders (Nx != Ny), which the ApproxConv
paper leaves to future work, are just more candidates.

Decisions:

* **Error** of a tensor is its relative RMS error ||W - W'|| / ||W|| (0 for a zero
  tensor). ``max_error`` caps it for every planned tensor.
* **Bytes** are the stored arrays' raw bytes (banks included; zstd may save a few
  per cent more; the header is not counted). ``max_bytes`` caps their total over all
  planned tensors.
* **Choice.** With only ``max_error``, each tensor takes its smallest candidate within
  the cap. With ``max_bytes``, the plan minimises the sum of the tensors' squared
  relative errors (every layer counts alike) under the cap, greedily along each
  tensor's lower convex hull of (bytes, error^2) - the classic Lagrangian
  bit-allocation. Both caps may be given.
* **Which tensors.** Floating tensors of rank >= 2 with at least ``min_size`` elements;
  the rest (biases, norms, small tensors) stay dense as they are. Each is planned as the
  float32 tensor of its numbers (what ``Dense()`` counts, whatever its own dtype).
* **Refused candidates.** A candidate whose encoder refuses a tensor (a ``KernelpackError``:
  float16 overflow, a shape the form cannot take) is skipped, never silently: the plan
  lists it with the reason (``Plan.skipped``, ``Plan.table()``) and warns once. A tensor
  for which every candidate is refused raises (field ``candidates``).
"""

from __future__ import annotations

import math
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from kernelpack._backend import NumpyOps, bfloat16_bits_to_float32
from kernelpack.errors import KernelpackError
from kernelpack.forms import DCT, Basis, Config, Dense, Encoded, Linear, Series
from kernelpack.forms._base import need, shown
from kernelpack.pack import as_numpy, encode, state_of

Candidates = Callable[[str, tuple[int, ...]], Iterable[Config]]


def default_candidates(name: str, shape: tuple[int, ...]) -> list[Config]:
    """Dense float16 plus, by shape: series of every (Nx, Ny) below the kernel size, banks of
    4..64 filters and DCT for kernels; DCT and low-rank linear for every tensor of rank >= 2."""
    out: list[Config] = [Dense(dtype="float16")]
    c_out = shape[0]
    out += [DCT(keep=k) for k in (0.02, 0.05, 0.1, 0.2, 0.35, 0.5)]
    out += [Linear(alpha=a) for a in (0.25, 0.5, 0.75) if 1 <= round(a * c_out) < c_out]
    if len(shape) >= 3 and shape[-1] * shape[-2] > 1:
        kh, kw = shape[-2:]
        out += [Series(harmonics=(nx, ny)) for nx in range(1, min(kh, 8) + 1)
                for ny in range(1, min(kw, 8) + 1) if (nx, ny) != (kh, kw)]
        slices = math.prod(shape[:-2])
        out += [Basis(bank=n) for n in (4, 8, 16, 32, 64) if n < slices]
    return out


@dataclass
class Option:
    """One candidate for one tensor: its config, stored bytes and relative RMS error."""

    config: Config
    bytes: int
    error: float


#: A candidate an encoder refused for one tensor, and the refusal's reason.
Skipped = tuple[Config, str]


class Plan(dict):
    """A mapping tensor name -> form config (pass it to ``save`` or ``compress_``), with
    the chosen options' bytes and errors, and the candidates skipped per tensor, for a report."""

    def __init__(self, options: Mapping[str, Option],
                 skipped: Mapping[str, list[Skipped]] | None = None) -> None:
        super().__init__({name: option.config for name, option in options.items()})
        self.options = dict(options)
        self.skipped = {name: list(s) for name, s in (skipped or {}).items() if s}

    @property
    def bytes(self) -> int:
        return sum(o.bytes for o in self.options.values())

    def table(self) -> str:
        """A plain-text report: one row per planned tensor."""
        rows = [f"{'tensor':40} {'config':44} {'bytes':>10} {'rel. error':>10}"]
        rows += [f"{n:40} {_short(o.config):44} {o.bytes:>10} {o.error:>10.4f}" for n, o in self.options.items()]
        rows.append(f"{'total':85} {self.bytes:>10}")
        if self.skipped:
            rows.append("skipped (the encoder refused them):")
            rows += [f"{n:40} {_short(c):44} {reason}" for n, s in self.skipped.items() for c, reason in s]
        return "\n".join(rows)


def _short(config: Config) -> str:
    """``series harmonics=(2, 1)``: the form and its settings that differ from the defaults."""
    changed = [f"{f.name}={_brief(getattr(config, f.name))}" for f in dataclasses.fields(config)
               if not _is_default(getattr(config, f.name), f.default)]
    return " ".join([type(config).__name__.lower(), *changed])[:44]


def _brief(value: Any) -> str:
    return f"array{list(value.shape)}" if hasattr(value, "shape") else repr(value)


def _is_default(value: Any, default: Any) -> bool:
    return value is default or (isinstance(value, (int, float, str, tuple)) and value == default)


def stored_bytes(encoded: Encoded) -> int:
    """Raw bytes of a tensor's stored arrays and banks."""
    arrays = list(encoded.arrays().values()) + list(encoded.banks().values())
    return sum(a.data.nbytes for a in arrays)


def measure(array: np.ndarray, config: Config, name: str | None = None) -> Option:
    """Fit ``config`` to ``array`` (as a float32 tensor), decode canonically, measure bytes and
    relative RMS error against ``array``. A refusal is a KernelpackError naming tensor ``name``."""
    encoded = encode(name, np.asarray(array, np.float32), config)
    decoded = encoded.decode(NumpyOps()).astype(np.float64)
    norm = float(np.linalg.norm(array))
    error = float(np.linalg.norm(decoded - array)) / norm if norm > 0 else 0.0
    return Option(config, stored_bytes(encoded), error)


def plannable(array: np.ndarray, min_size: int) -> bool:
    return array.dtype.kind == "f" and array.ndim >= 2 and array.size >= min_size


def plan(model: Any, *, max_bytes: int | None = None, max_error: float | None = None,
         candidates: Candidates | Sequence[Config] | None = None, min_size: int = 64,
         progress: bool = False) -> Plan:
    """Propose a form per tensor of a model or a mapping of names to arrays (see module doc).

    Raises :class:`KernelpackError` (field ``budget``) when no choice meets the budgets, and
    (field ``candidates``) when every candidate's encoder refuses a tensor.
    """
    _check_budgets(max_bytes, max_error, min_size)
    tensors = _arrays(model)
    choose = _candidate_fn(candidates)
    names = [n for n, a in tensors.items() if plannable(a, min_size)]
    options: dict[str, list[Option]] = {}
    skipped: dict[str, list[Skipped]] = {}
    for name in _progress(names, progress):
        measured, skipped[name] = _measure_all(name, tensors[name], _configs(choose, name, tensors[name].shape))
        if max_error is not None:
            measured = [o for o in measured if o.error <= max_error]
            if not measured:
                raise KernelpackError(f"no candidate form is within max_error={max_error}"
                                      f"{_skipped_note(skipped[name])}", tensor=name, field="budget")
        options[name] = _hull(measured)
    picked = {n: opts[0] for n, opts in options.items()}  # the smallest of each tensor
    if max_bytes is not None:
        picked = _fill(options, max_bytes)
    result = Plan({n: picked[n] for n in names}, skipped)
    if result.skipped:
        count = sum(map(len, result.skipped.values()))
        name, ((config, reason), *_) = next(iter(result.skipped.items()))
        warnings.warn(f"plan skipped {count} candidate(s) whose encoder refused a tensor, e.g. {_short(config)} "
                      f"for tensor '{name}': {reason} (all listed in Plan.skipped and Plan.table())", stacklevel=2)
    return result


def _check_budgets(max_bytes: Any, max_error: Any, min_size: Any) -> None:
    """The budgets are numbers (checked before any fit, which may take minutes)."""
    need(max_bytes is not None or max_error is not None, "budget", "give max_bytes, max_error or both")
    if max_bytes is not None:
        need(isinstance(max_bytes, (int, np.integer)) and not isinstance(max_bytes, bool) and max_bytes >= 0,
             "max_bytes", f"must be an integer >= 0, got {shown(max_bytes)}")
    if max_error is not None:
        need(isinstance(max_error, (int, float, np.integer, np.floating)) and not isinstance(max_error, bool)
             and math.isfinite(max_error) and max_error >= 0, "max_error",
             f"must be a finite number >= 0, got {shown(max_error)}")
    need(isinstance(min_size, (int, np.integer)) and not isinstance(min_size, bool), "min_size",
         f"must be an integer, got {shown(min_size)}")


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


def _measure_all(name: str, array: np.ndarray, configs: list[Config]) -> tuple[list[Option], list[Skipped]]:
    """Every candidate measured on one tensor, and those whose encoder refused it, with why;
    refused by every candidate is an error."""
    measured, skipped = [], []
    for config in configs:
        try:
            measured.append(measure(array, config, name))
        except KernelpackError as exc:
            skipped.append((config, str(KernelpackError(exc.reason, field=exc.field))))  # the tensor is known
    if not measured:
        raise KernelpackError(f"no candidate form can encode it{_skipped_note(skipped)}", tensor=name,
                              field="candidates")
    return measured, skipped


def _skipped_note(skipped: list[Skipped]) -> str:
    """What an error says about the refused candidates: how many, and the first reason."""
    return f" ({len(skipped)} refused, e.g. {_short(skipped[0][0])}: {skipped[0][1]})" if skipped else ""


def _arrays(model: Any) -> dict[str, np.ndarray]:
    """float64 numpy of every tensor of a model (its plain state) or of a mapping."""
    out = {}
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
    return out


def _candidate_fn(candidates: Candidates | Sequence[Config] | None) -> Candidates:
    if candidates is None:
        return default_candidates
    if callable(candidates):
        return candidates
    need(isinstance(candidates, Iterable) and not isinstance(candidates, (str, bytes)), "candidates",
         f"must be a list of form configs or a function of (name, shape), got {shown(candidates)}")
    fixed = list(candidates)
    return lambda name, shape: fixed


def _progress(names: list[str], enabled: bool) -> Iterable[str]:
    if not enabled:
        return names
    from tqdm import tqdm

    return tqdm(names, desc="plan", unit="tensor")


def _hull(options: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (bytes, error^2), by increasing bytes."""
    best: dict[int, Option] = {}
    for o in options:  # per byte count the smallest error
        if o.bytes not in best or o.error < best[o.bytes].error:
            best[o.bytes] = o
    hull: list[Option] = []
    for o in sorted(best.values(), key=lambda o: o.bytes):
        if hull and o.error >= hull[-1].error:
            continue  # more bytes, no better
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-1], o):
            hull.pop()  # hull[-1] lies above the chord: never the best at any trade-off
        hull.append(o)
    return hull


def _slope(a: Option, b: Option) -> float:
    """Squared-error reduction per byte from a to b (negative: error falls)."""
    return (b.error ** 2 - a.error ** 2) / (b.bytes - a.bytes)


def _fill(options: Mapping[str, list[Option]], max_bytes: int) -> dict[str, Option]:
    """Greedy upgrades by steepest error reduction per byte while within ``max_bytes``."""
    level = {n: 0 for n in options}
    total = sum(opts[0].bytes for opts in options.values())
    if total > max_bytes:
        raise KernelpackError(f"max_bytes={max_bytes} is below the smallest plan ({total} bytes)",
                              field="budget")
    while True:
        steps = [(_slope(opts[level[n]], opts[level[n] + 1]), n) for n, opts in options.items()
                 if level[n] + 1 < len(opts)]
        steps = [(s, n) for s, n in steps
                 if total + options[n][level[n] + 1].bytes - options[n][level[n]].bytes <= max_bytes]
        if not steps:
            return {n: opts[level[n]] for n, opts in options.items()}
        _, name = min(steps)
        total += options[name][level[name] + 1].bytes - options[name][level[name]].bytes
        level[name] += 1
