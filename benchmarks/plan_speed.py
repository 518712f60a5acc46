"""How long ``kernelpack.plan`` takes on a ResNet-50-sized model and on a 10 MB ONNX model.

    python benchmarks/plan_speed.py                  # all three cases
    python benchmarks/plan_speed.py --case rec       # one: resnet50, resnet50-h or rec

* ``resnet50``: the ResNet-50 shapes of benchmarks/work.py (25.5M parameters), Gaussian
  weights scaled 1/sqrt(fan-in), weight-only, ``max_error=0.05``.
* ``resnet50-h``: the same with a synthetic H per tensor (low rank 64 plus a diagonal, built
  lazily, one at a time, not timed: it stands in for calibration statistics, which have no
  graph to be measured on here), ``max_output_error=0.05`` on the estimate.
* ``rec``: PP-OCRv4 rec (10.9 MB ONNX, rapidocr-onnxruntime's wheel) with the calibration
  inputs of benchmarks/inputs.py, ``max_output_error=0.02`` measured with ONNX Runtime;
  time includes collecting H and the end-to-end evaluations.

Each prints the wall time, the plan's bytes, forms and errors. Targets (issue 12): <= 60 s
for ResNet-50, <= 30 s for the 10 MB ONNX model, on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

import kernelpack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from work import resnet  # noqa: E402


def resnet50_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"{name}.weight": (rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))).astype(np.float32)
            for name, shape in resnet([3, 4, 6, 3], True).items()}


class SyntheticH(Mapping):
    """H = B B^T / m + 0.1 mean-diag I with B (K, 64) Gaussian, per tensor, made on access."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        self.shapes = {n: w.shape for n, w in weights.items()}
        self.seconds = 0.0

    def __getitem__(self, name: str) -> np.ndarray:
        start = time.perf_counter()
        k = math.prod(self.shapes[name][1:])
        b = np.random.default_rng(k).standard_normal((k, 64))
        h = b @ b.T / 64
        h[np.diag_indices(k)] += 0.1
        self.seconds += time.perf_counter() - start
        return h

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def report(label: str, seconds: float, result: Any, extra: str = "") -> None:
    forms = collections.Counter(type(c).__name__.lower() + ("/q" if getattr(c, "quantised", False) else "")
                                for c in result.values())
    dense = sum(o.bytes for o in result.options.values())
    print(f"{label}: {seconds:.1f} s, {len(result)} tensors planned, {dense} bytes, forms {dict(forms)}, "
          f"worst weight error {result.worst_error:.4f}, estimated output error "
          f"{result.estimated:.4f}, measured {result.measured}{extra}", flush=True)


def case_resnet50(with_h: bool) -> None:
    weights = resnet50_weights()
    print(f"ResNet-50 shapes: {sum(w.size for w in weights.values()) / 1e6:.1f}M parameters", flush=True)
    stats = SyntheticH(weights) if with_h else None
    start = time.perf_counter()
    if with_h:
        result = kernelpack.plan(weights, max_output_error=0.05, stats=stats)
    else:
        result = kernelpack.plan(weights, max_error=0.05)
    seconds = time.perf_counter() - start
    if stats is not None:
        seconds -= stats.seconds
    report("resnet50" + ("-h" if with_h else ""), seconds, result,
           f" (synthetic H built in {stats.seconds:.1f} s, not counted)" if stats else "")


def case_rec() -> None:
    import inputs

    path = inputs.ppocr_path("rec")
    sets = inputs.input_sets()["PP-OCRv4 rec"]
    calibration = {"x": sets.calibration}
    print(f"PP-OCRv4 rec: {Path(path).stat().st_size / 1e6:.1f} MB, {len(sets.calibration)} calibration inputs "
          f"{list(sets.calibration.shape[1:])}", flush=True)
    start = time.perf_counter()
    result = kernelpack.plan(path, calibration, max_output_error=0.02)
    report("rec", time.perf_counter() - start, result, f", {result.evaluations} evaluations")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("resnet50", "resnet50-h", "rec"), action="append")
    args = parser.parse_args(argv)
    for case in args.case or ("resnet50", "resnet50-h", "rec"):
        if case == "rec":
            case_rec()
        else:
            case_resnet50(case == "resnet50-h")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
