"""What every stored form shares: stored arrays, header-field checks, the form interface.

A form is one module owning its fields, its encoder (a config dataclass whose
``encode`` takes a dense array) and its decoder (an :class:`Encoded` subclass).
Header fields are checked by ``check`` from the header alone, before any payload
is read or any memory is allocated; ``build`` then checks payload values.
"""

from __future__ import annotations

import math
import re
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np

from kernelpack import dq
from kernelpack._backend import NUMPY_DTYPES, Ops, bfloat16_bits_to_float32, has_nan, has_special
from kernelpack.errors import KernelpackError

#: Dtypes in which a compressed form may store its numbers (float16 by default).
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
#: Dtypes of quantised numbers (integer codes, since format 1.2) and the magnitude of their
#: most negative code: -128 and -32768 are valid codes, an encoder writes |q| below it.
CODE_DTYPES = {"int8": 1 << 7, "int16": 1 << 15}
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: The largest finite number of each storage dtype (bfloat16: bits 0x7F7F).
FINITE_MAX = {"float16": float(np.finfo(np.float16).max),
              "bfloat16": float(bfloat16_bits_to_float32(np.array([0x7F7F], np.uint16))[0]),
              "float32": FLOAT32_MAX}
#: Hard limits (spec/FORMAT.md, "Limits").
MAX_RANK = 8
MAX_DIM = 1 << 31
MAX_ELEMENTS = 1 << 31


@dataclass(frozen=True)
class ArraySpec:
    """A stored array as the header describes it: spec dtype name and shape."""

    dtype: str
    shape: tuple[int, ...]
    step: float | None = None  # quantised numbers: dtype holds integer codes
    dq: bool = False  # with a step: dependent quantisation (kernelpack.dq, key dq_step)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * NUMPY_DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Stored:
    """A stored array: raw little-endian numpy data (bfloat16 as uint16 bits), its spec dtype
    and, for quantised numbers, the step its integer codes are multiplied by (``dq``: their
    levels, kernelpack/dq.py)."""

    data: np.ndarray
    dtype: str
    step: float | None = None
    dq: bool = False

    @property
    def spec(self) -> ArraySpec:
        return ArraySpec(self.dtype, tuple(int(d) for d in self.data.shape), self.step, self.dq)

    def values(self) -> np.ndarray:
        """The stored numbers as numpy (bfloat16 widened exactly to float32, codes dequantised)."""
        if self.step is not None:
            return dq.dequantise(self.data, self.step) if self.dq else dequantise(self.data, self.step)
        return bfloat16_bits_to_float32(self.data) if self.dtype == "bfloat16" else self.data

    def rows(self, index: np.ndarray) -> "Stored":
        """The rows ``index`` (first axis) of this array of rank >= 2, as stored: its codes
        gathered, which keeps their values (dependent-quantised rows each restart the state
        machine, so a row's grids do not depend on the rows before it)."""
        return Stored(self.data[index], self.dtype, self.step, self.dq)

    def numbers(self) -> tuple[np.ndarray, str]:
        """What a decode hands its backend (``ops.float64(*stored.numbers())``): the payload as
        stored, or the float32 numbers quantised codes stand for, made here once with numpy so
        that every backend and device starts from the same bits."""
        return (self.values(), "float32") if self.step is not None else (self.data, self.dtype)


def dequantise(codes: np.ndarray, step: float) -> np.ndarray:
    """``float32(q) * float32(step)``: one IEEE binary32 product, rounded to nearest even, the
    same on every machine (int16 and int8 codes are exact in float32; the header check keeps
    every product finite)."""
    return np.multiply(codes, np.float32(step), dtype=np.float32)  # codes cast exactly, one pass


def as_step(value: Any, field: str = "step") -> float:
    """An encoder's step, rounded to the nearest float32 (the header holds float32 values)."""
    need(isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool), field,
         f"must be a number, got {shown(value)}")
    with np.errstate(over="ignore"):
        step = float(np.float32(value))
    need(math.isfinite(step) and step > 0 and step * CODE_DTYPES["int16"] <= FLOAT32_MAX, field,
         f"must be a finite float32 > 0 (and at most {FLOAT32_MAX / CODE_DTYPES['int16']:.3g}), got {value!r}")
    return step


