"""Codec ``rans`` (format 1.3) on the suite's real models at NNCodec's steps: bits per code
against the order-0 entropy of the codes, against zstd / zstd-shuffle, and decode speed.

For each real model (benchmarks/models.py) and each NNCodec qp (-38, -32, -26), every weight
of rank >= 2 is quantised as ``Dense(step=nncodec_step(qp))`` stores it (absolute step,
round to nearest: int8 or int16 codes); 1-D tensors are left out (NNCodec keeps them nearly
exact). On every code array of more than 4 KB:

* ``H``: the order-0 entropy of the codes (bits per code, no table cost);
* ``rans``: the payload of ``kernelpack.entropy.encode`` in bits per code (table, lane states
  and escapes included), and its ratio to ``H``;
* ``zstd*``: the smaller of ``zstd`` and ``zstd-shuffle`` at level 19 (what a 1.2 writer keeps);
* decode MB/s of codes (bytes of the int8/int16 arrays) on one thread, rans against the zstd
  codec, each decoded 3 times, best time.

With ``--nncodec`` also the whole model's kernelpack bytes (every weight of rank >= 2 at the
step, 1-D tensors float32, the writer's choice per array) against NNCodec's at the same qp.

    python benchmarks/entropy.py [--nncodec]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernelpack import entropy  # noqa: E402
from kernelpack.container import _compress, _unshuffle  # noqa: E402
from kernelpack.errors import KernelpackError  # noqa: E402
from kernelpack.forms import Dense  # noqa: E402

LEVEL = 19
QPS = (-38, -32, -26)
MIN_BYTES = 4096


def entropy_bits(codes: np.ndarray) -> float:
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def best_time(run: Callable[[], Any], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def zstd_decoder(codec: str, body: bytes, dtype: np.dtype, size: int) -> Callable[[], Any]:
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    if codec == "zstd-shuffle":
        return lambda: _unshuffle(decompressor.decompress(body, max_output_size=size), dtype)
    return lambda: np.frombuffer(decompressor.decompress(body, max_output_size=size), dtype)


def codes_of(weights: dict[str, np.ndarray], step: float) -> dict[str, np.ndarray]:
    """int8/int16 codes of every weight of rank >= 2 at ``step``; weights whose codes overflow
    int16 are left out (NNCodec would raise its qp there)."""
    out = {}
    for name, w in weights.items():
        if np.ndim(w) < 2:
            continue
        try:
            out[name] = Dense(step=step).encode(np.asarray(w, np.float32), "float32").arrays()["data"].data
        except KernelpackError:
            print(f"  {name}: codes beyond int16 at step {step:.3g}, left out")
    return out


def measure(model: str, qp: int, codes: dict[str, np.ndarray]) -> dict[str, float]:
    """One row per array over MIN_BYTES, and the totals of the model at this qp."""
    total = dict.fromkeys(["codes", "bytes", "H", "rans", "zstd", "rans_s", "zstd_s"], 0.0)
    worst = 0.0
    for name, c in codes.items():
        if c.nbytes <= MIN_BYTES:
            continue
        raw = c.tobytes()
        body = entropy.encode(c)
        zcodec, zbody = min((_compress(raw, c.dtype, LEVEL, (k,)) for k in ("zstd", "zstd-shuffle")),
                            key=lambda r: len(r[1]))
        h = entropy_bits(c)
        ratio = 8 * len(body) / c.size / max(h, 1e-9)
        worst = max(worst, ratio if h > 0.05 else 0.0)
        total["codes"] += c.size
        total["bytes"] += c.nbytes
        total["H"] += h * c.size
        total["rans"] += 8 * len(body)
        total["zstd"] += 8 * len(zbody)
        total["rans_s"] += best_time(lambda: entropy.decode(body, c.dtype, c.size))
        total["zstd_s"] += best_time(zstd_decoder(zcodec, zbody, c.dtype, c.nbytes)) if zcodec != "none" else 0
    n = total["codes"]
    print(f"| {model} | {qp} | {int(n)} | {total['H'] / n:.3f} | {total['rans'] / n:.3f} | "
          f"{total['rans'] / total['H']:.3f} | {worst:.3f} | {total['zstd'] / n:.3f} | "
          f"{total['rans'] / total['zstd']:.3f} | {total['bytes'] / total['rans_s'] / 1e6:.0f} | "
          f"{total['bytes'] / total['zstd_s'] / 1e6:.0f} |")
    return total


def nncodec_bytes(weights: dict[str, np.ndarray], qp: int) -> tuple[int, int]:
    """(kernelpack file bytes, NNCodec artifact bytes) at the same step."""
    import kernelpack
    import peers

    step = peers.nncodec_step(qp)
    forms = {n: Dense(step=step) for n, w in weights.items() if np.ndim(w) >= 2}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.kpk")
        kernelpack.save({n: np.asarray(w, np.float32) for n, w in weights.items()}, path, forms=forms)
        ours = os.path.getsize(path)
    return ours, len(peers.nncodec_peer(qp).encode(weights))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nncodec", action="store_true", help="also whole-model bytes against NNCodec")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import models
    import peers

    print("| model | qp | codes (arrays > 4 KB) | H bits/code | rans bits/code | rans / H | worst array rans / H "
          "| zstd* bits/code | rans / zstd* | rans decode MB/s | zstd* decode MB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in models.real_models(quick=True):
        weights = {n: np.asarray(w) for n, w in model.weights.items()}
        for qp in QPS:
            measure(model.name, qp, codes_of(weights, peers.nncodec_step(qp)))
            if args.nncodec:
                ours, theirs = nncodec_bytes(weights, qp)
                print(f"  {model.name} qp {qp}: kernelpack {ours} bytes, NNCodec {theirs} bytes, "
                      f"ratio {ours / theirs:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
