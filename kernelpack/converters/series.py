"""ApproxConv (approxconv-cosine-chebyshev-series.txt): train kernels as 2-D series.

:class:`SeriesWeight` keeps the series coefficients (..., Nx, Ny) of every kh x kw
kernel as its trainable field; the weight is Tx^T C Ty with the sample tables of
the stored form (``forms.series``), so family, harmonics (Nx != Ny allowed) and
points are those of the packed file. Initialised by the form's least-squares fit.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from kernelpack.converters._common import FormWeight, as_param, as_stored, stored
from kernelpack.forms import Series
from kernelpack.forms.series import SeriesTensor


class SeriesWeight(FormWeight):
    """W[..., i, j] = sum_{p, q} C[..., p, q] Tx[p, i] Ty[q, j]."""

    field_names = ("coefficients",)

    def __init__(self, shape: Sequence[int], config: Series) -> None:
        super().__init__()
        self.shape = tuple(int(d) for d in shape)
        self.config = config
        # The form's encoder validates the settings and fixes the points and tables.
        probe = config.encode(torch.zeros(self.shape, dtype=torch.float64).numpy())
        self.family, self.points, self.dtype = probe.family, probe.points, config.dtype
        self.steps: tuple[float | None] = (None,)  # set by right_inverse
        table_x, table_y = probe.tables()
        self.register_buffer("table_x", torch.tensor(table_x, dtype=torch.float32), persistent=False)
        self.register_buffer("table_y", torch.tensor(table_y, dtype=torch.float32), persistent=False)

    def settings(self) -> dict[str, Any]:
        return {"family": self.family, "harmonics": tuple(self.table_x.shape[:1] + self.table_y.shape[:1]),
                "dtype": self.dtype}

    def forward(self, coefficients: torch.Tensor) -> torch.Tensor:
        c = as_stored(coefficients, self.dtype, self.steps[0])
        tx, ty = self.table_x.to(c.dtype), self.table_y.to(c.dtype)
        return tx.T @ c @ ty

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor]:
        encoded = self.fit(weight)
        self.steps = (encoded.coefficients.step,)  # a quantised config's step, fixed from the fit
        return (as_param(encoded.coefficients.values(), weight),)

    def to_encoded(self, coefficients: torch.Tensor) -> SeriesTensor:
        return SeriesTensor(self.shape, self.family, self.points, stored(coefficients, self.dtype, self.steps[0]))