def need_step(value: Any, dtype: str, field: str, levels: int = 1) -> float:
    """A header's ``step`` (``dq_step``: ``levels`` 2, a level is up to twice its code): a
    float, finite, > 0, exactly a float32, on int8/int16 codes whose every level times it is
    finite in float32 (so a decode never meets an infinity).

    Checked first and explained only on failure: a container has one per quantised array."""
    if (isinstance(value, float) and math.isfinite(value) and value > 0 and _is_float32(value)
            and dtype in CODE_DTYPES and value * CODE_DTYPES[dtype] * levels <= FLOAT32_MAX):
        return value
    need(isinstance(value, float), field, f"must be a float, got {shown(value)}")
    need(math.isfinite(value) and value > 0, field, f"must be finite and > 0, got {value!r}")
    need(_is_float32(value), field, f"must be exactly representable as float32, got {value!r}")
    need(dtype in CODE_DTYPES, field, f"needs integer codes (dtype {' or '.join(CODE_DTYPES)}), "
         f"the array is {shown(dtype)}")
    raise KernelpackError(f"{value!r} times the {dtype} {'level' if levels > 1 else 'code'} "
                          f"-{CODE_DTYPES[dtype] * levels} overflows float32", field=field)


def _is_float32(value: float) -> bool:
    """``value`` (finite) is exactly a float32: packing it as one and back gives it again."""
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0] == value
    except OverflowError:  # beyond the float32 range
        return False


def quantise(values: Any, step: float, rd: float | None = None, dependent: bool = False) -> Stored:
    """Integer codes ``q = round_half_even(values / step)``, int8 when every code is in
    [-127, 127], else int16; codes beyond [-32767, 32767] are an error (a larger step, or
    float storage, is needed). ``rd``: rate-distortion rounding (:func:`rd_round`).
    ``dependent``: dependent quantisation instead (kernelpack/dq.py), the codes chosen by
    its trellis search, ``rd`` its Lagrangian weight (None: dq.DEFAULT_LAMBDA)."""
    step = as_step(step)
    x = np.asarray(values, dtype=np.float64) / step
    need(bool(np.all(np.isfinite(x))), "values", "holds a NaN or infinity, which cannot be quantised")
    if dependent:
        peak = float(np.max(np.abs(x), initial=0.0))
        need(peak < 2 * (CODE_DTYPES["int16"] - 2) and step * 2 * CODE_DTYPES["int16"] <= FLOAT32_MAX, "step",
             f"step {step!r} does not fit these numbers in dependent quantisation: a level of {peak:.0f} "
             f"steps needs a code beyond int16, or twice the largest code overflows float32")
        codes = dq.choose(x, dq.DEFAULT_LAMBDA if rd is None else float(rd)).astype(np.float64)
    else:
        codes = np.rint(x)
        if rd:
            codes = rd_round(x, codes, rd)
    peak = float(np.max(np.abs(codes), initial=0.0))
    need(peak < CODE_DTYPES["int16"], "step", f"step {step!r} is too small for these numbers: a code of "
         f"{peak:.0f} does not fit int16 (|q| <= {CODE_DTYPES['int16'] - 1}); use a larger step")
    dtype = "int8" if peak < CODE_DTYPES["int8"] else "int16"
    return Stored(codes.astype(NUMPY_DTYPES[dtype]), dtype, step, dependent)


#: Passes of :func:`rd_round`: the code histogram it prices codes by settles within three.
RD_PASSES = 3
#: The price of a code no array of the previous pass held (bits): never cheaper than a known one.
RD_UNSEEN_BITS = 32.0


def rd_round(x: np.ndarray, nearest: np.ndarray, lam: float) -> np.ndarray:
    """Lagrangian rounding: each code ``q`` (round to nearest of ``x = value / step``) becomes
    ``q - sign(q)``, one step toward zero, where that lowers ``(x - q)**2 + lam * bits(q)``,
    ``bits(q) = -log2 p(q)`` under the order-0 histogram of the codes of the previous pass.

    Why: the entropy codecs (``rans``, ``rans-ctx``) spend about ``bits(q)`` on a code, and
    a code near a rounding boundary costs little error to move toward the peak of the
    distribution; the decode stays ``codes * step``. Only toward zero, so no code grows and
    the int8/int16 choice never widens. The order-0 price is the decision written down here
    (the context codec's classes would price more exactly and cost a model per pass):
    benchmarks/entropy.py measures what it saves at equal weight error. ``lam`` is in
    units of step squared per bit: the squared error a bit is worth."""
    codes = nearest
    toward = nearest - np.sign(nearest)
    for _ in range(RD_PASSES):
        values, counts = np.unique(codes, return_counts=True)
        bits = -np.log2(counts / counts.sum())
        moved = np.where(_price(toward, values, bits) * lam + np.square(x - toward)
                         < _price(nearest, values, bits) * lam + np.square(x - nearest), toward, nearest)
        if np.array_equal(moved, codes):
            break
        codes = moved
    return codes


