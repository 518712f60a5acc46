"""Frequency regularisation (frequency-regularization.txt): train a weight in the DCT domain.

:class:`DCTWeight` keeps the whole orthonormal DCT-II spectrum of a weight as its
trainable field and multiplies it by the zigzag mask (rank < ``boundary``) before the
N-D inverse DCT, as the paper's Fig. 1; the kept coefficients pack as form ``dct``.
:class:`TailDropout` is the paper's dynamic tail-dropout: the kept ratio follows
beta_n = beta_{n-1} - gamma (beta_{n-1} - eps), stepped once per epoch, and
:func:`allocate` shares each epoch's global count out between tensors.

Decisions (the paper leaves them open):

* **Budget split.** A uniform ratio starves small tensors (LeNet-5 at 1%: conv1 keeps
  2 coefficients, its filters become identical, accuracy falls to chance). The
  default rule gives every tensor ``floor`` coefficients first (at most its size),
  then shares the rest in proportion to the square root of each tensor's size,
  water-filled so that no tensor gets more than its size. ``rule="proportional"``
  shares in proportion to size instead (the uniform ratio, plus floors).
* **Reaching the budget.** beta_n only approaches eps; after ``epochs`` steps the
  scheduler sets the final budget exactly, so training can continue at it.
* **gamma.** The paper uses 0.01 over long GPU runs; the default here, 0.1, reaches
  the budget in tens of epochs.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from kernelpack._exact import dct_table, zigzag_positions
from kernelpack.converters._common import FormWeight, as_stored, form_weights, stored
from kernelpack.errors import KernelpackError
from kernelpack.forms import DCT
from kernelpack.forms._base import shown
from kernelpack.forms.dct import DCTTensor, check_axes


class DCTWeight(FormWeight):
    """A weight as its masked DCT spectrum: W = IDCT_N(mask(rank < boundary) * spectrum)."""

    field_names = ("spectrum",)

    def __init__(self, shape: Sequence[int], config: DCT) -> None:
        super().__init__()
        self.shape = tuple(int(d) for d in shape)
        self.axes = check_axes(tuple(range(len(self.shape))) if config.axes is None
                               else sorted(a % len(self.shape) for a in config.axes), self.shape)
        self.config, self.dtype, self.steps = config, config.dtype, (None,)
        size = math.prod(self.shape)
        order = zigzag_positions(self.shape, self.axes, size)
        rank = np.empty(self.shape, dtype=np.int64)
        rank[tuple(order.T)] = np.arange(size)
        self.register_buffer("rank", torch.from_numpy(rank), persistent=False)
        for a in self.axes:  # (frequency, position) synthesis tables, orthonormal
            table = torch.from_numpy(dct_table(self.shape[a], self.shape[a]))
            self.register_buffer(f"table{a}", table.to(torch.float32), persistent=False)
        self.boundary = config.boundary_for(size)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def boundary(self) -> int:
        """How many coefficients (in zigzag order) are kept."""
        return self._boundary

    @boundary.setter
    def boundary(self, value: int) -> None:
        if not 0 <= int(value) <= self.size:
            raise KernelpackError(f"boundary must be in [0, {self.size}], got {value}", field="boundary")
        self._boundary = int(value)

    def settings(self) -> dict[str, Any]:
        return {"axes": self.axes, "boundary": self.boundary, "dtype": self.dtype}

    def get_extra_state(self) -> dict[str, Any]:
        """The steps and the boundary (which ``TailDropout`` moves during training)."""
        return {**super().get_extra_state(), "boundary": self.boundary}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        boundary = state["boundary"]
        if not isinstance(boundary, int) or isinstance(boundary, bool):
            raise KernelpackError(f"boundary must be an int, got {shown(boundary)}", field="extra_state.boundary")
        self.boundary = boundary

    def _transform(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        for a in self.axes:
            table = getattr(self, f"table{a}").to(x.dtype)
            moved = torch.movedim(x, a, -1)
            moved = moved @ (table if inverse else table.T)
            x = torch.movedim(moved, -1, a)
        return x

    def forward(self, spectrum: torch.Tensor) -> torch.Tensor:
        kept = as_stored(spectrum, self.dtype, self.steps[0]) * (self.rank < self.boundary)
        return self._transform(kept, inverse=True)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor]:
        """The full spectrum of ``weight`` (the mask applies in ``forward``); a quantised
        config's step is the one its fit of ``weight`` chooses, fixed from then on."""
        spectrum = self._transform(weight.detach(), inverse=False)
        if self.config.quantised or self.hessian is not None:
            encoded = self.fit(weight)
            self.steps = (encoded.coefficients.step,)
            if self.hessian is not None:  # the kept coefficients as the output-aware fit chose them
                positions = zigzag_positions(self.shape, self.axes, self.boundary)
                kept = torch.as_tensor(encoded.coefficients.values(), dtype=spectrum.dtype, device=spectrum.device)
                spectrum[tuple(torch.from_numpy(positions.T).to(spectrum.device))] = kept
        return (spectrum,)

    def to_encoded(self, spectrum: torch.Tensor) -> DCTTensor:
        positions = zigzag_positions(self.shape, self.axes, self.boundary)
        kept = spectrum.detach()[tuple(torch.from_numpy(positions.T).to(spectrum.device))]
        return DCTTensor(self.shape, self.axes, stored(kept, self.dtype, self.steps[0]))


