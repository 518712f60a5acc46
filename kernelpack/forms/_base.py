"""What every stored form shares: stored arrays, header-field checks, the form interface.

A form is one module owning its fields, its encoder (a config dataclass whose
``encode`` takes a dense array) and its decoder (an :class:`Encoded` subclass).
Header fields are checked by ``check`` from the header alone, before any payload
is read or any memory is allocated; ``build`` then checks payload values.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from kernelpack._backend import NUMPY_DTYPES, Ops, bfloat16_bits_to_float32
from kernelpack.errors import KernelpackError

#: Dtypes in which a compressed form may store its numbers (float16 by default).
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
#: Hard limits (spec/FORMAT.md, "Limits").
MAX_RANK = 8
MAX_DIM = 1 << 31
MAX_ELEMENTS = 1 << 31


@dataclass(frozen=True)
class ArraySpec:
    """A stored array as the header describes it: spec dtype name and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * NUMPY_DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Stored:
    """A stored array: raw little-endian numpy data (bfloat16 as uint16 bits) and its spec dtype."""

    data: np.ndarray
    dtype: str

    @property
    def spec(self) -> ArraySpec:
        return ArraySpec(self.dtype, tuple(int(d) for d in self.data.shape))

    def values(self) -> np.ndarray:
        """The stored numbers as numpy (bfloat16 widened exactly to float32)."""
        return bfloat16_bits_to_float32(self.data) if self.dtype == "bfloat16" else self.data


def to_stored(values: Any, dtype: str) -> Stored:
    """Round ``values`` to a stored dtype; bfloat16 rounds half to even from float32."""
    if dtype == "bfloat16":
        bits = np.asarray(values, dtype=np.float32, order="C").view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x40)  # NaN stays NaN (rounding could carry)
        nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        return Stored(np.where(nan, quiet_nan, rounded).astype(np.uint16), dtype)
    if dtype not in NUMPY_DTYPES:
        raise KernelpackError(f"unknown dtype {dtype!r}", field="dtype")
    with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN is refused by need_finite
        return Stored(np.asarray(values, dtype=NUMPY_DTYPES[dtype], order="C"), dtype)


def float_dtype(dtype: str) -> str:
    """Validate an encoder's storage dtype for numbers."""
    if dtype not in FLOAT_DTYPES:
        raise KernelpackError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}", field="dtype")
    return dtype


# --- header checks (raise KernelpackError naming the field) -------------------------
def need(ok: bool, field: str, message: str) -> None:
    """Raise a field error unless ``ok``."""
    if not ok:
        raise KernelpackError(message, field=field)


MAX_NAME = 1024
#: Code points a name may not hold (spec/FORMAT.md, "Names"): C0 and C1 controls, DEL, the
#: line and paragraph separators, the bidirectional controls that make text display in
#: another order than it is stored, and lone surrogates. A fixed list, so that the rule
#: does not change with the Unicode version of the reader (str.isprintable() does).
FORBIDDEN_IN_NAMES = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
                                "\ud800-\udfff]")


def shown(value: Any, limit: int = 64) -> str:
    """A hostile header value for an error message: short, and never recursing into containers."""
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def need_name(value: Any, field: str) -> str:
    """Tensor, bank and attachment names: opaque keys, never paths (spec/FORMAT.md, "Names").

    1..MAX_NAME bytes of UTF-8, no forbidden code point, and no ``..`` between path
    separators, so that a tool that does write a name into a path cannot leave its folder.
    """
    ok = isinstance(value, str) and 1 <= len(value.encode("utf-8", "surrogatepass")) <= MAX_NAME
    if not ok:
        raise KernelpackError(f"{shown(value)} must be a string of 1..{MAX_NAME} bytes of UTF-8",
                              field=field)
    bad = FORBIDDEN_IN_NAMES.search(value)
    if bad is not None:
        raise KernelpackError(f"{shown(value)} holds the forbidden character U+{ord(bad.group()):04X}",
                              field=field)
    if ".." in value.replace("\\", "/").split("/"):
        raise KernelpackError(f"{shown(value)} has a '..' path segment", field=field)
    return value


def need_int(value: Any, field: str, low: int, high: int) -> int:
    """An int (not bool) in [low, high]."""
    need(isinstance(value, int) and not isinstance(value, bool), field,
         f"must be an integer, got {type(value).__name__}")
    need(low <= value <= high, field, f"must be in [{low}, {high}], got {value}")
    return value


