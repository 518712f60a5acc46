"""What richer probability models could still save on the codes of the real models (issue 14):
adaptive code lengths of the codes under context models that ``rans-ctx`` does not have,
against ``rans-ctx``'s own payload bits.

For each real model (benchmarks/models.py), at NNCodec's step of ``--qp`` (uniform codes at
1.32 x that step, about NNCodec's weight error), every weight array of rank >= 2 over 4 KB
is made ``rans-ctx`` tokens (split 4, msb 2; the raw bits counted as they are) and coded,
in thought, by an adaptive model per context: the Dirichlet (KT-like, alpha 0.3) sequential
code length, which needs no table and includes the cost of learning every context. Side
information a decoder would need (row or column classes, scales) is charged at its bits.
Contexts: none; row classes (as ``rans-ctx``: 4, 8, 16 by mean log-magnitude); row x
input-channel classes; a 2-D scale (row mean x input-channel mean, 16 bins); the previous
token of the row, with 8 row classes. ``--dq``: the dependent-quantised codes at
NNCodec's step (``Dense(dq=True)``) under row classes with and without the grid
(kernelpack/dq.py) as a further context, as empirical conditional entropies.

    python benchmarks/context_gain.py [--qp -32] [--dq]

Measured (2026-12-03, this session's commit; 1 min): see benchmarks/README.md, "entropy.py".
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from scipy.special import gammaln

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernelpack import dq, entropy  # noqa: E402
from kernelpack.forms import Dense  # noqa: E402


def adaptive_bits(context: np.ndarray, token: np.ndarray, alpha: float = 0.3) -> float:
    """Sequential code length (bits) of ``token`` with an adaptive Dirichlet model per context
    (order-independent: the closed form of the product of predictive probabilities)."""
    size = int(token.max()) + 1
    counts = np.bincount(context * size + token, minlength=(int(context.max()) + 1) * size).reshape(-1, size)
    counts = counts[:, counts.sum(axis=0) > 0]
    a = alpha * counts.shape[1]
    nats = (gammaln(counts.sum(axis=1) + a) - gammaln(a)).sum() - (gammaln(counts + alpha) - gammaln(alpha)).sum()
    return float(nats / np.log(2))


def ranked(score: np.ndarray, classes: int) -> np.ndarray:
    return np.argsort(np.argsort(score, kind="stable"), kind="stable") * min(classes, len(score)) // len(score)


def conditional_entropy(context: np.ndarray, symbol: np.ndarray) -> float:
    """Empirical bits of ``symbol`` given ``context`` (no model cost)."""
    _, joint = np.unique(context.astype(np.int64) * (1 << 20) + symbol, return_counts=True)
    _, marginal = np.unique(context, return_counts=True)
    return float(-(joint * np.log2(joint)).sum() + (marginal * np.log2(marginal)).sum())


def uniform_models(codes: np.ndarray) -> dict[str, float]:
    rows = codes.shape[0]
    inputs = codes.shape[1]
    per_kernel = codes.size // (rows * inputs)
    token, raw, _ = entropy.tokens(entropy.to_unsigned(codes.reshape(-1)).astype(np.int64), 4, 2)
    raw_bits = float(raw.sum())
    magnitude = np.abs(codes.reshape(rows, inputs, per_kernel).astype(np.float64))
    row_score = np.log2(1 + magnitude).mean(axis=(1, 2))
    column_score = np.log2(1 + magnitude).mean(axis=(0, 2))
    out = {"rans-ctx": 8.0 * len(entropy.encode_ctx(codes.reshape(-1), rows)),
           "no context": adaptive_bits(np.zeros_like(token), token) + raw_bits}
    for n in (4, 8, 16):
        classes = np.repeat(ranked(row_score, n), codes.size // rows)
        out[f"rows {n}"] = adaptive_bits(classes, token) + raw_bits + rows * np.log2(n)
    rc, cc = ranked(row_score, 4), ranked(column_score, 4)
    grid = np.broadcast_to((rc[:, None] * 4 + cc[None, :])[:, :, None], magnitude.shape).reshape(-1)
    out["rows 4 x inputs 4"] = adaptive_bits(grid, token) + raw_bits + (rows + inputs) * 2
    scale = np.log2(np.outer(magnitude.mean(axis=(1, 2)), magnitude.mean(axis=(0, 2))) + 1e-9)
    bins = np.broadcast_to(ranked(scale.reshape(-1), 16).reshape(rows, inputs)[:, :, None], magnitude.shape)
    out["2-D scale 16"] = adaptive_bits(bins.reshape(-1), token) + raw_bits + (rows + inputs) * 6
    tokens = token.reshape(rows, -1)
    previous = np.concatenate([np.zeros((rows, 1), np.int64), np.minimum(tokens[:, :-1], 3)], axis=1)
    r8 = np.repeat(ranked(row_score, 8), codes.size // rows)
    out["rows 8 x previous token"] = adaptive_bits(r8 * 4 + previous.reshape(-1), token) + raw_bits + rows * 3
    return out


def dq_models(codes: np.ndarray) -> dict[str, float]:
    rows = codes.shape[0]
    u = entropy.to_unsigned(codes.reshape(-1)).astype(np.int64)
    classes = np.repeat(entropy._row_classes(u, rows, min(8, rows)), codes.size // rows)
    grid = dq.grids(codes, rows).reshape(-1).astype(np.int64)
    return {"rans-ctx": 8.0 * len(entropy.encode_ctx(codes.reshape(-1), rows)),
            "H given rows 8": conditional_entropy(classes, u),
            "H given rows 8 x grid": conditional_entropy(classes * 2 + grid, u)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qp", type=int, default=-32)
    parser.add_argument("--dq", action="store_true", help="dependent-quantised codes and the grid context")
    args = parser.parse_args(argv)
    import models
    import peers

    step = peers.nncodec_step(args.qp)
    for model in models.real_models(quick=True):
        total: dict[str, float] = {}
        for w in model.weights.values():
            w = np.asarray(w, np.float32)
            if w.ndim < 2:
                continue
            config = Dense(step=step, dq=True) if args.dq else Dense(step=step * 1.32)
            try:
                codes = config.encode(w, "float32").arrays()["data"].data
            except Exception:  # codes beyond int16: left out, as benchmarks/entropy.py does
                continue
            if codes.nbytes <= 4096:
                continue
            for key, bits in (dq_models(codes) if args.dq else uniform_models(codes)).items():
                total[key] = total.get(key, 0.0) + bits
        base = total["rans-ctx"]
        print(f"{model.name} qp {args.qp}{' dq' if args.dq else ''}: "
              + ", ".join(f"{k} {v / base:.3f}" for k, v in total.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
