"""Dense storage narrower than float32, trained in place: the weight rounded to its dtype."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from kernelpack.converters._common import FormWeight, as_numpy64, as_param, as_stored, stored
from kernelpack.forms import Dense
from kernelpack.forms.dense import DenseTensor


class DenseWeight(FormWeight):
    """W = round_to_dtype(V): trains V, uses (and packs) its float16/bfloat16 rounding."""

    field_names = ("values",)

    def __init__(self, shape: Sequence[int], config: Dense) -> None:
        super().__init__()
        self.shape, self.dtype = tuple(int(d) for d in shape), config.dtype
        self.config, self.steps = config, (None,)

    def settings(self) -> dict[str, Any]:
        return {"dtype": self.dtype}

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return as_stored(values, self.dtype, self.steps[0])

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor]:
        if self.hessian is not None and self.config.quantised:  # the codes GPTQ feedback chose
            data = self.fit(weight).data
            self.steps = (data.step,)
            return (as_param(data.values(), weight),)
        self.steps = (self.config.step_for(as_numpy64(weight)),)
        return (weight.detach().clone(),)

    def to_encoded(self, values: torch.Tensor) -> DenseTensor:
        return DenseTensor(stored(values, self.dtype, self.steps[0]), "float32")
