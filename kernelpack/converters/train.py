"""A small fine-tuning loop with a progress bar, for the demo, the tests and the reproduction.

Any training loop works with ``compress_``-ed models; this one only saves writing it:
Adam, shuffled mini-batches from a seeded generator, optional random affine augmentation
of image batches, an optional regulariser added to the loss (e.g.
``lambda m: 1e-3 * convsim_penalty(m)``) and callbacks at the end of each epoch (e.g.
``TailDropout.step``, ``reassign_``).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

Regulariser = Callable[[nn.Module], torch.Tensor]


def fine_tune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 1e-3,
              batch_size: int = 64, weight_decay: float = 0.0, regularizer: Regulariser | None = None,
              epoch_end: Iterable[Callable[[], object]] = (), seed: int = 0,
              augment: bool = False, progress: bool = True) -> list[float]:
    """Train ``model`` on (x, y) with cross-entropy; returns the mean loss of every epoch.

    ``augment`` moves every training image (n, c, h, w) by a random affine map (see
    :func:`jitter`), drawn from the same seeded generator.
    """
    from tqdm import tqdm

    callbacks = list(epoch_end)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                                 weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(epochs), desc="fine-tune", unit="epoch", disable=not progress, leave=False)
    for _ in bar:
        model.train()
        total, count = 0.0, 0
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            inputs = jitter(x[batch], generator) if augment else x[batch]
            loss = nn.functional.cross_entropy(model(inputs), y[batch])
            if regularizer is not None:
                loss = loss + regularizer(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + float(loss.detach()) * len(batch), count + len(batch)
        losses.append(total / count)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        for callback in callbacks:
            callback()
    model.eval()
    return losses


def jitter(images: torch.Tensor, generator: torch.Generator, shift: float = 2.0,
           degrees: float = 10.0, scale: float = 0.1) -> torch.Tensor:
    """Each image rotated by up to ``degrees``, scaled by up to ``scale`` and moved by up to
    ``shift`` pixels (uniform draws), bilinear, zero outside: the usual MNIST augmentation."""
    n, _, h, w = images.shape
    draw = torch.rand(n, 4, generator=generator) * 2 - 1
    angle = draw[:, 0] * degrees * torch.pi / 180
    zoom = 1 + draw[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, draw[:, 2] * 2 * shift / w], 1),
                         torch.stack([sin, cos, draw[:, 3] * 2 * shift / h], 1)], 1)
    grid = nn.functional.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return nn.functional.grid_sample(images, grid, align_corners=False)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on (x, y), in eval mode."""
    model.eval()
    right = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch_size),
                                                                          y.split(batch_size)))
    return right / len(x)
