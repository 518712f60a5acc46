"""Array backends for the canonical decode: numpy (CPU) and torch (CPU or CUDA).

Each form's decode is written once against the small :class:`Ops` interface, so
the numpy path (used by ONNX Runtime services, which must not import torch) and
the torch path (which runs the arithmetic on the GPU) cannot drift apart. Only
operations whose results are fixed by IEEE 754 are exposed: float64 products and
sums of exact integers, scaling by powers of two, round-half-even, and the final
float64 -> float32 rounding. See spec/FORMAT.md, "Bit-exact decode".
"""

from __future__ import annotations

import math
from typing import Any, Protocol, Sequence

import numpy as np

from kernelpack.errors import KernelpackError, need_module

#: numpy dtypes of stored arrays by spec name. bfloat16 travels as its raw bits.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"), "int8": np.dtype("i1"), "uint8": np.dtype("u1"),
    "int16": np.dtype("<i2"), "uint16": np.dtype("<u2"), "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"), "bool": np.dtype("?"),
}


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits to float32 exactly (a bfloat16 is a truncated float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


#: Bits of +infinity of the 2-byte float dtypes: a NaN is above it, ignoring the sign bit.
INFINITY_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}


def has_nan(stored: np.ndarray, dtype: str) -> bool:
    """Whether stored float16/bfloat16 numbers hold a NaN, in two integer max reductions and
    no temporary: positive NaNs are the int16 patterns above +inf, negative ones the uint16
    patterns above -inf. Cheap enough to run before every widening (spec/FORMAT.md section 3)."""
    inf = INFINITY_BITS[dtype]
    return stored.size > 0 and (int(stored.view(np.int16).max()) > inf
                                or int(stored.view(np.uint16).max()) > inf | 0x8000)


def has_special(stored: np.ndarray, dtype: str) -> bool:
    """Whether stored float numbers hold an infinity or a NaN (exponent all ones) with no
    temporary array: for the 2-byte dtypes two integer max reductions (an infinity's bits
    are the largest but for NaNs'), else a min and a max (NaN-propagating). The common
    all-finite case costs two reads of the stored bytes."""
    if not stored.size:
        return False
    if dtype in INFINITY_BITS:
        inf = INFINITY_BITS[dtype]
        return int(stored.view(np.int16).max()) >= inf or int(stored.view(np.uint16).max()) >= inf | 0x8000
    return not (math.isfinite(float(np.max(stored))) and math.isfinite(float(np.min(stored))))


#: Elements per block of :func:`float16_to_float32`: a block of the input and of the output
#: stay in the core's L2 cache across its passes.
WIDEN_BLOCK = 1 << 16
#: 2^112: scales float16 bits moved into float32's place (exponent bias 15 -> 127) to their
#: value; a power of two, so the product is exact.
_REBIAS = np.float32(2.0 ** 112)
#: The smallest float32 subnormal: the rebias scales float16 subnormals from float32
#: subnormals, which a thread with denormals-are-zero set (MXCSR DAZ, set by some libraries
#: built with -ffast-math) would read as 0. Checked per call, in the calling thread.
_TINY = np.array([1], dtype=np.uint32).view(np.float32)


