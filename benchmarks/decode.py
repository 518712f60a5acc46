"""CPU decode throughput and arithmetic error of every stored form, against a dense baseline.

For each layer shape and form this measures, in one run:

* load throughput in MB/s of dense float32 produced: ``kernelpack.load_numpy`` (numpy
  backend) and ``kernelpack.load(device="cpu")`` (torch backend) of a one-tensor
  container -- header checks, payload SHA-256, zstd and decode included -- against
  ``safetensors.numpy.load_file`` of the same tensor stored as dense float32. Every
  time is the median of ``--repeats`` runs (time.perf_counter) after one warm-up;
  files are in the page cache, so this is decode cost, not disk speed. The same for
  ``decode-only``: the form's decode of payloads already in memory, without the file;
* the canonical decode's error against the exact transform, evaluated independently
  in float64 (scipy's inverse DCT, numpy's Chebyshev Vandermonde matrix, plain BLAS
  products), with the numbers stored as float32 so that the error is the arithmetic
  alone (fixed-point grids and the final float32 rounding): max|decode - ref| / max|ref|,
  next to the float16 rounding unit 2^-11 that default (float16) storage adds anyway;
* whether numpy and torch decode to the same bits;
* ``other load``: cores other processes kept busy while the row was measured, since a
  shared machine skews timings (0 on an idle machine);
* whole model: a ResNet-18-shaped state dict (every tensor of torchvision's ``resnet18()``
  but ``num_batches_tracked``, He-initialised) in dense float16 and with each form on the
  weights it suits, loaded with ``threads=1`` and with the default threads (one per core),
  against ``safetensors.numpy.load_file`` of the same state dict as dense float32; the same
  for a MobileNet-shaped state dict of many small tensors (``mobile_small``, like PP-OCR's
  text-direction classifier: 177 tensors, most of them batch-norm vectors), where a load
  costs per tensor (header checks, reads, zstd frames), not per byte.

    python benchmarks/decode.py            # full run (minutes on 2 cores)
    python benchmarks/decode.py --quick    # smoke run on small shapes (seconds)
    python benchmarks/decode.py --profile  # also: where each load spends its time (cProfile)
    python benchmarks/decode.py --model    # only the whole-model rows
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import kernelpack
from kernelpack._backend import NumpyOps, TorchOps
from kernelpack._exact import zigzag_positions
from kernelpack.forms import (DCT, Basis, BasisTensor, Config, DCTTensor, Dense, DenseTensor, Encoded,
                              Linear, LinearTensor, Series, SeriesTensor)
from kernelpack.forms.series import Points
from kernelpack.layout import digest
from kernelpack.writer import write

FP16_UNIT = 2.0 ** -11  # float16 rounding: half an ulp of 1.0


@dataclass(frozen=True)
class Layer:
    """A realistic weight shape and the forms worth trying on it."""

    name: str
    shape: tuple[int, ...]
    forms: tuple[tuple[str, Config], ...]


def layers(quick: bool) -> list[Layer]:
    """ResNet-18-like 3x3 convolutions, a ConvNeXt-like 7x7 depthwise, a transformer-like linear."""
    conv = (("dense fp16", Dense("float16")), ("dct 10%", DCT(keep=0.1)),
            ("series 2x2", Series("cosine", 2)), ("basis 16", Basis(16)), ("linear a=0.5", Linear(0.5)))
    depthwise = (("dense fp16", Dense("float16")), ("series 4x4", Series("cosine", 4)),
                 ("basis 16", Basis(16)))
    fc = (("dense fp16", Dense("float16")), ("dct 10%", DCT(keep=0.1)),
          ("linear a=0.25 r=128", Linear(0.25, rank=128)))
    if quick:
        return [Layer("conv3x3 64->64", (64, 64, 3, 3), conv),
                Layer("dw7x7 96", (96, 1, 7, 7), depthwise),
                Layer("linear 512x256", (512, 256), fc)]
    return [Layer("conv3x3 256->256", (256, 256, 3, 3), conv),
            Layer("conv3x3 512->512", (512, 512, 3, 3), conv),
            Layer("dw7x7 384", (384, 1, 7, 7), depthwise),
            Layer("linear 4096x1024", (4096, 1024), fc)]


def weights(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """He-initialised float32 weights (deterministic)."""
    fan_in = int(np.prod(shape[1:]))
    return (np.random.default_rng(seed).standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


class OtherLoad:
    """CPU used by other processes during a span (Linux): busy time in /proc/stat minus our own.

    The machine is shared; a row measured while others ran is skewed, and this says by how
    much (cores busy on average; 0 on an idle machine). /proc/stat counts 10 ms ticks, so a
    span shorter than MIN_SPAN gives NaN rather than a number dominated by rounding.
    """

    MIN_SPAN = 0.25

    def __enter__(self) -> "OtherLoad":
        self.start = (time.perf_counter(), self.busy(), self.own())
        self.cores = float("nan")
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, own = (time.perf_counter(), self.busy(), self.own())
        span = wall - self.start[0]
        if span >= self.MIN_SPAN:
            others = (busy - self.start[1]) - (own - self.start[2])
            self.cores = min(float(os.cpu_count() or 1), max(0.0, others / span))

    @staticmethod
    def busy() -> float:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        except (OSError, ValueError):
            return float("nan")
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def own() -> float:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- independent float64 references -------------------------------------------------------
def f64(stored: Any) -> np.ndarray:
    return stored.values().astype(np.float64)


def series_points(points: Points, k: int) -> np.ndarray:
    """Sample points computed with libm cos (not kernelpack's reproducible cospi)."""
    if not isinstance(points, str):
        return np.array(points, dtype=np.float64)
    if k == 1:
        return np.array([1.0 if points == "cgl" else 0.0])
    return np.cos(np.pi * np.arange(k) / (k - 1)) if points == "cgl" else np.linspace(-1.0, 1.0, k)


def reference(tensor: Encoded) -> np.ndarray:
    """The exact transform of the stored numbers, in float64, by code independent of the decoder."""
    from scipy.fft import idctn

    if isinstance(tensor, DenseTensor):
        return f64(tensor.data)
    if isinstance(tensor, DCTTensor):
        full = np.zeros(tensor.shape)
        full[tuple(zigzag_positions(tensor.shape, tensor.axes, tensor.boundary).T)] = f64(tensor.coefficients)
        return idctn(full, type=2, norm="ortho", axes=tensor.axes)
    if isinstance(tensor, SeriesTensor):
        (nx, ny), (kh, kw) = tensor.harmonics, tensor.shape[-2:]
        tx = np.polynomial.chebyshev.chebvander(series_points(tensor.points[0], kh), nx - 1)  # (kh, nx)
        ty = np.polynomial.chebyshev.chebvander(series_points(tensor.points[1], kw), ny - 1)
        return np.einsum("...pq,ip,jq->...ij", f64(tensor.coefficients), tx, ty)
    if isinstance(tensor, BasisTensor):
        n = tensor.index.data.size
        g = f64(tensor.bank).reshape(len(tensor.bank.data), -1)[tensor.index.data.astype(np.int64)]
        return (g * f64(tensor.a).reshape(n, 1) + f64(tensor.b).reshape(n, 1)).reshape(tensor.shape)
    if isinstance(tensor, LinearTensor):
        p = tensor.primaries.data.shape[0]
        wp = f64(tensor.primaries).reshape(p, -1)
        a = [f64(c) for c in tensor.coefficients]
        coeff = a[0] @ a[1] if len(a) == 2 else a[0]
        rows = np.concatenate([wp, coeff.T @ wp])
        if tensor.order is not None:
            rows = rows[np.argsort(tensor.order.data)]
        return rows.reshape(tensor.shape)
    raise TypeError(f"no reference for form {tensor.form!r}")


# --- measurements ----------------------------------------------------------------------------
@dataclass
class Result:
    """One row of the table: MB/s are of dense float32 produced."""

    layer: str
    form: str
    stored_kb: float
    load_numpy: float
    load_torch: float
    decode_numpy: float
    decode_torch: float
    dense: float
    error: float
    same_bits: bool
    other_load: float

    HEADER = ("| layer | form | stored KB | load numpy MB/s | load torch MB/s | decode-only numpy MB/s "
              "| decode-only torch MB/s | safetensors MB/s | numpy / dense | torch / dense "
              "| rel. error (fp32 storage) | error / 2^-11 | numpy == torch bits | other load |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")

    def row(self) -> str:
        return (f"| {self.layer} | {self.form} | {self.stored_kb:.0f} | {self.load_numpy:.0f} "
                f"| {self.load_torch:.0f} | {self.decode_numpy:.0f} | {self.decode_torch:.0f} "
                f"| {self.dense:.0f} | {self.load_numpy / self.dense:.3f} | {self.load_torch / self.dense:.3f} "
                f"| {self.error:.2e} | {self.error / FP16_UNIT:.1e} | {'yes' if self.same_bits else 'NO'} "
                f"| {self.other_load:.2f} |")


def measure(layer: Layer, label: str, config: Config, w: np.ndarray, path: str, repeats: int,
            dense_mbs: float) -> Result:
    """Throughput (default storage, written to ``path``) and arithmetic error (float32 storage).

    ``load`` includes opening, header and payload checks and zstd; ``decode-only`` is the
    form's decode of payloads already in memory.
    """
    mb = w.nbytes / 1e6
    numpy_ops, torch_ops = NumpyOps(), TorchOps("cpu")
    with OtherLoad() as other:
        tensor = config.encode(w, "float32")
        write(path, {"w": tensor})
        speeds = [mb / median_seconds(fn, repeats) for fn in (
            lambda: kernelpack.load_numpy(path), lambda: kernelpack.load(path, "cpu"),
            lambda: tensor.decode(numpy_ops), lambda: tensor.decode(torch_ops))]
        same_bits = digest(tensor.decode(numpy_ops), "float32") == \
            digest(torch_ops.to_numpy(tensor.decode(torch_ops)), "float32")
        exact = dataclasses.replace(config, dtype="float32").encode(w, "float32")  # type: ignore[type-var]
        ref = reference(exact)
        error = float(np.max(np.abs(exact.decode(numpy_ops) - ref)) / np.max(np.abs(ref)))
    return Result(layer.name, label, os.path.getsize(path) / 1024, *speeds, dense_mbs, error, same_bits,
                  other.cores)


def baseline(w: np.ndarray, folder: str, repeats: int) -> float:
    """MB/s of safetensors.numpy.load_file reading the tensor as dense float32."""
    return baseline_state({"w": w}, folder, repeats)


def baseline_state(state: dict[str, np.ndarray], folder: str, repeats: int) -> float:
    """MB/s of safetensors.numpy.load_file reading the tensors as dense float32."""
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "w.safetensors")
    save_file(state, path)
    return sum(w.nbytes for w in state.values()) / 1e6 / median_seconds(lambda: load_file(path), repeats)


