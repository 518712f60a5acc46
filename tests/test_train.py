"""The fine-tuning helper: seeded, reproducible, with an augmentation that moves images."""

from __future__ import annotations

import torch
from torch import nn

from kernelpack.converters import fine_tune
from kernelpack.converters.train import jitter


def test_jitter_is_seeded_and_the_identity_at_zero_strength() -> None:
    images = torch.rand(5, 1, 12, 12)
    a = jitter(images, torch.Generator().manual_seed(3))
    b = jitter(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == images.shape and not torch.allclose(a, images)
    same = jitter(images, torch.Generator().manual_seed(3), shift=0.0, degrees=0.0, scale=0.0)
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)


def test_fine_tune_is_reproducible_and_lowers_the_loss() -> None:
    def run() -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 3, (48,), generator=g)
        losses = fine_tune(net, x, y, epochs=6, lr=1e-2, batch_size=16, augment=True, progress=False)
        return losses, net[0].weight.detach()

    (losses, weight), (again, weight2) = run(), run()
    assert losses == again and torch.equal(weight, weight2)
    assert losses[-1] < losses[0]


def test_distillation_pulls_towards_the_teacher_and_lr_end_anneals() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))

    def gap(distill: float) -> float:
        torch.manual_seed(1)
        student = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        fine_tune(student, x, y, epochs=15, lr=1e-2, teacher=teacher, distill=distill, lr_end=1e-4,
                  progress=False)
        with torch.no_grad():
            return float((student(x).softmax(1) - teacher(x).softmax(1)).abs().mean())

    assert gap(0.9) < 0.5 * gap(0.0)
