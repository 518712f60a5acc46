"""Convolutional Similarity (eq. 10, all pairs): forward + backward time of each form.

For each Conv2d weight shape this measures, in one run, the median wall time of
``convsim_loss(w, method=...)`` followed by ``.backward()`` (float32, the training dtype):

* ``naive``: the pairwise reference, quadratic in the filter count; measured only on the
  shapes where it takes at most a few seconds (the baseline);
* ``autocorr`` and ``fft``: the linear forms. ``vs naive`` is naive's time divided by
  the form's, both from this run; ``x prev`` is the form's time divided by its time on
  the previous row's shape (from 256x256 to 512x512 the weight grows 4x: a linear form
  should take about 4x, a pairwise one 16x);
* ``rel. diff``: |value - naive| / naive with naive evaluated in float64 on the same
  float32 weights (for shapes without naive: against ``autocorr`` in float64);
* ``other load``: cores that other processes kept busy meanwhile (see decode.py).

    python benchmarks/convsim.py            # the table in benchmarks/README.md
    python benchmarks/convsim.py --quick    # smoke run: small shapes, 2 repeats
    python benchmarks/convsim.py --device cuda
    python benchmarks/convsim.py --threads 1   # steadier on a busy machine
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from decode import OtherLoad, environment, median_seconds
from kernelpack.converters.convsim import convsim_loss

# (shape, measure naive too)
SHAPES = [((16, 16, 3, 3), True), ((64, 64, 3, 3), True), ((256, 256, 3, 3), False),
          ((512, 512, 3, 3), False), ((32, 32, 7, 7), True), ((384, 1, 7, 7), True)]
QUICK = [((16, 16, 3, 3), True), ((64, 16, 3, 3), True), ((64, 64, 7, 7), False)]
HEADER = ("| weight | form | ms fwd+bwd | vs naive | x prev | rel. diff | other load |\n"
          "|---|---|---:|---:|---:|---:|---:|")


def step(w: torch.Tensor, method: str) -> Callable[[], None]:
    """One forward + backward, synchronised so that a CUDA time is the work's time."""
    def run() -> None:
        w.grad = None
        convsim_loss(w, method=method).backward()
        if w.is_cuda:
            torch.cuda.synchronize()
    return run


def rows(shape: tuple[int, ...], with_naive: bool, device: str, repeats: int,
         previous: dict[str, float]) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    w32 = torch.randn(shape, generator=generator).to(device).requires_grad_()
    reference_method = "naive" if with_naive else "autocorr"
    reference = convsim_loss(w32.detach().double(), method=reference_method).item()
    times = {}
    lines = []
    for method in (("naive",) if with_naive else ()) + ("autocorr", "fft"):
        with OtherLoad() as load:
            times[method] = median_seconds(step(w32, method), 3 if method == "naive" else repeats)
        value = convsim_loss(w32.detach(), method=method).item()
        speedup = f"{times['naive'] / times[method]:.0f}" if with_naive else "n/a"
        growth = f"{times[method] / previous[method]:.1f}" if method in previous else ""
        name = "x".join(map(str, shape))
        lines.append(f"| {name} | {method} | {times[method] * 1e3:.2f} | {speedup} | {growth} | "
                     f"{abs(value - reference) / reference:.1e} | {load.cores:.2f} |")
    previous.clear()
    previous.update(times)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 repeats: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per fast form (default 10)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 10)
    print(f"# Convolutional Similarity benchmark ({'quick' if args.quick else 'full'}, "
          f"{args.device}, float32, median of {repeats}; naive: median of 3)\n")
    print(environment() + "\n")
    print(HEADER)
    previous: dict[str, float] = {}
    for shape, with_naive in QUICK if args.quick else SHAPES:
        if shape[2:] != (3, 3):
            previous.clear()  # x prev compares 3x3 layers only
        print("\n".join(rows(shape, with_naive, args.device, repeats, previous)), flush=True)
    print("\nvs naive: naive time / form time, same run (n/a: naive not run, minutes or more). "
          "x prev: time / the same form's time on the previous 3x3 row. rel. diff: against naive "
          "(or autocorr where naive is n/a) in float64.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