# --- whole model ------------------------------------------------------------------------------
def resnet18(width: int = 64) -> dict[str, tuple[int, ...]]:
    """Shapes of torchvision's ResNet-18 state dict (``num_batches_tracked`` left out);
    ``width`` 64 is the real model, smaller widths scale every layer for a quick run."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (width, 3, 7, 7)}
    norm = ("weight", "bias", "running_mean", "running_var")
    shapes.update({f"bn1.{k}": (width,) for k in norm})
    c_in = width
    for stage, c in enumerate((width, 2 * width, 4 * width, 8 * width), start=1):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            for conv, fan_in in (("1", c_in if block == 0 else c), ("2", c)):
                shapes[f"{prefix}.conv{conv}.weight"] = (c, fan_in, 3, 3)
                shapes.update({f"{prefix}.bn{conv}.{k}": (c,) for k in norm})
            if block == 0 and c_in != c:
                shapes[f"{prefix}.downsample.0.weight"] = (c, c_in, 1, 1)
                shapes.update({f"{prefix}.downsample.1.{k}": (c,) for k in norm})
        c_in = c
    shapes.update({"fc.weight": (1000, c_in), "fc.bias": (1000,)})
    return shapes


def mobile_small() -> dict[str, tuple[int, ...]]:
    """Shapes of a small MobileNet-like classifier, like PP-OCR's text-direction classifier
    (183 tensors, 0.53 MB of float32; no download needed): a 3x3 stem and 17 depthwise-
    separable blocks (3x3 depthwise, 1x1 pointwise), each convolution followed by batch
    norm's four vectors, and a 2-class fc: 177 tensors, 0.35 MB, four fifths of them 1-D."""
    norm = ("weight", "bias", "running_mean", "running_var")
    shapes: dict[str, tuple[int, ...]] = {"stem.conv.weight": (8, 3, 3, 3)}
    shapes.update({f"stem.bn.{k}": (8,) for k in norm})
    c_in = 8
    for block, c in enumerate((8, 16, 16, 24, 24, 24, 40, 40, 40, 48, 48, 96, 96, 96, 96, 96, 200)):
        for conv, shape in (("dw", (c_in, 1, 3, 3)), ("pw", (c, c_in, 1, 1))):
            shapes[f"blocks.{block}.{conv}.weight"] = shape
            shapes.update({f"blocks.{block}.{conv}_bn.{k}": shape[:1] for k in norm})
        c_in = c
    shapes.update({"fc.weight": (2, c_in), "fc.bias": (2,)})
    return shapes