def need_shape(value: Any, field: str, min_dim: int = 0) -> tuple[int, ...]:
    """A list of at most MAX_RANK dimensions with an element count within MAX_ELEMENTS."""
    need(isinstance(value, (list, tuple)), field, "must be a list of dimensions")
    need(len(value) <= MAX_RANK, field, f"rank {len(value)} exceeds the limit {MAX_RANK}")
    dims = tuple(need_int(d, field, min_dim, MAX_DIM) for d in value)
    count = 1
    for d in dims:  # overflow-safe: Python ints, checked at every step
        count *= d
        need(count <= MAX_ELEMENTS, field, f"element count exceeds the limit {MAX_ELEMENTS}")
    return dims


def need_array(arrays: Mapping[str, ArraySpec], name: str, dtypes: tuple[str, ...],
               shape: tuple[int, ...] | None = None) -> ArraySpec:
    """The stored array ``name`` exists, has one of ``dtypes`` and, if given, ``shape``."""
    field = f"arrays.{name}"
    need(name in arrays, field, "is missing")
    spec = arrays[name]
    need(spec.dtype in dtypes, field + ".dtype", f"must be one of {dtypes}, got {spec.dtype!r}")
    if shape is not None:
        need(spec.shape == tuple(shape), field + ".shape",
             f"must be {list(shape)}, got {list(spec.shape)}")
    return spec


def need_only(arrays: Mapping[str, Any], allowed: set[str]) -> None:
    """No stored arrays other than ``allowed``."""
    extra = sorted(set(arrays) - allowed)
    need(not extra, f"arrays.{extra[0]}" if extra else "arrays", "is not a field of this form")


def need_finite(stored: Stored, field: str) -> None:
    """Stored numbers of compressed forms are finite (no NaN or infinity)."""
    values = stored.data
    if stored.dtype == "bfloat16":
        finite = (values & 0x7F80) != 0x7F80
    else:
        finite = np.isfinite(values)
    need(bool(np.all(finite)), field, "holds a NaN or infinity")


class Encoded(ABC):
    """A tensor in a stored form: its fields, its stored arrays and its decode."""

    form: ClassVar[str]
    #: Scalar fields this form defines; a header field outside this set is unknown.
    FIELDS: ClassVar[frozenset[str]] = frozenset()
    shape: tuple[int, ...]

    @property
    def dtype(self) -> str:
        """The dtype of the decoded tensor: float32 for every compressed form."""
        return "float32"

    @abstractmethod
    def fields(self) -> dict[str, Any]:
        """Header fields other than arrays (msgpack-serialisable)."""

    @abstractmethod
    def arrays(self) -> dict[str, Stored]:
        """Stored arrays by field name."""

    @classmethod
    @abstractmethod
    def check(cls, shape: tuple[int, ...], dtype: str, fields: Mapping[str, Any],
              arrays: Mapping[str, ArraySpec], banks: Mapping[str, ArraySpec]) -> None:
        """Validate the header entry without reading payloads."""

    @classmethod
    def peak_elements(cls, shape: tuple[int, ...], fields: Mapping[str, Any],
                      arrays: Mapping[str, ArraySpec], banks: Mapping[str, ArraySpec]) -> int:
        """Elements of the largest array the decode holds at once, from the checked header alone.

        A reader compares it with its memory limit before it reads or allocates anything,
        so this must bound every array a decode makes: the decoded tensor, the stored arrays
        (and the tensor's bank), widened to float64. A form whose decode builds a larger
        intermediate (a table, a product) adds it.
        """
        return max([math.prod(shape), *(a.size for a in arrays.values()), *(b.size for b in banks.values())])

    @classmethod
    @abstractmethod
    def build(cls, shape: tuple[int, ...], dtype: str, fields: Mapping[str, Any],
              arrays: Mapping[str, Stored], banks: Mapping[str, Stored]) -> "Encoded":
        """The tensor from checked header fields and read payloads (checks values too)."""

    @abstractmethod
    def decode(self, ops: Ops) -> Any:
        """The canonical decode: a backend array of ``shape`` and ``dtype``."""

    def banks(self) -> dict[str, Stored]:
        """Shared arrays this tensor refers to (only the basis form has any)."""
        return {}