def float16_to_float32(stored: np.ndarray) -> np.ndarray:
    """Widen float16 to float32 exactly for every bit pattern (spec/FORMAT.md section 3):
    numbers by value, infinities and NaNs to ``sign | 0x7F800000 | payload << 13``, so that a
    signalling NaN stays signalling (hardware conversions, x86 F16C, CUDA, torch's cast,
    set the quiet bit; these lanes are written from the bits here, so the result does not
    depend on which one ran).

    Why not numpy's cast: it converts one element at a time, 2 ns each, and was the largest
    single cost of loading a ResNet-50 (most of its tensors are float16). Here the magnitude
    bits are shifted into float32's place and scaled by 2^112 (exact), the sign put back, in
    blocks that stay in L2: about 1.7x faster, the same bits (tests/test_form_dense.py, all
    65536 patterns). A
    thread whose floating point reads subnormals as zero gets numpy's cast instead."""
    bits = np.ascontiguousarray(stored).view(np.uint16).reshape(-1)
    if not (_TINY * _REBIAS)[0]:  # denormals are zero in this thread: the rebias would lose them
        out = bits.view(np.float16).astype(np.float32)
    else:
        out = np.empty(bits.shape, dtype=np.float32)
        word = out.view(np.uint32)
        sign = np.empty(min(len(bits), WIDEN_BLOCK), dtype=np.uint32)
        for start in range(0, len(bits), WIDEN_BLOCK):
            block, sign_block = word[start:start + WIDEN_BLOCK], sign[:min(WIDEN_BLOCK, len(bits) - start)]
            np.copyto(block, bits[start:start + WIDEN_BLOCK])
            np.bitwise_and(block, 0x8000, out=sign_block)
            block ^= sign_block
            block <<= np.uint32(13)
            out[start:start + WIDEN_BLOCK] *= _REBIAS
            sign_block <<= np.uint32(16)
            block |= sign_block
    if has_special(stored, "float16"):  # exponent all ones: infinities and NaNs, from their bits
        special = (bits & 0x7C00) == 0x7C00
        h = bits[special].astype(np.uint32)
        out.view(np.uint32)[special] = ((h & 0x8000) << 16) | 0x7F800000 | ((h & 0x3FF) << 13)
    return out.reshape(np.shape(stored))


class Ops(Protocol):
    """What a decode may do to arrays. ``Array`` is numpy.ndarray or torch.Tensor."""

    def from_stored(self, stored: np.ndarray, dtype: str) -> Any: ...
    def widen(self, stored: np.ndarray, dtype: str) -> Any: ...
    def float64(self, stored: np.ndarray, dtype: str) -> Any: ...
    def absmax(self, x: Any) -> float: ...
    def scaled_rint(self, x: Any, factor: float) -> Any: ...
    def scale_product(self, product: Any, factor: float) -> Any: ...
    def matmul(self, a: Any, b: Any) -> Any: ...
    def moveaxis(self, x: Any, source: int, destination: int) -> Any: ...
    def reshape(self, x: Any, shape: Sequence[int]) -> Any: ...
    def transpose2(self, x: Any) -> Any: ...
    def scatter(self, size: int, positions: np.ndarray, values: Any) -> Any: ...
    def rows_float32(self, parts: Sequence[Any], order: np.ndarray | None) -> Any: ...
    def concat_last(self, parts: Sequence[Any]) -> Any: ...
    def to_float32(self, x: Any) -> Any: ...
    def to_numpy(self, x: Any) -> np.ndarray: ...


#: OpenBLAS runs a GEMM on the calling thread when M * N * K < 2^18 (its interface/gemm.c:
#: SMP_THRESHOLD_MIN 65536 x GEMM_MULTITHREAD_THRESHOLD 4); NumpyOps.matmul cuts tall
#: products into row blocks under it, unless the blocks would be under MIN_BLOCK_ROWS rows
#: (a real GEMM, which BLAS runs best as one call; a load holds BLAS to one thread while it
#: has such products, kernelpack._parallel.blas_limit_for).
BLAS_ONE_THREAD = 1 << 18
MIN_BLOCK_ROWS = 64


def blas_threaded(entries: int) -> bool:
    """Whether a product whose right operand has ``entries`` (K x N) is one BLAS runs on its
    own threads: its row blocks under BLAS_ONE_THREAD would be under MIN_BLOCK_ROWS rows."""
    return BLAS_ONE_THREAD // max(1, entries) < MIN_BLOCK_ROWS


