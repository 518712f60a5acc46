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
