"""A small fine-tuning loop with a progress bar, for the demo, the tests and the reproduction.

For labelled (N, C) classification with fixed-size tensors. Any other model, output or input
(unlabeled, sequences, maps, dict batches) distils from the original with
:func:`kernelpack.converters.distill`. Any training loop works with ``compress_``-ed models;
this one only saves writing it:
Adam, shuffled mini-batches from a seeded generator, optional random affine augmentation
of image batches, optional distillation from a teacher (the dense model a compressed one
came from), an optional regulariser added to the loss (e.g.
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
              augment: bool = False, teacher: nn.Module | None = None, distill: float = 0.5,
              temperature: float = 4.0, lr_end: float | None = None, progress: bool = True) -> list[float]:
    """Train ``model`` on (x, y) with cross-entropy; returns the mean loss of every epoch.

    ``augment`` moves every training image (n, c, h, w) by a random affine map (see
    :func:`jitter`), drawn from the same seeded generator. With a ``teacher`` the loss is
    (1 - distill) * CE + distill * T^2 * KL(teacher || model) at temperature T (Hinton et al.).
    ``lr_end`` anneals the learning rate from ``lr`` to it along a cosine, once per epoch.
    """
    from tqdm import tqdm

    callbacks = list(epoch_end)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                                 weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    annealing = None if lr_end is None else torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, epochs - 1), eta_min=lr_end)
    losses = []
    bar = tqdm(range(epochs), desc="fine-tune", unit="epoch", disable=not progress, leave=False)
    for _ in bar:
        model.train()
        total, count = 0.0, 0
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            inputs = jitter(x[batch], generator) if augment else x[batch]
            logits = model(inputs)
            loss = nn.functional.cross_entropy(logits, y[batch])
            if teacher is not None:
                loss = (1 - distill) * loss + distill * _soft_loss(logits, teacher, inputs, temperature)
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
        if annealing is not None:
            annealing.step()
    model.eval()
    return losses


def _soft_loss(logits: torch.Tensor, teacher: nn.Module, inputs: torch.Tensor, t: float) -> torch.Tensor:
    from kernelpack.converters.distillation import kl_loss

    with torch.no_grad():
        target = teacher.eval()(inputs)
    return kl_loss(logits, target, t)


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
