"""Converters: put trained (or untrained) PyTorch models into the stored forms.

* ``compress_(model, config)``: each chosen weight becomes a parametrisation of its form
  (``torch.nn.utils.parametrize``), fitted in closed form from the trained weight; train
  or fine-tune as usual, then ``kernelpack.save(model, path)`` packs the trained fields.
* ``plan(model, max_bytes=..., max_error=...)``: a per-tensor config meeting a budget
  (torch-free for numpy input).
* Training aids: ``TailDropout`` and ``allocate`` (frequency regularisation),
  ``reassign_`` and banks (``gaussian_bank``, ``model_bank``) for the basis form,
  ``correlation_loss`` (LinearConv), ``convsim_loss``/``convsim_penalty``/``convsim_init_``
  (Convolutional Similarity), ``fine_tune`` and ``accuracy``.
* ``distill(student, teacher, inputs, ...)``: fine-tune in the forms against the original
  model on unlabeled inputs; ``from_onnx(path)``: an ONNX model as a trainable module (its
  weights are parameters at their ONNX names), packed back by ``OnnxModule.save``.

Names load on first use, so ``plan`` on numpy arrays never imports torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOMES = {
    "compress_": "compress", "encoded_state": "_common", "finalize_": "compress",
    "plan": "planner", "Plan": "planner",
    "DCTWeight": "dct", "TailDropout": "dct", "allocate": "dct",
    "SeriesWeight": "series",
    "BasisWeight": "basis", "reassign_": "basis", "gaussian_bank": "basis", "model_bank": "basis",
    "LinearWeight": "linear", "correlation_loss": "linear",
    "DenseWeight": "dense",
    "convsim_loss": "convsim", "convsim_penalty": "convsim", "convsim_init_": "convsim",
    "fine_tune": "train", "accuracy": "train",
    "distill": "distillation", "DistillResult": "distillation",
    "collect_onnx": "calibration", "collect_torch": "calibration", "load_inputs": "calibration",
    "split": "calibration", "LayerStats": "calibration",
    "from_onnx": "onnx_module", "OnnxModule": "onnx_module",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'kernelpack.converters' has no attribute {name!r}")
    return getattr(import_module(f"kernelpack.converters.{_HOMES[name]}"), name)