def model_weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """He-initialised weights; norm scales near 1, variances positive, biases and means small."""
    state = {}
    for seed, (name, shape) in enumerate(shapes.items()):
        rng = np.random.default_rng(seed)
        if len(shape) > 1:
            state[name] = weights(shape, seed)
        elif name.endswith(("weight", "running_var")):
            state[name] = (1.0 + 0.1 * np.abs(rng.standard_normal(shape))).astype(np.float32)
        else:
            state[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return state


#: (label, config, which weights get it); every other tensor is stored as dense float16.
MODEL_FORMS: tuple[tuple[str, Config, Callable[[tuple[int, ...]], bool]], ...] = (
    ("dense fp16", Dense("float16"), lambda shape: True),
    ("dct 10%", DCT(keep=0.1), lambda shape: len(shape) > 1),
    ("series 2x2", Series("cosine", 2), lambda shape: len(shape) == 4 and min(shape[-2:]) >= 3),
    ("basis 16", Basis(16), lambda shape: len(shape) == 4 and min(shape[-2:]) >= 3),
    ("linear a=0.5", Linear(0.5), lambda shape: len(shape) > 1),
)


@dataclass
class ModelResult:
    """One whole-model row: MB/s of dense float32 produced by a load of every tensor."""

    form: str
    stored_mb: float
    numpy_1: float
    numpy_auto: float
    numpy_auto_blas1: float
    torch_1: float
    torch_auto: float
    dense: float
    other_load: float

    HEADER = ("| model | form | stored MB | load numpy MB/s, 1 thread | load numpy MB/s, auto "
              "| load numpy MB/s, auto, 1 BLAS thread | load torch MB/s, 1 thread | load torch MB/s, auto "
              "| safetensors MB/s | numpy auto / 1 thread | numpy auto, 1 BLAS / 1 thread "
              "| best numpy / safetensors | other load |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def row(self, model: str) -> str:
        best = max(self.numpy_auto, self.numpy_auto_blas1)
        return (f"| {model} | {self.form} | {self.stored_mb:.1f} | {self.numpy_1:.0f} | {self.numpy_auto:.0f} "
                f"| {self.numpy_auto_blas1:.0f} | {self.torch_1:.0f} | {self.torch_auto:.0f} | {self.dense:.0f} "
                f"| {self.numpy_auto / self.numpy_1:.2f} | {self.numpy_auto_blas1 / self.numpy_1:.2f} "
                f"| {best / self.dense:.3f} | {self.other_load:.2f} |")


def measure_model(state: dict[str, np.ndarray], label: str, config: Config,
                  takes: Callable[[tuple[int, ...]], bool], path: str, repeats: int,
                  dense_mbs: float) -> ModelResult:
    """Load throughput of the whole state dict with one thread and with the default threads."""
    mb = sum(w.nbytes for w in state.values()) / 1e6
    fallback = Dense("float16")
    write(path, {name: (config if takes(w.shape) else fallback).encode(w, "float32")
                 for name, w in state.items()})
    with OtherLoad() as other:
        speeds = [mb / median_seconds(fn, repeats) for fn in (
            lambda: kernelpack.load_numpy(path, threads=1), lambda: kernelpack.load_numpy(path),
            lambda: one_blas_thread(lambda: kernelpack.load_numpy(path)),
            lambda: kernelpack.load(path, "cpu", threads=1), lambda: kernelpack.load(path, "cpu"))]
    return ModelResult(label, os.path.getsize(path) / 1e6, *speeds, dense_mbs, other.cores)


def one_blas_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` with numpy's BLAS on one thread (threadpoolctl; a process-wide setting, so
    kernelpack leaves it to the application): each load thread then has a core to itself."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return fn()


def whole_model(quick: bool, folder: str, repeats: int) -> list[tuple[str, str]]:
    """The whole-model tables (printed as they go), and the paths of their containers' profiles.
    The many-small-tensors model is measured in dense float16 only: its tensors are too small
    for the other forms to matter, and its point is the per-tensor cost."""
    width = 16 if quick else 64
    models = ((f"resnet18{'' if width == 64 else f' (width {width})'}", resnet18(width), MODEL_FORMS),
              ("mobile-small", mobile_small(), MODEL_FORMS[:1]))
    paths = []
    for model, shapes, forms in models:
        state = model_weights(shapes)
        dense_mbs = baseline_state(state, folder, repeats)
        print(f"\n{model}: {len(state)} tensors, {sum(w.nbytes for w in state.values()) / 1e6:.2f} MB "
              f"of float32\n\n{ModelResult.HEADER}")
        for label, config, takes in forms:
            path = os.path.join(folder, f"model-{len(paths)}.kpk")
            print(measure_model(state, label, config, takes, path, repeats, dense_mbs).row(model), flush=True)
            paths.append((f"{model}, {label}", path))
    return paths


def profile(fn: Callable[[], Any], top: int) -> str:
    """The ``top`` functions by own time in one call of ``fn`` (after a warm-up for caches)."""
    fn()
    prof = cProfile.Profile()
    prof.runcall(fn)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return "\n".join(ln.replace(os.path.dirname(np.__path__[0]) + os.sep, "")
                     for ln in lines[start:start + top + 1])


def load_profiles(name: str, path: str, top: int) -> list[str]:
    """cProfiles of a one-thread load of ``path`` by numpy and by torch (threads hide in a profile)."""
    return [f"{name}, {label}:\n```\n{profile(lambda: load(path, threads=1), top)}\n```"
            for label, load in (("load_numpy", kernelpack.load_numpy), ("load cpu", kernelpack.load))]


def revision() -> str:
    """The git commit of the kernelpack being measured, '+' if kernelpack/ has local changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(kernelpack.__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "kernelpack"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return head + ("+" if dirty else "")


def environment() -> str:
    import safetensors
    import torch
    import zstandard

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"kernelpack {kernelpack.__version__} at {revision()}; "
            f"{cpu}; nproc {os.cpu_count()}; torch threads {torch.get_num_threads()}; "
            f"python {platform.python_version()}; numpy {np.__version__}; torch {torch.__version__}; "
            f"safetensors {safetensors.__version__}; zstandard {zstandard.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 repeats: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of each load")
    parser.add_argument("--top", type=int, default=8, help="functions per profile (default 8)")
    parser.add_argument("--model", action="store_true", help="only the whole-model rows")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    print(f"# kernelpack decode benchmark ({'quick' if args.quick else 'full'}, median of {repeats})\n")
    print(environment() + "\n")
    profiles = []
    with tempfile.TemporaryDirectory() as folder:
        if not args.model:
            print(Result.HEADER)
            for seed, layer in enumerate(layers(args.quick)):
                w = weights(layer.shape, seed)
                dense_mbs = baseline(w, folder, repeats)
                for label, config in layer.forms:
                    path = os.path.join(folder, "w.kpk")
                    print(measure(layer, label, config, w, path, repeats, dense_mbs).row(), flush=True)
                    if args.profile:
                        profiles += load_profiles(f"{layer.name}, {label}", path, args.top)
        for name, path in whole_model(args.quick, folder, repeats):
            if args.profile:
                profiles += load_profiles(name, path, args.top)
    print("\nother load: cores kept busy by other processes while the row was measured (0 = idle machine;"
          " nan: too short to tell). auto: one thread per core (kernelpack's default).")
    if profiles:
        print("\n" + "\n\n".join(profiles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