class NumpyOps:
    """The reference backend: numpy on the CPU, no torch import."""

    name = "numpy"

    def from_stored(self, stored: np.ndarray, dtype: str) -> np.ndarray:
        return bfloat16_bits_to_float32(stored) if dtype == "bfloat16" else stored

    def widen(self, stored: np.ndarray, dtype: str) -> np.ndarray:
        """Stored float16/bfloat16 as float32, exact for every bit pattern NaN included."""
        return bfloat16_bits_to_float32(stored) if dtype == "bfloat16" else float16_to_float32(stored)

    def float64(self, stored: np.ndarray, dtype: str) -> np.ndarray:
        return self.from_stored(stored, dtype).astype(np.float64)

    def absmax(self, x: np.ndarray) -> float:
        """max |x| from the two extremes: two reductions, no temporary |x| (x is never NaN)."""
        return max(float(np.max(x)), -float(np.min(x))) if x.size else 0.0

    def scaled_rint(self, x: np.ndarray, factor: float) -> np.ndarray:
        """rint(x * factor) into a new C-ordered array: a transposed view is copied in the
        same pass, and the rounding happens in place (one allocation, two passes)."""
        out = np.empty(x.shape, dtype=np.float64)
        np.multiply(x, factor, out=out)
        return np.rint(out, out=out)

    def scale_product(self, product: np.ndarray, factor: float) -> np.ndarray:
        """(product + 0.0) * factor, in place: ``product`` is a fresh matmul result."""
        product += 0.0
        product *= factor
        return product

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``a @ b`` (2-D, float64), in blocks of rows when the right operand is small.

        Why: a decode's products are mostly tall and thin (millions of rows, K and N of 2 to
        64), where OpenBLAS splits one call over every core and the dispatch costs more
        than the arithmetic: 5 to 40x slower than the same rows in blocks small enough for
        OpenBLAS to stay on the calling thread (benchmarks/decode.py). Every row is its own
        exact integer sum (kernelpack/_exact.py), so the blocks never change a bit, and
        the whole-file pool (kernelpack._parallel) supplies the parallelism instead (and holds BLAS
        to one thread while a load has large products, _parallel.blas_limit_for)."""
        entries = b.shape[0] * b.shape[1]
        rows = BLAS_ONE_THREAD // max(1, entries)
        if blas_threaded(entries) or a.shape[0] <= rows:
            return a @ b
        out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
        for start in range(0, a.shape[0], rows):
            np.matmul(a[start:start + rows], b, out=out[start:start + rows])
        return out

    def moveaxis(self, x: np.ndarray, source: int, destination: int) -> np.ndarray:
        return np.moveaxis(x, source, destination)

    def reshape(self, x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        return np.asarray(x, order="C").reshape(tuple(shape))

    def transpose2(self, x: np.ndarray) -> np.ndarray:
        return x.T  # a view: the quantize that reads it writes C order


    def scatter(self, size: int, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
        out = np.zeros(size, dtype=np.float64)
        out[positions] = values
        return out

    def rows_float32(self, parts: Sequence[np.ndarray], order: np.ndarray | None) -> np.ndarray:
        """The rows of ``parts`` stacked, stacked row i written to row ``order[i]`` (in place if
        ``order`` is None), as float32: one pass into the result, no float64 stack or copy
        in the new order (each was a full float64 copy of a linear tensor)."""
        out = np.empty((sum(len(p) for p in parts),) + tuple(parts[0].shape[1:]), dtype=np.float32)
        start = 0
        with np.errstate(over="ignore"):  # beyond float32's range is +-inf, as the spec says
            for part in parts:
                out[slice(start, start + len(part)) if order is None else order[start:start + len(part)]] = part
                start += len(part)
        return out

    def concat_last(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts, axis=-1)

    def to_float32(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # beyond float32's range is +-inf, as the spec says
            return np.asarray(x, dtype=np.float32, order="C")

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, order="C")


class TorchOps:
    """torch on any device; on CUDA every product and sum of the decode runs on the GPU."""

    name = "torch"

    def __init__(self, device: Any = "cpu") -> None:
        self.torch = need_module("torch", "the torch backend")
        self.device = torch_device(self.torch, device)

    def from_stored(self, stored: np.ndarray, dtype: str) -> Any:
        stored = np.asarray(stored, order="C")
        t = self.torch.from_numpy(stored if stored.flags.writeable else stored.copy())
        if dtype == "bfloat16":
            t = t.view(self.torch.bfloat16)
        return t.to(self.device)

    def widen(self, stored: np.ndarray, dtype: str) -> Any:
        """Stored float16/bfloat16 as float32 with numpy's bits: torch's cast on the device (one
        vectorised pass, exact for numbers) unless a NaN is present, whose bits torch's cast
        may change (it quiets signalling NaNs); then the exact widening of :class:`NumpyOps`."""
        if has_nan(stored, dtype):
            return self.torch.from_numpy(NumpyOps().widen(stored, dtype)).to(self.device)
        return self.from_stored(stored, dtype).to(self.torch.float32).contiguous()

    def float64(self, stored: np.ndarray, dtype: str) -> Any:
        if self.device.type == "cpu":  # widened by numpy: one pass, no copy of the read-only payload
            return self.torch.from_numpy(NumpyOps().float64(stored, dtype))
        return self.from_stored(stored, dtype).to(self.torch.float64)  # narrow bytes to the device

    def absmax(self, x: Any) -> float:
        if not x.numel():
            return 0.0
        low, high = self.torch.aminmax(x)  # one pass, no temporary |x| (x is never NaN)
        return float(self.torch.maximum(high, -low))

    def scaled_rint(self, x: Any, factor: float) -> Any:
        out = self.torch.empty(tuple(x.shape), dtype=self.torch.float64, device=self.device)
        self.torch.mul(x, factor, out=out)  # C-ordered even when x is a transposed view
        return out.round_()  # round half to even on every device

    def scale_product(self, product: Any, factor: float) -> Any:
        return product.add_(0.0).mul_(factor)

    def matmul(self, a: Any, b: Any) -> Any:
        return a @ b

    def moveaxis(self, x: Any, source: int, destination: int) -> Any:
        return self.torch.movedim(x, source, destination)

    def reshape(self, x: Any, shape: Sequence[int]) -> Any:
        return x.contiguous().reshape(tuple(shape))

    def transpose2(self, x: Any) -> Any:
        return x.T


    def scatter(self, size: int, positions: np.ndarray, values: Any) -> Any:
        out = self.torch.zeros(size, dtype=self.torch.float64, device=self.device)
        out[self.torch.from_numpy(positions.astype(np.int64)).to(self.device)] = values
        return out

    def rows_float32(self, parts: Sequence[Any], order: np.ndarray | None) -> Any:
        out = self.torch.empty((sum(len(p) for p in parts),) + tuple(parts[0].shape[1:]),
                               dtype=self.torch.float32, device=self.device)
        start = 0
        for part in parts:
            rows = (slice(start, start + len(part)) if order is None else
                    self.torch.from_numpy(order[start:start + len(part)].astype(np.int64)).to(self.device))
            out[rows] = part.to(self.torch.float32)
            start += len(part)
        return out

    def concat_last(self, parts: Sequence[Any]) -> Any:
        return self.torch.cat(list(parts), dim=-1)

    def to_float32(self, x: Any) -> Any:
        return x.to(self.torch.float32).contiguous()

    def to_numpy(self, x: Any) -> np.ndarray:
        x = x.detach().cpu().contiguous()
        if x.dtype == self.torch.bfloat16:
            return x.view(self.torch.uint16).numpy()
        return x.numpy()


def torch_device(torch: Any, device: Any) -> Any:
    """``device`` as a ``torch.device`` this machine decodes on: the CPU or a CUDA device torch
    sees. Other device types are refused: a decode needs float64 arithmetic, which some lack
    (mps), and real data (meta)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise KernelpackError(f"unknown device {device!r:.80}: use 'cpu', 'cuda' or 'cuda:N'",
                              field="device") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise KernelpackError(f"{str(dev)!r}: torch sees no CUDA device on this machine", field="device")
        if dev.index is not None and dev.index >= count:
            raise KernelpackError(f"{str(dev)!r}: torch sees {count} CUDA device(s), cuda:0 to "
                                  f"cuda:{count - 1}", field="device")
    elif dev.type != "cpu":
        raise KernelpackError(f"{str(dev)!r}: kernelpack decodes on 'cpu' or 'cuda' devices only",
                              field="device")
    return dev


def get_ops(backend: str = "numpy", device: Any = "cpu") -> Ops:
    """The ops for a backend name: 'numpy', or 'torch' on ``device``."""
    if backend == "numpy":
        if str(device) != "cpu":
            raise KernelpackError(f"the numpy backend decodes on the CPU only; use the torch backend "
                                  f"for {device!r:.80}", field="device")
        return NumpyOps()
    if backend == "torch":
        return TorchOps(device)
    raise KernelpackError(f"unknown backend {backend!r:.80}: use 'numpy' or 'torch'", field="backend")
