"""Every ```python block of README.md runs as written (issue 16: the README cannot go stale).

Each block runs in a fresh folder with only what its prose says the reader already has: a
trained ``model`` (an nn.Module with conv1, conv2, fc1 and head), a ``train`` loop, an
exported ``model.onnx`` and an ``example`` input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


class ReadmeNet(nn.Module):
    """The model the README's snippets talk about: convolutions, a matrix, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5, padding=2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 8 * 8, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(torch.relu(self.fc1(x.flatten(1))))


def test_the_readme_has_its_snippets() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_a_readme_snippet_runs_as_written(block: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = ReadmeNet().eval()
    example = torch.zeros(1, 1, 8, 8)
    torch.onnx.export(model, example, "model.onnx", dynamo=False, input_names=["x"], output_names=["y"])
    namespace = {"model": model, "example": example, "train": lambda m: None, "__name__": "readme"}
    exec(compile(block, str(README), "exec"), namespace)
