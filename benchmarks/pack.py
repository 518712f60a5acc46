"""Write speed: ``kernelpack.save`` of a ResNet-50-shaped state dict in every single form,
against ``safetensors.numpy.save_file`` of the same state dict as float32 (issue 15, "Writing").

The state dict has every tensor of torchvision's ``resnet50()`` but ``num_batches_tracked``
(267 tensors, 25.6M parameters), built by hand (no torchvision needed), initialised as
benchmarks/decode.py's whole-model rows are (He-initialised convolutions and fc, norm
parameters near their usual values). Each form goes on the weights it suits, as there
(``decode.MODEL_FORMS``), float16 on the rest; and int8 codes (dense, ``rel_step=0.05``) on
the weights of rank >= 2, for the level's effect on quantised numbers. A save is timed whole: encode (fits) and
write (codec choice, compression, digests, fsync) of a file in a temporary folder.

The contenders run interleaved, one round after another (safetensors, then every form at
the default level, then at ``--compare-level``), so that a change of the shared machine's
load hits all of them; each time is the median over ``--repeats`` rounds. Printed per row:
seconds, seconds / safetensors' seconds, file bytes, bytes / the default level's bytes, and
``other load`` (cores other processes kept busy meanwhile, decode.OtherLoad).

    python benchmarks/pack.py                   # 3 rounds (minutes on 2 cores)
    python benchmarks/pack.py --repeats 1       # one round
    python benchmarks/pack.py --quick           # width-16 ResNet-50, one round (seconds)
    python benchmarks/pack.py --forms dense,linear --profile   # some forms, plus a cProfile of each save
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import kernelpack
from kernelpack.forms import Config, Dense

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import MODEL_FORMS, OtherLoad, environment, model_weights, profile  # noqa: E402

NORM = ("weight", "bias", "running_mean", "running_var")
#: decode.py's whole-model forms, and int8 codes (the numbers the planner and NNCodec-like
#: settings store), whose compression is zstd's entropy coding rather than matches.
FORMS = MODEL_FORMS + (("quant dense rel_step 0.05", Dense(rel_step=0.05), lambda shape: len(shape) > 1),)


def resnet50(width: int = 64) -> dict[str, tuple[int, ...]]:
    """Shapes of torchvision's ResNet-50 state dict (``num_batches_tracked`` left out):
    bottleneck blocks [3, 4, 6, 3], expansion 4; ``width`` 64 is the real model."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (width, 3, 7, 7)}
    shapes.update({f"bn1.{k}": (width,) for k in NORM})
    c_in = width
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        mid = width << (stage - 1)
        out = 4 * mid
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            for conv, shape in (("1", (mid, c_in, 1, 1)), ("2", (mid, mid, 3, 3)), ("3", (out, mid, 1, 1))):
                shapes[f"{prefix}.conv{conv}.weight"] = shape
                shapes.update({f"{prefix}.bn{conv}.{k}": (shape[0],) for k in NORM})
            if block == 0:
                shapes[f"{prefix}.downsample.0.weight"] = (out, c_in, 1, 1)
                shapes.update({f"{prefix}.downsample.1.{k}": (out,) for k in NORM})
            c_in = out
    shapes.update({"fc.weight": (1000, c_in), "fc.bias": (1000,)})
    return shapes


@dataclass(frozen=True)
class Contender:
    """One timed save: a label, its ``forms`` plan for kernelpack.save (None: safetensors'
    save_file instead) and its zstd level (None: save's default)."""

    label: str
    plan: Callable[[str, np.ndarray], Config] | None
    level: int | None


def contenders(forms: list[str], compare_level: int | None) -> list[Contender]:
    """safetensors, then each chosen form of FORMS at the default level and (if asked) at
    ``compare_level``."""
    fallback = Dense("float16")
    chosen = [(label, config, takes) for label, config, takes in FORMS if label.split()[0] in forms]
    levels = [None] + ([compare_level] if compare_level is not None else [])
    out = [Contender("safetensors float32", None, None)]
    for level in levels:
        for label, config, takes in chosen:
            plan = (lambda name, w, c=config, t=takes: c if t(w.shape) else fallback)
            out.append(Contender(f"{label}, level {level or 'default'}", plan, level))
    return out


def save(contender: Contender, state: dict[str, np.ndarray], path: str) -> None:
    """One save of ``state`` to ``path`` by ``contender``."""
    if contender.plan is None:
        from safetensors.numpy import save_file

        save_file(state, path)
    else:
        level = {} if contender.level is None else {"level": contender.level}
        kernelpack.save(state, path, forms=contender.plan, **level)


def rounds(runs: list[Contender], state: dict[str, np.ndarray], folder: str,
           repeats: int) -> dict[str, tuple[float, int, float]]:
    """Median seconds, file bytes and mean other load per contender, over ``repeats``
    interleaved rounds (no warm-up round: a save of ResNet-50 is seconds, not microseconds)."""
    times: dict[str, list[float]] = {c.label: [] for c in runs}
    loads: dict[str, list[float]] = {c.label: [] for c in runs}
    sizes: dict[str, int] = {}
    for r in range(repeats):
        for c in runs:
            path = os.path.join(folder, f"{len(sizes)}.out")
            with OtherLoad() as other:
                start = time.perf_counter()
                save(c, state, path)
                times[c.label].append(time.perf_counter() - start)
            loads[c.label].append(other.cores)
            sizes[c.label] = os.path.getsize(path)
            os.unlink(path)
            print(f"  round {r + 1}: {c.label}: {times[c.label][-1]:.2f} s", file=sys.stderr, flush=True)
    return {c.label: (statistics.median(times[c.label]), sizes[c.label], float(np.mean(loads[c.label])))
            for c in runs}


def table(results: dict[str, tuple[float, int, float]]) -> str:
    """The markdown table: seconds, ratio to safetensors, bytes, bytes against the same form
    at the default level."""
    base = results["safetensors float32"][0]
    lines = ["| save | seconds | / safetensors | file bytes | bytes / default level | other load |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, (seconds, size, load) in results.items():
        form, _, level = label.rpartition(", level ")
        default = results.get(f"{form}, level default")
        ratio = f"{size / default[1]:.4f}" if default is not None else ""
        lines.append(f"| {label} | {seconds:.2f} | {seconds / base:.2f} | {size:,} | {ratio} | {load:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="width-16 ResNet-50, one round: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--forms", default="dense,dct,series,basis,linear,quant",
                        help="comma-separated first words of FORMS' labels (default: all six)")
    parser.add_argument("--compare-level", type=int, default=19,
                        help="also save every form at this zstd level (0: not; default 19)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of each kernelpack save")
    parser.add_argument("--top", type=int, default=12, help="functions per profile (default 12)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    width = 16 if args.quick else 64
    state = model_weights(resnet50(width))
    runs = contenders(args.forms.split(","), args.compare_level or None)
    print(f"# kernelpack write benchmark (ResNet-50 shapes{'' if width == 64 else f', width {width}'}: "
          f"{len(state)} tensors, {sum(w.nbytes for w in state.values()) / 1e6:.1f} MB of float32; "
          f"median of {repeats} interleaved rounds)\n\n{environment()}\n")
    with tempfile.TemporaryDirectory() as folder:
        print(table(rounds(runs, state, folder, repeats)), flush=True)
        if args.profile:
            for c in runs[1:]:
                path = os.path.join(folder, "profiled.kpk")
                print(f"\n{c.label}:\n```\n{profile(lambda: save(c, state, path), args.top)}\n```", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