def _price(codes: np.ndarray, values: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """``bits`` of each of ``codes`` among the sorted ``values``; RD_UNSEEN_BITS for others."""
    at = np.minimum(np.searchsorted(values, codes), len(values) - 1)
    return np.where(values[at] == codes, bits[at], RD_UNSEEN_BITS)


@dataclass(frozen=True)
class Quantisable:
    """Encoder settings every form shares: optional uniform quantisation of its stored numbers.

    ``step`` quantises every number array of the tensor with that absolute step (rounded to
    float32); ``rel_step`` gives each number array its own step, ``rel_step`` times the RMS
    of that array (1 if it is all zero), so every array's numbers carry a relative error of
    about ``rel_step / sqrt(12)`` whatever its units (weights, unit-norm bank filters, the
    dimensionless A of ``linear``). Neither: numbers are floats of the config's ``dtype``.
    ``rd`` (with a step): rate-distortion rounding of the codes (:func:`rd_round`), a code
    moved one step toward zero where that saves more bits than ``rd`` times the squared
    error it adds (in steps); smaller files at the same step, a little more error (what
    ``save`` reports). About 0.1 to 0.3 is where it pays; None or 0 rounds to nearest.
    ``dq`` (with a step): dependent quantisation (kernelpack/dq.py, format 1.7): each
    number is a level ``2q`` or ``2q - sgn(q)`` of the step, by a state machine over the
    codes, and a trellis search chooses the codes. Each grid's levels are two steps apart, so
    the weight error of uniform codes at step s is reached near step 0.56 s, in 1-3.5% fewer
    bytes on the suite's real models (benchmarks/entropy.py), at the cost of a search at
    pack time. ``rd`` is then the search's Lagrangian weight (default 0.5, kernelpack/dq.py;
    0: least squared error).
    Keyword-only, so the forms' positional settings keep their order.
    """

    step: float | None = field(default=None, kw_only=True)
    rel_step: float | None = field(default=None, kw_only=True)
    rd: float | None = field(default=None, kw_only=True)
    dq: bool = field(default=False, kw_only=True)

    @property
    def quantised(self) -> bool:
        return self.step is not None or self.rel_step is not None

    @property
    def code_choice(self) -> tuple[str, str] | None:
        """(field, what) of the setting that chooses codes at pack time from the whole array,
        ``dq`` or ``rd``, or None (codes rounded to nearest): what error feedback and training,
        which choose or round codes themselves, refuse."""
        if self.dq:
            return "dq", "dependent quantisation (a trellis search)"
        if self.rd:
            return "rd", "rate-distortion rounding"
        return None

    def step_for(self, values: Any) -> float | None:
        """The step this config quantises ``values`` with (None: not quantised)."""
        if self.rel_step is None:
            return None if self.step is None else as_step(self.step)
        need(self.step is None, "rel_step", "give step or rel_step, not both")
        need(isinstance(self.rel_step, (int, float)) and 0 < self.rel_step < math.inf, "rel_step",
             f"must be a number > 0, got {shown(self.rel_step)}")
        x = np.asarray(values, dtype=np.float64)
        rms = math.sqrt(float(np.mean(np.square(x)))) if x.size else 0.0
        return as_step(self.rel_step * (rms if rms > 0 else 1.0), "rel_step")

    def check_choice(self, step: float | None) -> None:
        """Refuse an ``rd`` that is not a number >= 0, a ``dq`` that is not a bool, or either without a
        step to choose codes for."""
        if self.rd is not None:
            need(isinstance(self.rd, (int, float)) and not isinstance(self.rd, bool) and 0 <= self.rd < math.inf,
                 "rd", f"must be a number >= 0, got {shown(self.rd)}")
            need(step is not None, "rd", "rate-distortion rounding chooses codes: give step or rel_step with it")
        need(isinstance(self.dq, bool), "dq", f"must be True or False, got {shown(self.dq)}")
        need(step is not None or not self.dq, "dq", "dependent quantisation chooses codes: give step or rel_step "
             "with it")

    def store(self, values: Any) -> Stored:
        """Numbers as this config stores them: quantised, else rounded to its float ``dtype``."""
        step = self.step_for(values)
        self.check_choice(step)
        if step is None:
            return to_stored(values, float_dtype(getattr(self, "dtype")))  # every config has a dtype
        return quantise(values, step, self.rd, self.dq)


def to_stored(values: Any, dtype: str) -> Stored:
    """Round ``values`` to a stored dtype (spec/FORMAT.md section 3, "Narrowing"): to nearest
    even, bfloat16 from float32; a NaN narrows to a quiet NaN keeping its sign and top payload
    bits. A finite number that would round to infinity is refused (field ``dtype``): that is
    data lost, and the caller asked for this dtype's size, so nothing else is stored instead."""
    if dtype == "bfloat16":
        with np.errstate(over="ignore"):  # float64 beyond float32's range: refused below
            bits = np.asarray(values, dtype=np.float32, order="C").view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x40)  # NaN stays NaN (rounding could carry)
        nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        stored = Stored(np.where(nan, quiet_nan, rounded).astype(np.uint16), dtype)
    elif dtype in NUMPY_DTYPES:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused below
            stored = Stored(np.asarray(values, dtype=NUMPY_DTYPES[dtype], order="C"), dtype)
        if dtype == "float16":
            _quiet_float16_nans(values, stored.data)
    else:
        raise KernelpackError(f"unknown dtype {dtype!r}", field="dtype")
    if dtype in FLOAT_DTYPES and has_special(stored.data, stored.dtype):
        need_no_overflow(values, stored)
    return stored


