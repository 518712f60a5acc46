"""Few unique filters (few-unique-filters.txt): every kernel slice is a * g + b, g from a bank.

:class:`BasisWeight` keeps a frozen bank (stored-rounded, a buffer) and per-slice bank
indices (a buffer), and trains ``a`` and ``b`` per slice, as the paper fine-tunes with
frozen filters.

Re-assignment between epochs (the paper fixes the choice once; this is our addition,
:func:`reassign_`): the weight is always exactly a * g + b, so re-fitting it to itself
would change nothing. Instead every parametrised weight sums the gradients it receives
over the epoch, and ``reassign_(model, lr)`` re-picks each slice's filter (and a, b)
as the closest linear transform of W - lr * sum(grad): where plain SGD on the dense
weight would have taken it. Slices whose pull is weak keep their filter. Banks: k-means of a tensor's own slices
(``Basis(bank=n)``), of the whole model's filters (:func:`model_bank`), the paper's
built-in families (:func:`gaussian_bank`), or any array the user gives.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from kernelpack.converters._common import (FormWeight, as_numpy64, as_param, as_stored, fields,
                                           form_weights, stored)
from kernelpack.errors import KernelpackError
from kernelpack.forms import Basis
from kernelpack.forms.basis import BasisTensor, content_name, fit_slices, kmeans_bank, normalize_rows
from kernelpack.forms._base import to_stored


class BasisWeight(FormWeight):
    """W[s] = a[s] * bank[index[s]] + b[s] over slices s shaped like a bank filter."""

    field_names = ("a", "b")

    def __init__(self, shape: Sequence[int], config: Basis) -> None:
        super().__init__()
        self.shape = tuple(int(d) for d in shape)
        self.config, self.dtype = config, config.dtype
        self.steps: tuple[float | None, ...] = (None, None, None)  # bank, a, b: set by right_inverse
        # The gradient summed since the last reassign_ (not in state_dict: a restored model
        # starts a new sum, as after a reassign_).
        self.pull: torch.Tensor | None = None

    def settings(self) -> dict[str, Any]:
        return {"filters": len(getattr(self, "bank", ())), "dtype": self.dtype}

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        filters = self.bank.to(a.dtype)[self.index].reshape(len(self.index), -1)
        step_a, step_b = self.steps[1:]
        slices = as_stored(a, self.dtype, step_a)[:, None] * filters + as_stored(b, self.dtype, step_b)[:, None]
        weight = slices.reshape(self.shape)
        if weight.requires_grad:
            weight.register_hook(self._accumulate)
        return weight

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        """A checkpoint's bank may hold another number of filters than this model's own fit
        found (k-means of other weights can find fewer): take its size, then load as usual."""
        bank = state_dict.get(prefix + "bank")
        if isinstance(bank, torch.Tensor) and bank.shape[1:] == self.bank.shape[1:]:
            self.register_buffer("bank", torch.empty(bank.shape, dtype=self.bank.dtype, device=self.bank.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_extra_state(self, state: Any) -> None:
        """The steps, after the buffers: the restored indices must pick filters of the restored bank."""
        super().set_extra_state(state)
        if len(self.index) and not 0 <= int(self.index.min()) <= int(self.index.max()) < len(self.bank):
            raise KernelpackError(f"a checkpoint's index picks filters outside its bank of {len(self.bank)}",
                                  field="index")

    def _accumulate(self, grad: torch.Tensor) -> None:
        """Sum the gradients of the dense weight since the last re-assignment."""
        self.pull = grad.detach().clone() if self.pull is None else self.pull + grad.detach()

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.fit(weight)
        self.steps = (encoded.bank.step, encoded.a.step, encoded.b.step)  # quantised: fixed from the fit
        # Buffers (saved in checkpoints): the stored-rounded bank and the slices' indices.
        bank = torch.from_numpy(encoded.bank.values().astype(np.float32))
        self.register_buffer("bank", bank.to(weight.device))
        self.register_buffer("index", torch.from_numpy(encoded.index.data.astype(np.int64)).to(weight.device))
        return as_param(encoded.a.values(), weight), as_param(encoded.b.values(), weight)

    @torch.no_grad()
    def reassign(self, a: torch.Tensor, b: torch.Tensor, lr: float) -> None:
        """Re-pick every slice's filter, a and b for W - lr * (gradients summed since the last call)."""
        if self.pull is None:
            return
        target = self.forward(a, b) - lr * self.pull
        self.pull = None
        current = target.to("cpu", torch.float64).numpy().reshape(len(self.index), -1)
        bank = self.bank.detach().to("cpu", torch.float64).numpy().reshape(len(self.bank), -1)
        index, new_a, new_b = fit_slices(current, bank)
        self.index.copy_(torch.from_numpy(index))
        a.copy_(as_param(new_a, a))
        b.copy_(as_param(new_b, b))

    def to_encoded(self, a: torch.Tensor, b: torch.Tensor) -> BasisTensor:
        step_bank, step_a, step_b = self.steps
        bank = stored(self.bank, self.dtype, step_bank)  # exact: the buffer holds stored values
        index = to_stored(self.index.cpu().numpy(), "uint8" if len(self.bank) <= 256 else "uint16")
        name = self.config.bank_name or content_name(bank)
        return BasisTensor(self.shape, name, bank, index, stored(a, self.dtype, step_a),
                           stored(b, self.dtype, step_b))