def allocate(sizes: Mapping[str, int], budget: int, floor: int | Mapping[str, int] = 32,
             rule: str = "sqrt") -> dict[str, int]:
    """Share ``budget`` coefficients between tensors of the given sizes.

    Every tensor first gets its floor (at most its size); the rest is shared in
    proportion to sqrt(size) (``rule="sqrt"``) or size (``"proportional"``), capped at
    each tensor's size, the excess of capped tensors going to the others. Counts are
    whole numbers summing to exactly ``min(budget, total size)``.
    """
    if rule not in ("sqrt", "proportional"):
        raise KernelpackError(f"rule must be 'sqrt' or 'proportional', got {rule!r}", field="rule")
    names = list(sizes)
    cap = np.array([sizes[n] for n in names], dtype=np.float64)
    floors = np.array([min(sizes[n], floor if isinstance(floor, int) else floor.get(n, 0))
                       for n in names], dtype=np.float64)
    budget = int(min(budget, cap.sum()))
    if floors.sum() > budget:
        raise KernelpackError(f"budget {budget} is below the sum of the floors {int(floors.sum())}; "
                              "lower the floor or raise the budget", field="budget")
    weight = np.sqrt(cap) if rule == "sqrt" else cap.copy()
    share = floors.copy()
    free = share < cap
    while free.any():  # water-filling: tensors that reach their size drop out
        rest = budget - share.sum()
        extra = rest * weight * free / (weight * free).sum()
        over = free & (share + extra >= cap)
        if not over.any():
            share = share + extra
            break
        share[over], free = cap[over], free & ~over
    counts = np.minimum(np.floor(share), cap).astype(np.int64)
    # hand out the remaining units by largest fractional part (deterministic, ties by order)
    for i in np.argsort(-(share - counts), kind="stable")[: budget - int(counts.sum())]:
        counts[i] += 1
    return {n: int(c) for n, c in zip(names, counts)}


class TailDropout:
    """The paper's dynamic tail-dropout, stepped once per epoch (like an LR scheduler).

    ``budget`` is the final number of kept coefficients over all DCT-parametrised
    weights (an int), or a ratio eps of their total (a float in (0, 1]). Each
    ``step()`` applies beta_n = beta_{n-1} - gamma (beta_{n-1} - eps) and sets every
    tensor's boundary from :func:`allocate`; after ``epochs`` steps the budget holds
    exactly.
    """

    def __init__(self, model: nn.Module, budget: int | float, gamma: float = 0.1,
                 epochs: int = 30, start: float = 1.0, floor: int | Mapping[str, int] = 32,
                 rule: str = "sqrt") -> None:
        self.weights = {n: p[0] for n, p in form_weights(model, DCTWeight).items()}
        if not self.weights:
            raise KernelpackError("the model has no DCT-parametrised weight; run compress_ with DCT",
                                  field="model")
        self.total = sum(w.size for w in self.weights.values())
        self.budget = int(budget) if isinstance(budget, int) else round(budget * self.total)
        if not 1 <= self.budget <= self.total:
            raise KernelpackError(f"budget must be in [1, {self.total}], got {budget}", field="budget")
        if not 0.0 < gamma <= 1.0:
            raise KernelpackError(f"gamma must be in (0, 1], got {gamma}", field="gamma")
        self.gamma, self.epochs, self.floor, self.rule = gamma, epochs, floor, rule
        self.epsilon = self.budget / self.total
        self.beta = max(start, self.epsilon)
        self.epoch = 0
        self._apply()

    def step(self) -> dict[str, int]:
        """One epoch: shrink beta and set the boundaries; returns them by weight name."""
        self.epoch += 1
        self.beta -= self.gamma * (self.beta - self.epsilon)
        return self._apply()

    @property
    def kept(self) -> int:
        """The global count this epoch (the budget from epoch ``epochs`` on)."""
        if self.epoch >= self.epochs:
            return self.budget
        return max(self.budget, min(self.total, round(self.beta * self.total)))

    def _apply(self) -> dict[str, int]:
        counts = allocate({n: w.size for n, w in self.weights.items()}, self.kept, self.floor, self.rule)
        for name, weight in self.weights.items():
            weight.boundary = counts[name]
        return counts

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.beta, self.epoch = float(state["beta"]), int(state["epoch"])
        self._apply()

