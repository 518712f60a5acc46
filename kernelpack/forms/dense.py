"""Form ``dense``: a tensor stored as it is (biases, norms, anything that does not compress).

Fields: one array ``data`` of the tensor's shape. The decoded dtype is the stored
dtype, or float32 when float16/bfloat16 data stands for a float32 tensor (an
exact widening of every bit pattern, NaN payloads included: spec/FORMAT.md section 3)
or when quantised int8/int16 codes do (format 1.2: ``float32(q) *
float32(step)``, the float32 tensor itself). Decoding is otherwise a copy, so any dtype
round-trips bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from kernelpack._backend import NUMPY_DTYPES, Ops
from kernelpack.forms._base import (ArraySpec, Encoded, Quantisable, Stored, encoder_input, need, need_array,
                                    need_only, shown, to_stored)
from kernelpack.forms._weighted import ROWS, feedback_store, hessians, is_stats, row_groups

NAME = "dense"
WIDENING = {"float16": "float32", "bfloat16": "float32"}


@dataclass
class DenseTensor(Encoded):
    data: Stored
    out_dtype: str

    form = NAME
    ANY_DTYPE = True

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.data.spec.shape

    @property
    def dtype(self) -> str:
        return self.out_dtype

    def fields(self) -> dict[str, Any]:
        return {}

    def arrays(self) -> dict[str, Stored]:
        return {"data": self.data}

    @classmethod
    def check(cls, shape: tuple[int, ...], dtype: str, fields: Mapping[str, Any],
              arrays: Mapping[str, ArraySpec], banks: Mapping[str, ArraySpec]) -> None:
        need_only(arrays, {"data"})
        spec = need_array(arrays, "data", tuple(NUMPY_DTYPES), shape, numbers=True)
        decodes_to = ("float32",) if spec.step is not None else (spec.dtype, WIDENING.get(spec.dtype))
        need(dtype in decodes_to, "dtype", f"a dense tensor of stored dtype {spec.dtype}"
             f"{' with a step' if spec.step is not None else ''} cannot decode to {dtype}")

    @classmethod
    def build(cls, shape: tuple[int, ...], dtype: str, fields: Mapping[str, Any],
              arrays: Mapping[str, Stored], banks: Mapping[str, Stored]) -> "DenseTensor":
        data = arrays["data"]
        if data.dtype == "bool":  # numpy and torch read other byte values differently
            need(bool(np.all(data.data.view(np.uint8) <= 1)), "arrays.data", "bool bytes must be 0 or 1")
        return cls(data, dtype)

    def decode(self, ops: Ops) -> Any:
        stored, dtype = self.data.numbers()
        return ops.from_stored(stored, dtype) if self.out_dtype == dtype else ops.widen(stored, dtype)


@dataclass(frozen=True)
class Dense(Quantisable):
    """Store as it is; ``dtype`` ('float16', 'bfloat16') stores a float32 tensor narrower, and
    ``step``/``rel_step`` (instead of ``dtype``) quantise one (:class:`Quantisable`).

    Narrowing refuses a finite value beyond the dtype's range rather than store it as
    infinity (``to_stored``): the caller chose the dtype for its size, so storing the tensor
    wider instead would silently break that plan. Infinities and NaNs are stored.

    ``hessian`` (kernelpack.forms._weighted) makes quantised storage output-aware: the same
    step, codes chosen by GPTQ error feedback. Float storage rounds every number to nearest
    whatever H is (each number is stored on its own, so there is nothing to trade): there
    ``hessian`` is checked and changes nothing."""

    dtype: str | None = None

    def encode(self, array: np.ndarray, source_dtype: str, hessian: Any = None) -> DenseTensor:
        """``array`` is the tensor as numpy (bfloat16 as uint16 bits, named by ``source_dtype``)."""
        array = encoder_input(array, NAME, fits=False)
        if hessian is not None:
            positions, h = _matrix_positions(array.shape, hessian)
        need(source_dtype in NUMPY_DTYPES, "dtype",
             f"unknown dtype {shown(source_dtype)}; known: {sorted(NUMPY_DTYPES)}")
        if self.quantised:
            need(source_dtype == "float32" and self.dtype in (None, "float32"), "step",
                 f"quantised dense storage is for float32 tensors without a dtype, got a {source_dtype} "
                 f"tensor and dtype {self.dtype}")
            if hessian is not None:
                return DenseTensor(_feedback(self, array, positions, h), "float32")
            return DenseTensor(self.store(array), "float32")
        self.check_choice(None)
        if self.dtype is None or self.dtype == source_dtype:
            need(array.dtype == NUMPY_DTYPES[source_dtype], "dtype", f"the array's numpy dtype {array.dtype} is "
                 f"not {source_dtype}'s {NUMPY_DTYPES[source_dtype]}, which dense stores as it is")
            return DenseTensor(Stored(np.asarray(array, order="C"), source_dtype), source_dtype)
        need(source_dtype == "float32" and self.dtype in WIDENING, "dtype",
             f"dense storage as {self.dtype} is only for float32 tensors, got {source_dtype}")
        return DenseTensor(to_stored(array, self.dtype), "float32")


def _matrix_positions(shape: tuple[int, ...], hessian: Any) -> tuple[np.ndarray, np.ndarray]:
    """Where each entry of the matrix W that H is for lies in the flattened tensor, (rows, K),
    and the damped H per group: the tensor's rows for a plain H or layout 'rows', and
    ``LayerStats.matrix`` for any other layout (W is then a permutation of the tensor)."""
    positions = np.arange(math.prod(shape)).reshape(shape)
    if is_stats(hessian) and hessian.layout != ROWS:
        matrix = hessian.matrix(positions)
        matrix = matrix.reshape(-1, matrix.shape[-1])
        return matrix, hessians(hessian.h, matrix.shape, NAME)
    h = hessians(hessian, shape, NAME)
    return positions.reshape(shape[0], -1), h


def _feedback(config: Dense, array: np.ndarray, positions: np.ndarray, h: np.ndarray) -> Stored:
    """The tensor's codes rounded by error feedback on its matrix W, scattered back."""
    flat = np.asarray(array, np.float64).reshape(-1)
    rows = feedback_store(config, flat[positions], h, row_groups(positions.shape[0], h.shape[0]))
    data = np.empty(flat.size, rows.data.dtype)
    data[positions.reshape(-1)] = rows.data.reshape(-1)
    return Stored(data.reshape(array.shape), rows.dtype, rows.step)