def gaussian_bank(size: int | tuple[int, int], sigmas: Sequence[float] = (0.5, 1.0)) -> np.ndarray:
    """The paper's built-in bank: per sigma a Gaussian, its first and second derivatives
    (x, y, xx, yy, xy) and a difference of Gaussians (sigma vs 1.6 sigma): 7 filters per sigma.

    Coordinates are in pixels centred on the kernel; filters are returned normalised
    (centred, unit norm), as banks are stored. A constant filter (a Gaussian wider than
    the kernel) is dropped.
    """
    kh, kw = (size, size) if isinstance(size, int) else size
    y, x = np.meshgrid(np.arange(kh) - (kh - 1) / 2, np.arange(kw) - (kw - 1) / 2, indexing="ij")
    filters = []
    for s in sigmas:
        g = np.exp(-(x ** 2 + y ** 2) / (2 * s * s))
        wide = np.exp(-(x ** 2 + y ** 2) / (2 * (1.6 * s) ** 2)) / 1.6 ** 2
        filters += [g, -x * g, -y * g, (x * x / s ** 2 - 1) * g, (y * y / s ** 2 - 1) * g, x * y * g, g - wide]
    flat = normalize_rows(np.array(filters).reshape(len(filters), -1))
    return flat[np.linalg.norm(flat, axis=1) > 0].reshape(-1, kh, kw)


def model_bank(model: nn.Module, filters: int, kernel: tuple[int, int] = (3, 3), seed: int = 0) -> np.ndarray:
    """A bank of ``filters`` normalised filters: k-means of every kernel slice of shape
    ``kernel`` in the model's conv weights (one bank shared by all those layers)."""
    slices = [as_numpy64(m.weight).reshape(-1, math.prod(kernel)) for m in model.modules()
              if isinstance(m, nn.modules.conv._ConvNd) and tuple(m.weight.shape[-2:]) == tuple(kernel)]
    if not slices:
        raise KernelpackError(f"the model has no conv weight with {kernel[0]}x{kernel[1]} kernels",
                              field="kernel")
    return kmeans_bank(np.concatenate(slices), filters, seed).reshape((-1,) + tuple(kernel))


def reassign_(model: nn.Module, lr: float) -> None:
    """Re-assign every basis-parametrised weight's slices (see the module doc); call between
    epochs, e.g. ``fine_tune(..., epoch_end=[lambda: reassign_(model, lr)])``."""
    for plist in form_weights(model, BasisWeight).values():
        plist[0].reassign(*fields(plist), lr=lr)
