"""The demo: a small CNN trained on scikit-learn's 8x8 digits, packed in every form.

For each form it writes a container, checks every digest with both backends
(numpy and torch must give the bits recorded at pack time, or the demo stops),
loads it into a fresh model and reports bytes, ratio to float32, accuracy before
and after, and decode time. The compressed forms are applied post hoc, with no
fine-tuning, so their accuracy loss is what a user of ``kernelpack pack`` on an
already trained model would see.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import nn

import kernelpack
from kernelpack._progress import progress
from kernelpack._table import format_table
from kernelpack.forms import DCT, Basis, Config, Dense, Linear, Series

SEED = 0
N_TRAIN = 1347  # of 1797 digits; the other 450 are the test set
EPOCHS, QUICK_EPOCHS = 30, 3
BATCH = 64

#: Label -> form plan (first matching pattern wins; unmatched tensors are stored dense float32).
#: Post hoc, no fine-tuning: the DCT row shows why frequency regularisation needs training.
PLANS: dict[str, dict[str, Config] | None] = {
    "dense float32": None,
    "dense float16": {"*": Dense(dtype="float16")},
    "dct keep=0.25": {"*.weight": DCT(keep=0.25)},
    "series harmonics=3": {"conv*.weight": Series(harmonics=3)},
    "basis bank=8/16": {"conv1.weight": Basis(bank=8), "conv2.weight": Basis(bank=16)},
    "linear alpha=0.5": {"*.weight": Linear(alpha=0.5)},
    "mixed": {"conv1.weight": Series(harmonics=4), "conv2.weight": Basis(bank=16),
              "*": Dense(dtype="float16")},
}


@dataclass(frozen=True)
class Row:
    """One line of the demo's table."""

    label: str
    file_bytes: int
    ratio: float
    accuracy: float
    decoded_accuracy: float
    decode_ms: float


def make_model() -> nn.Module:
    """conv 1->16 5x5, pool, conv 16->32 3x3, pool, linear 128->10 (8x8 inputs)."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 16, 5, padding=2), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(16, 32, 3, padding=1), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(), fc=nn.Linear(128, 10)))


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed 1347/450 split of scikit-learn's digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED))
    train, test = order[:N_TRAIN], order[N_TRAIN:]
    return x[train], y[train], x[test], y[test]


def train(x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    torch.manual_seed(SEED)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in progress(range(epochs), None, "train", "epoch"):  # a bar on a terminal: the run is seconds
        order = torch.randperm(len(x))
        for start in range(0, len(x), BATCH):
            batch = order[start:start + BATCH]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


def verify(path: str) -> None:
    """Every tensor decodes to its recorded digest with numpy and with torch, or the demo stops."""
    with kernelpack.open(path) as c:
        for backend in ("numpy", "torch"):
            bad = [name for name, ok in c.verify(backend).items() if not ok]
            if bad:
                raise RuntimeError(f"demo: {path}: {backend} decode does not match the digest of {bad}")


def decode_ms(path: str, repeats: int = 3) -> float:
    """Best of ``repeats`` full ``kernelpack.load`` calls (read, check, decode), in ms."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        kernelpack.load(path)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def run(quick: bool = False, out: str | None = None) -> list[Row]:
    """Train, pack in every form, verify, evaluate; print and return the table."""
    if out is None:
        with tempfile.TemporaryDirectory(prefix="kernelpack-demo-") as tmp:
            return run(quick, tmp)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = digits()
    epochs = QUICK_EPOCHS if quick else EPOCHS
    model = train(x_train, y_train, epochs)
    base = accuracy(model, x_test, y_test)
    print(f"trained {epochs} epochs on {len(x_train)} digits in {time.perf_counter() - start:.1f} s: "
          f"test accuracy {base:.2%} on {len(x_test)}")
    save_file(model.state_dict(), os.path.join(out, "original.safetensors"))
    dense = sum(t.numel() * 4 for t in model.state_dict().values())
    rows = []
    for label, plan in PLANS.items():
        path = os.path.join(out, re.sub(r"[^a-z0-9.]+", "-", label) + ".kpk")
        kernelpack.save(model, path, forms=plan, metadata={"demo": label})
        verify(path)
        decoded = make_model().eval()
        kernelpack.load_model(decoded, path)
        size = os.path.getsize(path)
        rows.append(Row(label, size, dense / size, base, accuracy(decoded, x_test, y_test),
                        decode_ms(path)))
    print(format_table(
        ["form", "bytes", "ratio", "accuracy", "decoded", "decode ms"],
        [[r.label, str(r.file_bytes), f"{r.ratio:.2f}", f"{r.accuracy:.2%}", f"{r.decoded_accuracy:.2%}",
          f"{r.decode_ms:.1f}"] for r in rows], "<>>>>>"))
    print(f"dense float32 reference: {dense} bytes; every file verified (numpy and torch decode "
          f"match the digests); {time.perf_counter() - start:.1f} s in all")
    return rows
