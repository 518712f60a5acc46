"""Bytes of the payload codecs ``zstd`` and ``zstd-shuffle`` (byte planes, signed integers
zigzag-mapped first; format 1.2).

Each array is compressed on its own at level 19 (``save(level=19)``; the writer's default
is 3), as kernelpack's writer does (one frame per payload), through the writer's own function (``codecs._compress``
offered one codec at a time, and all of them: what a file stores). Inputs:

* int16 codes of a standard Gaussian (2^20 values, seed 0) quantised at ``rel_step`` 0.035
  (codes up to about ±140: int16), as ``Dense(rel_step=0.035)`` stores them;
* the float weights of PP-OCRv4 det (benchmarks/models.py) as float16 and as float32.

    python benchmarks/shuffle_sizes.py
"""

from __future__ import annotations

import os
import sys
from typing import Iterable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernelpack.codecs import CODECS, _compress  # noqa: E402
from kernelpack.forms import Dense  # noqa: E402

LEVEL = 19


def sizes(arrays: Iterable[np.ndarray]) -> dict[str, int]:
    """Total payload bytes per codec (``none`` kept as the fallback, as the writer does) and
    for the writer's choice, the smallest per array."""
    total = dict.fromkeys(["raw", "zstd", "zstd-shuffle", "writer"], 0)
    for a in arrays:
        raw = np.ascontiguousarray(a).tobytes()
        total["raw"] += len(raw)
        for codec in ("zstd", "zstd-shuffle"):
            total[codec] += len(_compress(raw, a.dtype, LEVEL, (codec,))[1])
        total["writer"] += len(_compress(raw, a.dtype, LEVEL, CODECS)[1])
    return total


def entropy_bits(codes: np.ndarray) -> float:
    """Order-0 entropy of the codes, bits per code: the bound a per-code entropy coder meets."""
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def main() -> int:
    gauss = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    codes = Dense(rel_step=0.035).encode(gauss, "float32").arrays()["data"].data
    assert codes.dtype == np.int16
    import models

    det = [m for m in models.real_models() if m.name == "PP-OCRv4 det"][0].weights
    with np.errstate(over="ignore"):  # a few norm statistics exceed float16: they become inf
        half = [np.asarray(w, np.float16) for w in det.values()]
    rows = {"Gaussian int16 codes, rel_step 0.035": [codes],
            "PP-OCRv4 det float16": half,
            "PP-OCRv4 det float32": [np.asarray(w, np.float32) for w in det.values()]}
    print(f"Gaussian codes: {codes.size} codes, |q| <= {int(np.abs(codes).max())}, "
          f"order-0 entropy {entropy_bits(codes):.2f} bits/code; det: {len(det)} tensors, "
          f"{sum(int(np.size(w)) for w in det.values())} numbers, "
          f"{sum(int(np.sum(~np.isfinite(h))) for h in half)} of them beyond float16 (inf)")
    print("| input | raw bytes | zstd | zstd-shuffle | shuffle / zstd | writer (smallest per array) |")
    print("|---|---|---|---|---|---|")
    for name, arrays in rows.items():
        s = sizes(arrays)
        count = sum(a.size for a in arrays)
        per = f" ({8 * s['zstd'] / count:.2f} → {8 * s['zstd-shuffle'] / count:.2f} bits/number)"
        print(f"| {name} | {s['raw']} | {s['zstd']} | {s['zstd-shuffle']} | "
              f"{s['zstd-shuffle'] / s['zstd']:.3f}{per} | {s['writer']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
