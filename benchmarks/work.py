"""What a unit of ``Cost.work`` costs in time, and how much of the default work bound real models use.

Two tables, one run:

* **time per unit**: for model-sized tensors of every form and for the small hostile files of
  issue 11 (built by tests/hostile.py), the decode time of one tensor (``get_numpy``, payloads
  cached by a first decode, BLAS on one thread) divided by its declared work. Every case is
  timed ``--repeats`` times, the cases interleaved round-robin so that a change in the
  machine's load hits all of them, and the median taken. The default work bound,
  ``2**32 + 2**17`` per file byte, is only meaningful if this stays below about 1 ns.
* **models**: whole state dicts (ResNet-18/50 and VGG-16 shapes) packed with every weight of
  rank >= 2 in one form; their total declared work against the default bound of their own
  file (packed for real, so the file size is real).

    python benchmarks/work.py            # about a minute on 2 cores
    python benchmarks/work.py --quick    # smaller shapes, one model
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import threadpoolctl

import kernelpack
from kernelpack.forms import DCT, Basis, Dense, Linear, Series
from kernelpack.reader import Container

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hostile import dct, series, write_hostile  # noqa: E402

UNLIMITED = kernelpack.Limits(max_work=1 << 60, max_total_bytes=1 << 40)
TENSORS = [
    ("dense float16", Dense(dtype="float16"), (512, 512, 3, 3)),
    ("dense int8 codes", Dense(step=0.01), (512, 512, 3, 3)),
    ("dct 25%", DCT(keep=0.25), (256, 256, 3, 3)), ("dct 10% fc", DCT(keep=0.1), (1000, 2048)),
    ("dct 100% fc", DCT(keep=1.0), (1000, 512)), ("dct 50% 1-D", DCT(keep=0.5), (8000,)),
    ("dct axis 0", DCT(keep=0.5, axes=(0,)), (512, 256, 3, 3)), ("series N=3", Series(harmonics=3), (512, 512, 3, 3)),
    ("series N=6 7x7", Series(harmonics=6), (256, 128, 7, 7)), ("basis 16", Basis(bank=16), (512, 512, 3, 3)),
    ("linear a=0.5", Linear(alpha=0.5), (512, 512, 3, 3)), ("linear a=0.25 fc", Linear(alpha=0.25), (2048, 1000)),
]
HOSTILE = {"hostile dct 4096x32 full": dct([4096, 32], 4096 * 32),
           "hostile dct 65536x32 b=1000": dct([65536, 32], 1000), "hostile series N=4096": series([1], 3, 4096)}


def resnet(blocks: list[int], bottleneck: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"conv1": (64, 3, 7, 7)}
    cin = 64
    for stage, n in enumerate(blocks):
        width = 64 << stage
        out = 4 * width if bottleneck else width
        for b in range(n):
            if bottleneck:
                shapes.update({f"l{stage}.{b}.c1": (width, cin, 1, 1), f"l{stage}.{b}.c2": (width, width, 3, 3),
                               f"l{stage}.{b}.c3": (out, width, 1, 1)})
            else:
                shapes.update({f"l{stage}.{b}.c1": (width, cin, 3, 3), f"l{stage}.{b}.c2": (width, width, 3, 3)})
            if b == 0 and cin != out:
                shapes[f"l{stage}.{b}.ds"] = (out, cin, 1, 1)
            cin = out
    shapes["fc"] = (1000, cin)
    return shapes


def vgg16() -> dict[str, tuple[int, ...]]:
    shapes, cin = {}, 3
    for i, c in enumerate([64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]):
        shapes[f"c{i}"], cin = (c, cin, 3, 3), c
    return {**shapes, "fc6": (4096, 25088), "fc7": (4096, 4096), "fc8": (1000, 4096)}


def unit_times(folder: str, repeats: int, quick: bool) -> list[str]:
    rng = np.random.default_rng(0)
    cases: dict[str, Path] = {}
    for label, config, shape in TENSORS:
        shape = tuple(max(1, d // 2) if quick and i < 2 else d for i, d in enumerate(shape))
        path = Path(folder, f"{len(cases)}.kpk")
        kernelpack.save({"t": rng.standard_normal(shape).astype(np.float32) * 0.05}, path, forms={"t": config}, level=3)
        cases[label] = path
    for label, tensor in HOSTILE.items():
        cases[label] = Path(folder, f"{len(cases)}.kpk")
        write_hostile(cases[label], {"t": tensor})
    opened = {label: Container(path, UNLIMITED) for label, path in cases.items()}
    for c in opened.values():
        c.get_numpy("t")  # payload reads, tables and lazy imports out of the timing
    times: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(repeats):  # interleaved: a change in load hits every case
        for label, c in opened.items():
            start = time.perf_counter()
            c.get_numpy("t")
            times[label].append(time.perf_counter() - start)
    rows = ["| tensor | work (units) | median decode | ns per unit |", "|---|---|---|---|"]
    for label, c in opened.items():
        work, seconds = c.cost("t").work, statistics.median(times[label])
        rows.append(f"| {label} | 2^{math.log2(work):.1f} | {seconds * 1e3:.1f} ms | {seconds * 1e9 / work:.2f} |")
        c.close()
    return rows


def model_work(folder: str, quick: bool) -> list[str]:
    models = {"ResNet-18": resnet([2, 2, 2, 2], False)} if quick else {
        "ResNet-18": resnet([2, 2, 2, 2], False), "ResNet-50": resnet([3, 4, 6, 3], True), "VGG-16": vgg16()}
    forms = {"dct 5%": DCT(keep=0.05), "dct 25%": DCT(keep=0.25), "series N=3 (3x3+ convs)": Series(harmonics=3),
             "dense float16": Dense(dtype="float16")}
    rows = ["| model | form | file | declared work | default bound | used |", "|---|---|---|---|---|---|"]
    rng = np.random.default_rng(1)
    for model, shapes in models.items():
        state = {name: rng.standard_normal(shape).astype(np.float32) * 0.05 for name, shape in shapes.items()}
        for label, config in forms.items():
            chosen = {n: config for n, s in shapes.items() if not isinstance(config, Series) or s[-1] >= 3}
            path = Path(folder, "model.kpk")
            kernelpack.save(state, path, forms={**chosen, "*": Dense(dtype="float16")}, level=3)
            with Container(path) as c:
                work = sum(c.cost(name).work for name in c.keys())
                bound = c.budget.max_work
            size = os.path.getsize(path)
            rows.append(f"| {model} | {label} | {size / 2**20:.1f} MiB | 2^{math.log2(work):.1f} | "
                        f"2^{math.log2(bound):.1f} | {work / bound:.1%} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    with threadpoolctl.threadpool_limits(1), tempfile.TemporaryDirectory() as folder:
        print("\n".join(unit_times(folder, 3 if args.quick else args.repeats, args.quick)))
        print()
        print("\n".join(model_work(folder, args.quick)))
    print(f"\nload average {os.getloadavg()[0]:.1f}; python benchmarks/work.py{' --quick' if args.quick else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
