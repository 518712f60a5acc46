"""LinearConv (linearconv.txt): a layer's filters as primaries plus linear combinations.

:class:`LinearWeight` trains the primaries and A (or A1, A2) of the stored form; the
secondary filters are A^T W_p. Layers converted after training keep the form's
``order`` (the pivoted-QR choice of primaries); layers trained from scratch
(``compress_`` on an untrained model) have the primaries first and no order.
The order is always a buffer (the identity when the fit keeps the rows as they are, and
then not stored), so that a checkpoint restores into any fresh ``compress_`` of the config,
whichever rows that model's own fit picked.
:func:`correlation_loss` is the paper's Algorithm 1.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from kernelpack.converters._common import (FormWeight, as_param, as_stored, fields,
                                           form_weights, stored)
from kernelpack.errors import KernelpackError
from kernelpack.forms import Linear
from kernelpack.forms._base import to_stored
from kernelpack.forms.linear import LinearTensor


class LinearWeight(FormWeight):
    """W = [W_p; A^T W_p] (rows in ``order``), A = A1 A2 when low rank."""

    def __init__(self, shape: Sequence[int], config: Linear) -> None:
        super().__init__()
        self.shape = tuple(int(d) for d in shape)
        self.config, self.dtype = config, config.dtype
        self.field_names = ("primaries", "A") if config.rank is None else ("primaries", "A1", "A2")
        self.steps: tuple[float | None, ...] = (None,) * len(self.field_names)  # set by right_inverse

    def settings(self) -> dict[str, Any]:
        return {"alpha": self.config.alpha, "rank": self.config.rank, "dtype": self.dtype}

    def forward(self, primaries: torch.Tensor, *coefficients: torch.Tensor) -> torch.Tensor:
        wp = as_stored(primaries, self.dtype, self.steps[0]).reshape(len(primaries), -1)
        a = [as_stored(c, self.dtype, step) for c, step in zip(coefficients, self.steps[1:])]
        coeff = a[0] @ a[1] if len(a) == 2 else a[0]
        rows = torch.cat([wp, coeff.T @ wp])
        return rows[torch.argsort(self.order)].reshape(self.shape)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoded = self.fit(weight)
        order = (torch.arange(self.shape[0]) if encoded.order is None
                 else torch.from_numpy(encoded.order.data.astype(np.int64)))
        self.register_buffer("order", order.to(weight.device))
        fitted = (encoded.primaries, *encoded.coefficients)
        self.steps = tuple(s.step for s in fitted)  # a quantised config's steps, fixed from the fit
        return tuple(as_param(s.values(), weight) for s in fitted)

    def to_encoded(self, primaries: torch.Tensor, *coefficients: torch.Tensor) -> LinearTensor:
        order = self.order.cpu().numpy()
        order = None if np.array_equal(order, np.arange(len(order))) else to_stored(order, "int32")
        return LinearTensor(self.shape, stored(primaries, self.dtype, self.steps[0]),
                            tuple(stored(c, self.dtype, s) for c, s in zip(coefficients, self.steps[1:])), order)


def correlation_loss(model: nn.Module) -> torch.Tensor:
    """Algorithm 1 of linearconv.txt: sum over LinearConv layers of ||V V^T - I||_1, where V
    holds the layer's primaries flattened to rows and scaled to unit norm.

    Add ``lambda * correlation_loss(model)`` to the task loss; it pushes the primaries
    towards linear independence so the secondaries span a full subspace.
    """
    total = None
    for plist in form_weights(model, LinearWeight).values():
        primaries = fields(plist)[0]
        v = torch.nn.functional.normalize(primaries.reshape(len(primaries), -1), dim=1)
        term = (v @ v.T - torch.eye(len(v), dtype=v.dtype, device=v.device)).abs().sum()
        total = term if total is None else total + term
    if total is None:
        raise KernelpackError("the model has no Linear-parametrised weight", field="model")
    return total
