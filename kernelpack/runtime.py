"""The runtime: decode a container once into dense tensors, then run at dense speed.

``load`` returns a state_dict decoded by torch on the requested device (on CUDA the
decode arithmetic itself runs on the GPU); ``load_numpy`` decodes with numpy and
never imports torch (for ONNX Runtime services); ``load_model`` fills a ready
``nn.Module``; ``ort_session`` builds an ``onnxruntime.InferenceSession`` from a container
that carries its ONNX graph (:mod:`kernelpack.ort`, no torch). Every load checks the whole
file: header, layout, zero padding and the SHA-256 of every payload (attachments included),
so that any corrupted byte is an error. ``limits`` (a :class:`Limits`) bounds what a file
may make the reader allocate; services that open untrusted files may lower the defaults.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from kernelpack.container import Container, Limits
from kernelpack.ort import ort_session  # noqa: F401 - an ONNX Runtime session, torch-free


def open(path: str | os.PathLike, limits: Limits | None = None) -> Container:  # noqa: A001
    """Open a container lazily (like safetensors.safe_open): every byte outside the payloads
    checked, tensors decoded one at a time on request."""
    return Container(path, limits)


def load(path: str | os.PathLike, device: Any = "cpu", limits: Limits | None = None) -> dict[str, Any]:
    """Every tensor decoded by torch on ``device``: a state_dict of dense tensors."""
    from kernelpack._backend import TorchOps

    ops = TorchOps(device)
    with Container(path, limits) as c:
        state = {name: c.decode(name, ops) for name in c.keys()}
        c.check_payloads()
        return state


def load_numpy(path: str | os.PathLike, limits: Limits | None = None) -> dict[str, np.ndarray]:
    """Every tensor decoded by numpy on the CPU (no torch import; bfloat16 widened to float32)."""
    with Container(path, limits) as c:
        state = {name: c.get_numpy(name) for name in c.keys()}
        c.check_payloads()
        return state


def load_model(model: Any, path: str | os.PathLike, strict: bool = True,
               device: Any = None, limits: Limits | None = None) -> Any:
    """Decode into a ready ``nn.Module`` (on its device unless ``device`` is given).

    Returns what ``load_state_dict`` returns (missing and unexpected keys).
    """
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else "cpu"
    return model.load_state_dict(load(path, device=device, limits=limits), strict=strict)
