"""What every training-time parametrisation shares.

A form's parametrisation (``torch.nn.utils.parametrize``) holds exactly the stored
fields of its form as trainable tensors (the ``original0..n`` of the parametrised
weight) and fixed buffers, so that a trained model packs to the fields it trained,
with no re-fit. Two rules make the packed model equal the trained one up to the
canonical decode:

* the forward pass uses the numbers *as they will be stored*: each trainable field
  is rounded to the storage dtype, or quantised with its step when the config has one,
  with a straight-through estimator (the value is rounded, the gradient passes as if it
  were not);
* ``right_inverse`` initialises the fields with the form's own closed-form encoder
  (``kernelpack.forms``), so there is one home for each fit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import nn

from kernelpack.forms import Encoded
from kernelpack.forms._base import Stored, quantise, to_stored

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def as_stored(x: torch.Tensor, dtype: str | None, step: float | None = None) -> torch.Tensor:
    """``x`` as it will be stored in the forward pass, unrounded in the backward pass.

    Without a step: rounded to the storage dtype; torch rounds float32 to float16 and
    bfloat16 half to even, as ``forms.to_stored`` does. With a step: quantised as
    ``forms._base.quantise`` and dequantised as the decode does (float32, then float64
    codes ``round_half_even(x / step)``, then ``float32(q) * float32(step)``, one IEEE
    product on every device). Either way these are the very numbers that will be packed.
    """
    if step is not None:
        codes = torch.round(x.detach().to(torch.float32).to(torch.float64) / step)  # half to even
        factor = torch.tensor(step, dtype=torch.float32, device=x.device)
        rounded = (codes.to(torch.float32) * factor).to(x.dtype)
    elif dtype in (None, "float32") and x.dtype == torch.float32:
        return x
    else:
        rounded = x.detach().to(TORCH_DTYPES[dtype or "float32"]).to(x.dtype)
    return x + (rounded - x.detach())


def stored(x: torch.Tensor, dtype: str | None, step: float | None = None) -> Stored:
    """A trained field as the form stores it (float32 first, then rounded or quantised like
    the forward)."""
    values = x.detach().to("cpu", torch.float32).numpy()
    return to_stored(values, dtype or "float32") if step is None else quantise(values, step)


def as_param(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A stored or fitted numpy field as a tensor on ``like``'s device and dtype."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=like.dtype, device=like.device)


def as_numpy64(weight: torch.Tensor) -> np.ndarray:
    """A weight as float64 numpy, the input of the forms' encoders."""
    return weight.detach().to("cpu", torch.float64).numpy()


class FormWeight(nn.Module, ABC):
    """Base of the parametrisations: ``forward(*fields) -> weight``, ``to_encoded(*fields)``."""

    #: Names of the trainable fields, in the order ``right_inverse`` returns them.
    field_names: tuple[str, ...] = ()

    @abstractmethod
    def to_encoded(self, *fields: torch.Tensor) -> Encoded:
        """The stored form of the trained fields (what ``kernelpack.save`` writes)."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings().items())

    def settings(self) -> dict[str, Any]:
        return {}


def form_weights(model: nn.Module, kind: type[FormWeight] = FormWeight) -> dict[str, Any]:
    """The model's kernelpack parametrisations of type ``kind`` by weight name (``conv1.weight``),
    as torch ``ParametrizationList``s: ``plist[0]`` is the form, :func:`fields` its trained fields."""
    from torch.nn.utils import parametrize

    found = {}
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor, plist in module.parametrizations.items():
                if isinstance(plist[0], kind):
                    found[f"{module_name}.{tensor}" if module_name else tensor] = plist
    return found


def fields(plist: Any) -> tuple[torch.Tensor, ...]:
    """The trained fields of a parametrised weight (``original0``, ``original1``, ...)."""
    return tuple(getattr(plist, f"original{i}") for i in range(len(plist[0].field_names)))
