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

Everything else the forward pass depends on is in ``state_dict`` too, so that a plain torch
checkpoint (``torch.save(model.state_dict())``) restores the very forward pass: banks,
indices and orders are persistent buffers; the quantisation steps (and the dct boundary)
are the parametrisation's extra state (``get_extra_state``), plain lists of floats, ints
and None, which ``torch.load(weights_only=True)`` reads without unpickling any object.
Derived tables (from shape and config) are non-persistent buffers, rebuilt by ``compress_``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from kernelpack.errors import KernelpackError
from kernelpack.forms import Encoded
from kernelpack.forms._base import Stored, as_step, quantise, shown, to_stored

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
    #: The step of each stored number array (None: not quantised), fixed by ``right_inverse``
    #: from the fit; the forward pass quantises with them.
    steps: tuple[float | None, ...] = ()

    #: Calibration statistics of the layer (``Plan.hessians``), set by ``compress_`` only while
    #: ``right_inverse`` runs, so that the first fit is the plan's output-aware one.
    hessian: Any = None

    def fit(self, weight: torch.Tensor) -> Encoded:
        """The form's closed-form fit of ``weight`` (one home: the form's own encoder),
        output-aware when a calibrated plan's statistics are set (``hessian``)."""
        if self.hessian is None:
            return self.config.encode(as_numpy64(weight))
        return self.config.encode(weight.detach().to("cpu", torch.float32).numpy(), "float32", hessian=self.hessian)

    def get_extra_state(self) -> dict[str, Any]:
        """What ``state_dict`` saves besides tensors: ``{"steps": [float or None, ...]}``."""
        return {"steps": list(self.steps)}

    def set_extra_state(self, state: Any) -> None:
        """Restore :meth:`get_extra_state` from a checkpoint, checked against this config: the
        same keys, and a step exactly where this config quantises (field ``extra_state``)."""
        if not isinstance(state, Mapping) or set(state) != set(self.get_extra_state()):
            raise KernelpackError(f"{type(self).__name__} takes a dict with keys "
                                  f"{sorted(self.get_extra_state())}, got {shown(state)}", field="extra_state")
        self.steps = checked_steps(state["steps"], self.steps)

    @abstractmethod
    def to_encoded(self, *fields: torch.Tensor) -> Encoded:
        """The stored form of the trained fields (what ``kernelpack.save`` writes)."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings().items())

    def settings(self) -> dict[str, Any]:
        return {}


def checked_steps(saved: Any, current: tuple[float | None, ...]) -> tuple[float | None, ...]:
    """A checkpoint's steps: as many as ``current``, None where it is None, else a valid float32 step."""
    if not isinstance(saved, (list, tuple)) or len(saved) != len(current):
        raise KernelpackError(f"steps must be a list of {len(current)} entries, got {shown(saved)}",
                              field="extra_state.steps")
    if [s is None for s in saved] != [s is None for s in current]:
        raise KernelpackError(f"steps {list(saved)} do not match this config's quantisation "
                              f"{['quantised' if s is not None else None for s in current]}",
                              field="extra_state.steps")
    return tuple(None if s is None else as_step(s, "extra_state.steps") for s in saved)


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


def encoded_state(model: nn.Module) -> dict[str, Any]:
    """The model's state for packing: parametrised weights in their stored forms, the rest as is.

    Parametrisation internals (trained fields, banks, indices) are replaced by one entry
    under the plain weight name, so the file loads into the unparametrised model.
    """
    plists = form_weights(model)
    prefixes = {_join(module, "parametrizations", tensor) + ".": name
                for name in plists for module, tensor in [_split(name)]}
    state: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        owner = next((prefixes[p] for p in prefixes if key.startswith(p)), None)
        if owner is None:
            state[key] = value
        elif owner not in state:
            plist = plists[owner]
            try:
                with torch.no_grad():
                    state[owner] = plist[0].to_encoded(*fields(plist))
            except KernelpackError as exc:  # e.g. a trained value beyond float16's range
                raise exc.located(tensor=owner) from None
    return state


def _split(name: str) -> tuple[str, str]:
    """``layer1.0.conv1.weight`` -> (``layer1.0.conv1``, ``weight``); the root module is ''."""
    module, _, tensor = name.rpartition(".")
    return module, tensor


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)