def _quiet_float16_nans(values: Any, out: np.ndarray) -> None:
    """Write the NaN lanes of a float16 narrowing as the spec says, ``sign | 0x7E00 | top 9
    payload bits``, whatever the cast did (numpy keeps a signalling NaN signalling, hardware
    conversions quiet it): only when the float16 result holds a NaN."""
    if not has_nan(out, "float16"):
        return
    with np.errstate(over="ignore"):
        source = np.asarray(values, dtype=np.float32, order="C").view(np.uint32)
    nan = (source & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    bits = source[nan]
    out.view(np.uint16)[nan] = (((bits >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7E00)
                                | ((bits >> np.uint32(13)) & np.uint32(0x1FF))).astype(np.uint16)


def need_no_overflow(values: Any, stored: Stored) -> None:
    """Refuse a finite number that narrowing to ``stored.dtype`` turned into an infinity (an
    infinity or NaN in ``values`` is stored as it is: nothing is lost)."""
    source = np.asarray(values)
    finite = np.isfinite(source)
    overflowed = np.isinf(stored.values()) & finite
    if not np.any(overflowed):
        return
    largest = float(np.max(np.abs(source[finite])))
    advice = "scale the tensor" if stored.dtype == "float32" else "use dtype=float32 or scale the tensor"
    raise KernelpackError(f"the largest magnitude to store as {stored.dtype}, {largest:.9g}, is beyond its "
                          f"largest finite number {FINITE_MAX[stored.dtype]:.9g} and would become infinity; "
                          f"{advice}", field="dtype")


def float_dtype(dtype: str) -> str:
    """Validate an encoder's storage dtype for numbers."""
    if dtype not in FLOAT_DTYPES:
        raise KernelpackError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}", field="dtype")
    return dtype


def encoder_input(array: Any, form: str, *, rank: int = 0, fits: bool = True, field: str = "values") -> np.ndarray:
    """The array an encoder is given (the tensor, or a caller's bank: ``field``), as numpy,
    checked before any work, so that a bad one is a KernelpackError naming the field rather
    than a numpy or scipy error from inside a fit, or a file no reader accepts.

    Every form takes real numbers (bool, integer or floating; not object, string or complex)
    of rank >= ``rank``. A form that ``fits`` numbers (all but dense) also needs at least one
    number and only finite ones: a transform or least-squares fit spreads one NaN or infinity
    over every number it makes, whereas dense stores them exactly. Rank and emptiness errors
    name the tensor's ``shape`` (or the bank's own field)."""
    try:
        x = np.asarray(array)
    except (TypeError, ValueError) as exc:  # ragged lists, objects whose __array__ fails
        raise KernelpackError(f"the {form} form encodes an array of numbers, got {shown(array)}: {exc}",
                              field=field) from None
    if x.dtype.kind not in "biuf":
        got = f"an array of dtype {x.dtype}" if isinstance(array, np.ndarray) else f"{shown(array)} (dtype {x.dtype})"
        raise KernelpackError(f"the {form} form encodes real numbers (bool, integer or floating), got {got}",
                              field=field)
    shape_field = "shape" if field == "values" else field
    need(x.ndim >= rank and (x.size >= 1 or not fits), shape_field,
         f"the {form} form needs {'a non-empty' if fits else 'a'} tensor of rank >= {rank}, got shape {list(x.shape)}")
    if fits and x.dtype.kind == "f":
        dense = "; the dense form stores them exactly" if field == "values" else ""
        need(bool(np.isfinite(x).all()), field, f"holds a NaN or infinity, which the {form} form cannot fit{dense}")
    return x


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


def key_shown(key: Any) -> str:
    """A header key as part of an error's ``field`` (``fields.K``, ``arrays.K``): as it is when it
    is a string of at most 64 characters with no code point a name may not hold, else escaped
    by :func:`shown`, so that a hostile key never carries a newline or a bidirectional control
    into a log line."""
    if isinstance(key, str) and len(key) <= 64 and FORBIDDEN_IN_NAMES.search(key) is None:
        return key
    return shown(key)


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
    if type(value) is int and low <= value <= high:  # the common case: no message formatted
        return value
    need(isinstance(value, int) and not isinstance(value, bool), field,
         f"must be an integer, got {type(value).__name__}")
    need(low <= value <= high, field, f"must be in [{low}, {high}], got {value}")
    return value


def need_shape(value: Any, field: str, min_dim: int = 0) -> tuple[int, ...]:
    """A list of at most MAX_RANK dimensions with an element count within MAX_ELEMENTS."""
    if _plain_shape(value, min_dim):
        return tuple(value)
    need(isinstance(value, (list, tuple)), field, "must be a list of dimensions")
    need(len(value) <= MAX_RANK, field, f"rank {len(value)} exceeds the limit {MAX_RANK}")
    dims = tuple(need_int(d, field, min_dim, MAX_DIM) for d in value)
    count = 1
    for d in dims:  # overflow-safe: Python ints, checked at every step
        count *= d
        need(count <= MAX_ELEMENTS, field, f"element count exceeds the limit {MAX_ELEMENTS}")
    return dims


_INT = frozenset({int})


def _plain_shape(value: Any, min_dim: int) -> bool:
    """The common valid shape, checked in a few C-speed calls: a list of at most MAX_RANK
    plain ints, each in [max(1, min_dim), MAX_DIM], whose product is within MAX_ELEMENTS (no
    dimension is 0, so every partial product is within it too). need_shape checks anything
    else one dimension at a time, and says what is wrong."""
    return (type(value) is list and len(value) <= MAX_RANK
            and _INT.issuperset(map(type, value))
            and (not value or (min(value) >= max(1, min_dim) and max(value) <= MAX_DIM))
            and math.prod(value) <= MAX_ELEMENTS)


def need_array(arrays: Mapping[str, ArraySpec], name: str, dtypes: tuple[str, ...],
               shape: tuple[int, ...] | None = None, numbers: bool = False) -> ArraySpec:
    """The stored array ``name`` exists, has one of ``dtypes`` (or, for ``numbers``, is
    quantised: integer codes and a step) and, if given, ``shape``."""
    field = f"arrays.{name}"
    need(name in arrays, field, "is missing")
    spec = arrays[name]
    need_dtype(spec, field, dtypes, numbers)
    if shape is not None and spec.shape != tuple(shape):
        raise KernelpackError(f"must be {list(shape)}, got {list(spec.shape)}", field=field + ".shape")
    return spec


def need_dtype(spec: ArraySpec, field: str, dtypes: tuple[str, ...], numbers: bool) -> None:
    """A stored array's dtype is one of ``dtypes``, unless it holds quantised numbers: integer
    codes and a valid step. Only arrays of numbers may be quantised (never an index)."""
    if spec.step is None:
        if spec.dtype not in dtypes:  # the message (every dtype) formatted only on failure
            codes = " (int8 and int16 only with a step)" if numbers else ""
            raise KernelpackError(f"must be one of {dtypes}{codes}, got {spec.dtype!r}", field=field + ".dtype")
    else:
        key = field + (".dq_step" if spec.dq else ".step")
        need(numbers, key, "only arrays of numbers may be quantised")
        need_step(spec.step, spec.dtype, key, 2 if spec.dq else 1)


def need_only(arrays: Mapping[str, Any], allowed: set[str]) -> None:
    """No stored arrays other than ``allowed``."""
    if not allowed.issuperset(arrays):
        raise KernelpackError("is not a field of this form",
                              field=f"arrays.{key_shown(sorted(set(arrays) - allowed)[0])}")


def need_finite(stored: Stored, field: str) -> None:
    """Stored numbers of compressed forms are finite (no NaN or infinity; quantised numbers are,
    by the header check of their step)."""
    if stored.step is None:
        need(not has_special(stored.data, stored.dtype), field, "holds a NaN or infinity")


#: Arrays a decode holds at once, at most, as multiples of its largest array at 8 bytes per
#: element (measured with tracemalloc, tests/test_limits.py: up to 4.6 for a full-boundary
#: dct, 1.5 for dense float32 with its payload copy).
PEAK_FACTOR = 5
#: Live copies of a table block while it is built, rounded and multiplied (float64 or int64).
TABLE_COPIES = 4
#: The work unit is one float64 multiply-add of a matrix product (about 0.05 ns on one core
#: with BLAS). Measured against it on one core (benchmarks/FUZZ.md, "Work"): an element read,
#: inflated, widened, rounded onto a grid and written costs up to 16, a table entry built
#: (integer index arithmetic, a gather, the scaling, the rounding) up to 128.
ELEMENT_WORK = 16
TABLE_ENTRY_WORK = 128


@dataclass(frozen=True)
class Cost:
    """One decode's cost from its header: ``largest`` (elements of its largest array, the
    per-array memory limit's measure), ``peak_bytes`` (every array it holds at once, the
    total memory limit's measure) and ``work`` (operations: multiply-adds of its products,
    weighted table entries, elements read and written; the work limit's measure)."""

    largest: int
    peak_bytes: int
    work: int
    #: Entries (K x N) of the largest right operand of its products, 0 without products: a
    #: load with a product BLAS would spread over its own threads holds BLAS to one thread
    #: (kernelpack._backend.blas_threaded, kernelpack._parallel.blas_limit_for).
    product: int = 0

    @classmethod
    def of(cls, largest: int, work: int, table_block: int = 0, product: int = 0) -> "Cost":
        """A cost whose peak is PEAK_FACTOR copies of the largest array plus the table block
        being built, all at 8 bytes per element."""
        return cls(max(largest, table_block), 8 * (PEAK_FACTOR * largest + TABLE_COPIES * table_block), work,
                   product)


def read_work(arrays: Mapping[str, ArraySpec]) -> int:
    """Work to check, inflate and widen the stored arrays."""
    return ELEMENT_WORK * sum(a.size for a in arrays.values())


class Encoded(ABC):
    """A tensor in a stored form: its fields, its stored arrays and its decode."""

    form: ClassVar[str]
    #: Scalar fields this form defines; a header field outside this set is unknown.
    FIELDS: ClassVar[frozenset[str]] = frozenset()
    #: Stored arrays that hold indices, not numbers (shown apart from the number dtype).
    INDEX_ARRAYS: ClassVar[frozenset[str]] = frozenset()
    #: The form decodes to the dtype its header names (dense); every other form to float32.
    ANY_DTYPE: ClassVar[bool] = False
    shape: tuple[int, ...]

    @classmethod
    def bank_of(cls, fields: Mapping[str, Any]) -> str | None:
        """The name of the shared bank a tensor of this form reads (its header's ``fields``),
        or None: so the reader fetches and accounts banks without knowing which form has one."""
        return None

    @classmethod
    def describe(cls, fields: Mapping[str, Any], arrays: Mapping[str, ArraySpec]) -> list[str]:
        """Settings that the header holds in array shapes rather than fields, as ``key=value``
        strings for listings (``kernelpack inspect``); none by default."""
        return []

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
    def cost(cls, shape: tuple[int, ...], fields: Mapping[str, Any],
             arrays: Mapping[str, ArraySpec], banks: Mapping[str, ArraySpec]) -> "Cost":
        """What decoding this tensor costs, from the checked header alone (spec/FORMAT.md,
        section 5, "Work and memory"): a reader compares it with its limits before it
        reads or allocates anything, so it must bound every array the decode makes and
        every operation it runs. This default is for forms without a reduction (dense,
        basis): the decoded tensor and the stored arrays, each element touched a few times.
        A form that builds tables or products overrides it.
        """
        largest = max([math.prod(shape), *(a.size for a in arrays.values())])
        return Cost.of(largest, work=read_work(arrays) + 2 * ELEMENT_WORK * math.prod(shape))

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
