"""Codec ``rans`` (format 1.3, spec/FORMAT.md section 2.1): integer arrays (int8, int16, uint8,
uint16) coded by interleaved rANS with one static probability table per array.

Why a table per array rather than zstd over byte planes: zstd codes literals with Huffman
codes of whole bits, re-fitted per block, and knows nothing of the values' order; quantised
weights have a peaked, smooth distribution whose entropy is fractional bits per code. A
static table fitted to the array, quantised to ``2^n`` and stored in the payload, takes
two passes (count, then code) and meets the order-0 entropy to within the table's cost.

Why interleaved lanes: element ``i`` belongs to lane ``i mod N``; one decode step decodes
one element of every lane with a few numpy operations on ``N`` states at once, so the
Python loop runs ``ceil(count / N)`` times, not ``count`` times. The lanes share one word
stream, read in lane order within a step (a prefix of the lanes that need a word), so no
per-lane lengths are stored.

The format is defined by spec/FORMAT.md alone; this module is its reference implementation.
The encoder's choices (table precision, escape threshold, lane count) are stored in the
payload, so they are encoder policy, not format.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import numpy as np

from kernelpack.errors import KernelpackError

#: The dtypes the codec takes: integers of one or two bytes (codes, indices).
DTYPES = frozenset({"int8", "int16", "uint8", "uint16"})
#: Lower bound of the coder state: a state is in [STATE_LOW, 2^32) between steps.
STATE_LOW = 1 << 16
#: Table precision: the frequencies sum to 2^n, 1 <= n <= MAX_PRECISION.
MAX_PRECISION = 15
#: Longest varint (LEB128) in a payload: values below 2^35 (each is then range-checked).
MAX_VARINT = 5
#: Encoder policy: about this many elements per lane (4 bytes of final state per lane, so
#: 32 / LANE_ELEMENTS bits per code of overhead), at most MAX_LANES lanes.
LANE_ELEMENTS = 1024
MAX_LANES = 4096


class _Malformed(Exception):
    """A payload that does not follow the spec; the public decoders make it a KernelpackError
    naming their codec."""


def _bad(message: str) -> _Malformed:
    return _Malformed(message)


def _refused(codec: str, decoder: Callable[[bytes, np.dtype, int], np.ndarray]
             ) -> Callable[[bytes, np.dtype, int], np.ndarray]:
    """``decoder`` raising KernelpackError("bad CODEC payload: ...") for a malformed payload."""
    @functools.wraps(decoder)
    def decode(body: bytes, dtype: np.dtype, count: int) -> np.ndarray:
        try:
            return decoder(body, dtype, count)
        except _Malformed as exc:
            raise KernelpackError(f"bad {codec} payload: {exc}") from None
    return decode


# --- symbols ----------------------------------------------------------------------------
def to_unsigned(values: np.ndarray) -> np.ndarray:
    """Signed elements zigzag-mapped to the unsigned integers of their width (0, -1, 1, -2 ->
    0, 1, 2, 3), as in ``zstd-shuffle``; unsigned elements as they are."""
    if values.dtype.kind == "i":
        bits = 8 * values.dtype.itemsize
        values = ((values << 1) ^ (values >> (bits - 1))).astype(values.dtype, copy=False)
    return values.view(f"<u{values.dtype.itemsize}")


def from_unsigned(u: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The inverse of ``to_unsigned``: ``(u >> 1) ^ -(u & 1)`` for a signed dtype."""
    if dtype.kind == "i":
        one = u.dtype.type(1)
        u = (u >> one) ^ (u.dtype.type(0) - (u & one))
    return u.view(dtype)


@functools.cache
def _jit() -> Any:
    """The compiled loops (kernelpack/_rans_jit.py) if numba is installed, else None (the numpy
    loops here, the reference). Imported on first use only: numba takes about 0.3 s to load."""
    try:
        from kernelpack import _rans_jit
    except ImportError:
        return None
    return _rans_jit


# --- varints ------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class _Reader:
    """Reads a payload front to back; every read names the payload field it is for."""

    def __init__(self, body: bytes) -> None:
        self.body, self.pos = body, 0

    def take(self, size: int, field: str) -> bytes:
        if self.pos + size > len(self.body):
            raise _bad(f"{field}: needs {size} bytes at offset {self.pos}, the payload has {len(self.body)}")
        chunk = self.body[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def varint(self, field: str, low: int, high: int) -> int:
        value = 0
        for i in range(MAX_VARINT):
            byte = self.take(1, field)[0]
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if byte == 0 and i > 0:
                    raise _bad(f"{field}: varint not in its shortest form")
                if not low <= value <= high:
                    raise _bad(f"{field}: {value} is not in [{low}, {high}]")
                return value
        raise _bad(f"{field}: varint longer than {MAX_VARINT} bytes")


# --- the table ----------------------------------------------------------------------------
def quantise(counts: np.ndarray, precision: int) -> np.ndarray:
    """Frequencies summing to exactly 2^precision (encoder rule, FORMAT.md 2.1): each present
    symbol ``max(1, floor(c * M / total))``; a surplus goes to the most frequent symbol (the
    first of ties); a deficit is taken one by one from the symbols in order of decreasing
    frequency (ties: ascending symbol), never below 1, pass after pass."""
    total, m = int(counts.sum()), 1 << precision
    freq = np.where(counts > 0, np.maximum(1, counts.astype(np.int64) * m // total), 0)
    deficit = int(freq.sum()) - m
    if deficit < 0:
        freq[int(np.argmax(counts))] -= deficit
    while deficit > 0:
        order = np.argsort(-freq, kind="stable")
        order = order[freq[order] > 1][:deficit]
        freq[order] -= 1
        deficit -= len(order)
    return freq


def _table_bytes(freq: np.ndarray) -> bytes:
    """Frequencies as varints, each run of zeros as ``0`` then (run length - 1)."""
    out, i, k = bytearray(), 0, len(freq)
    nonzero = np.flatnonzero(freq)
    for j in nonzero.tolist() + [k]:
        if j > i:
            out += b"\0" + _varint(j - i - 1)
        if j < k:
            out += _varint(int(freq[j]))
        i = j + 1
    return bytes(out)


def _read_tables(reader: _Reader, classes: int, size: int, m: int) -> np.ndarray:
    """``classes`` frequency tables of ``size`` symbols summing to ``m``, as the rows of an
    int64 array (compiled when numba is installed; on any refusal, or without numba, this
    reader reads the bytes again and names what is wrong)."""
    jit = _jit()
    if jit is not None:
        freq = np.zeros((classes, size), dtype=np.int64)
        end = jit.tables_loop(np.frombuffer(reader.body, np.uint8), reader.pos, m, freq)
        if end >= 0:
            reader.pos = end
            return freq
    return np.array([_read_table(reader, size, m) for _ in range(classes)])


def _read_table(reader: _Reader, size: int, m: int) -> np.ndarray:
    freq = np.zeros(size, dtype=np.int64)
    i = 0
    while i < size:
        value = reader.varint("table", 0, m)
        if value:
            freq[i], i = value, i + 1
        else:
            run = reader.varint("table", 0, size - i - 1) + 1
            i += run
    total = int(freq.sum())
    if total != m:
        raise _bad(f"table: frequencies sum to {total}, not 2^{m.bit_length() - 1}")
    return freq


# --- encoder ------------------------------------------------------------------------------
def _coded_bits(counts: np.ndarray) -> np.ndarray:
    """-sum c log2 c over the first K symbols, for every K (the order-0 code length's part)."""
    c = counts.astype(np.float64)
    return np.concatenate([[0.0], np.cumsum(np.where(c > 0, c * np.log2(np.maximum(c, 1)), 0.0))])


def _direct_symbols(counts: np.ndarray, itemsize: int) -> int:
    """K, the number of values coded directly (the others escape, each stored raw): the K of
    least estimated size, a symbol's table entry taken as 1.5 bytes (encoder policy)."""
    total = float(counts.sum())
    clog = _coded_bits(counts)
    present = np.concatenate([[0], np.cumsum(counts > 0)])
    escaped = total - np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)
    ks = np.arange(1, min(len(counts), (1 << (8 * itemsize)) - 1) + 1)  # symbol K must fit the dtype
    e = escaped[ks]
    bits = (total * math.log2(total) - clog[ks] - np.where(e > 0, e * np.log2(np.maximum(e, 1)), 0.0)
            + 8 * itemsize * e + 12 * (present[ks] + 1))
    bits[present[ks] + 1 > 1 << MAX_PRECISION] = np.inf
    return int(ks[int(np.argmin(bits))])


def _lanes(count: int) -> int:
    return max(1, min(MAX_LANES, count // LANE_ELEMENTS))


def encode(values: np.ndarray) -> bytes:
    """The ``rans`` payload of a non-empty int8/int16/uint8/uint16 array (C order)."""
    flat = np.ascontiguousarray(values).reshape(-1)
    u = to_unsigned(flat).astype(np.int64)
    counts = np.bincount(u)
    k = _direct_symbols(counts, flat.dtype.itemsize)
    escapes = u >= k
    sym = np.where(escapes, k, u)
    folded = np.bincount(sym, minlength=k + 1)
    present = int(np.count_nonzero(folded))
    best: tuple[float, int, np.ndarray] | None = None
    for precision in range(max(1, (present - 1).bit_length()), MAX_PRECISION + 1):
        freq = quantise(folded, precision)
        used = folded > 0
        size = 8 * len(_table_bytes(freq)) + float(np.sum(folded[used] * (precision - np.log2(freq[used]))))
        if best is None or size < best[0]:
            best = (size, precision, freq)
    assert best is not None
    _, precision, freq = best
    lanes = _lanes(len(sym))
    cum = np.concatenate([[0], np.cumsum(freq)[:-1]])
    states, words = _code(freq[sym], cum[sym], precision, lanes)
    head = (bytes([precision]) + _varint(k) + _varint(lanes) + _varint(int(escapes.sum()))
            + _table_bytes(freq))
    raw_escapes = u[escapes].astype(f"<u{flat.dtype.itemsize}").tobytes()
    return head + states.astype("<u4").tobytes() + raw_escapes + words.astype("<u2").tobytes()


def _code(freq: np.ndarray, cum: np.ndarray, precision: int, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """rANS over ``lanes`` interleaved states, last element first, element ``i`` coded with
    frequency ``freq[i]`` at cumulative frequency ``cum[i]`` (of its symbol in its table):
    the decoder's initial states and its word stream (words in the order it reads them)."""
    freq, cum = freq.astype(np.uint64), cum.astype(np.uint64)
    x = np.full(lanes, STATE_LOW, dtype=np.uint64)
    jit = _jit()
    if jit is not None:
        emitted = np.empty(len(freq), dtype=np.uint64)  # at most one word per element
        n = jit.encode_loop(freq, cum, precision, lanes, x, emitted)
        return x, emitted[:n][::-1]
    chunks = []
    count = len(freq)
    for start in range(((count - 1) // lanes) * lanes, -1, -lanes):
        f, c = freq[start:start + lanes], cum[start:start + lanes]
        r = len(f)
        xs = x[:r]
        big = xs >= f << np.uint64(32 - precision)
        if big.any():
            chunks.append((xs[big] & np.uint64(0xFFFF))[::-1])
            xs = np.where(big, xs >> np.uint64(16), xs)
        x[:r] = ((xs // f) << np.uint64(precision)) + xs % f + c
    words = np.concatenate(chunks)[::-1] if chunks else np.zeros(0, np.uint64)
    return x, words


# --- decoder ------------------------------------------------------------------------------
@functools.partial(_refused, "rans")
def decode(body: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    """The ``count`` elements of a ``rans`` payload, by FORMAT.md 2.1; any payload that does
    not follow it is a KernelpackError naming the payload field. Work and memory are bounded
    by ``count``, the payload's length and 2^15 (the table)."""
    itemsize = dtype.itemsize
    unsigned = np.dtype(f"<u{itemsize}")
    reader = _Reader(body)
    precision = reader.take(1, "precision")[0]
    if not 1 <= precision <= MAX_PRECISION:
        raise _bad(f"precision: {precision} is not in [1, {MAX_PRECISION}]")
    m = 1 << precision
    k = reader.varint("symbols", 0, (1 << (8 * itemsize)) - 1)
    lanes = reader.varint("lanes", 1, count)
    n_escapes = reader.varint("escapes", 0, count)
    freq = _read_tables(reader, 1, k + 1, m)
    states = np.frombuffer(reader.take(4 * lanes, "states"), dtype="<u4").astype(np.uint32)
    if np.count_nonzero(states < STATE_LOW):  # np.any costs several times a count here
        raise _bad(f"states: a state below 2^16 (lane {int(np.argmax(states < STATE_LOW))})")
    escape_values = np.frombuffer(reader.take(itemsize * n_escapes, "escape values"), dtype=unsigned)
    if np.count_nonzero(escape_values < k):
        raise _bad(f"escape values: a value below the {k} symbols coded directly")
    # every symbol, k included, fits the dtype and is a value of its own
    out = _run(_Stream(body, reader.pos, 0, 0), freq, precision, ALL_DIRECT, 0, states, count, unsigned)

    escaped = np.flatnonzero(out == k)
    if len(escaped) != n_escapes:
        raise _bad(f"escapes: {n_escapes} declared, {len(escaped)} decoded")
    if n_escapes:
        out[escaped] = escape_values
    return from_unsigned(out, dtype)


#: The token split under which every 16-bit symbol is a value of its own (``rans``: no raw bits).
ALL_DIRECT = 16


class _Stream(NamedTuple):
    """Where the coded parts of a payload lie: the payload, its words from ``words_at`` to the
    end, its raw bits (``rans-ctx``) in ``extra_size`` bytes from ``extra_at``."""

    body: bytes | memoryview
    words_at: int
    extra_at: int
    extra_size: int


def _run(stream: _Stream, tables: np.ndarray, precision: int, split: int, msb: int, states: np.ndarray,
         count: int, sym_dtype: np.dtype, row_class: np.ndarray | None = None, row_length: int = 1,
         dtype: np.dtype | None = None) -> np.ndarray:
    """The decode and its checks: the ``count`` tokens of the rANS stream made values
    (``split``, ``msb``: FORMAT.md 2.3; ALL_DIRECT makes every symbol its own value), in
    ``sym_dtype``, or mapped back to ``dtype`` (``from_unsigned``) if given. Element ``i``
    reads the table (row of ``tables``) ``row_class[i // row_length]`` (the only one if
    ``row_class`` is None). Compiled when numba is installed (one pass, the zigzag in it),
    else ``_numpy_run``: the same arithmetic, the same results and errors."""
    words = len(stream.body) - stream.words_at
    if words % 2:
        raise _bad(f"words: {words} bytes, not a whole number of 16-bit words")
    if row_class is None:
        row_class, row_length = np.zeros(1, dtype=np.uint32), count
    out = np.empty(count, dtype=sym_dtype)
    jit = _jit()
    if jit is not None:
        signed = dtype is not None and dtype.kind == "i"
        p, pos = jit.decode_loop(np.frombuffer(stream.body, np.uint8), stream.words_at, stream.extra_at,
                                 stream.extra_size, tables, precision, split, msb, states, row_class, row_length,
                                 signed, out)
    else:
        p, pos = _numpy_run(stream, tables, precision, split, msb, states, row_class, row_length, out)
    available, lanes = words // 2, len(states)
    if p < 0:
        raise _bad(f"words: the stream ends after {available} words, "
                   f"element {(-1 - p) // lanes * lanes} needs more")
    if p != available:
        raise _bad(f"words: {available - p} of {available} words left over")
    if np.count_nonzero(states != STATE_LOW):
        raise _bad(f"states: lane {int(np.argmax(states != STATE_LOW))} does not end in the state 2^16")
    _check_extra(stream, pos)
    if dtype is None:
        return out
    return out.view(dtype) if jit is not None else from_unsigned(out, dtype)


def _check_extra(stream: _Stream, pos: int) -> None:
    """The checks of the raw bits field, ``pos`` bits of which were read (``-1 - i``: element
    ``i``'s run past its end)."""
    size = stream.extra_size
    if pos < 0:
        raise _bad(f"extra: {size} bytes end inside the raw bits of element {-1 - pos}")
    if size != -(-pos // 8):
        raise _bad(f"extra: {size} bytes, the values use {pos} bits")
    if pos % 8 and stream.body[stream.extra_at + size - 1] >> (pos % 8):
        raise _bad("extra: the bits after the last value are not zero")


def _numpy_run(stream: _Stream, tables: np.ndarray, precision: int, split: int, msb: int, x: np.ndarray,
               row_class: np.ndarray, row_length: int, out: np.ndarray) -> tuple[int, int]:
    """kernelpack/_rans_jit.py ``decode_loop`` in numpy, but for the zigzag: the slot tables,
    ``_numpy_loop`` (tokens), ``_numpy_values`` (values). Returns (words read, raw bits read)
    as ``decode_loop`` does."""
    m = 1 << precision
    symbol = np.concatenate([np.repeat(np.arange(len(f), dtype=out.dtype), f) for f in tables])
    cum = np.concatenate([np.repeat(np.concatenate([[0], np.cumsum(f)[:-1]]), f) for f in tables])
    slot_freq = np.concatenate([np.repeat(f, f) for f in tables]).astype(np.uint32)
    slot_bias = (np.arange(m * len(tables)) % m - cum).astype(np.uint32)  # slot - cum[symbol]
    words = np.frombuffer(stream.body, dtype="<u2", offset=stream.words_at).astype(np.uint32)
    p = _numpy_loop(x, words, symbol, slot_freq, slot_bias, precision, row_class, row_length, out)
    if p < 0:
        return p, 0
    extra = bytes(stream.body[stream.extra_at:stream.extra_at + stream.extra_size])
    return p, _numpy_values(out, _padded(extra), len(extra), split, msb)


def _numpy_loop(x: np.ndarray, words: np.ndarray, symbol: np.ndarray, slot_freq: np.ndarray,
                slot_bias: np.ndarray, precision: int, row_class: np.ndarray, row_length: int,
                out: np.ndarray) -> int:
    """The rANS loop in numpy (tokens into ``out``): one step decodes one element of every lane
    still running. Returns the words read, or ``-1 - i`` for the first element ``i`` of a step
    that needed a word after the last one; the states ``x`` are updated in place."""
    m = 1 << precision
    mask, shift, low = np.uint32(m - 1), np.uint32(precision), np.uint32(STATE_LOW)
    sixteen = np.uint32(16)
    count, lanes = len(out), len(x)
    lane = np.arange(lanes)
    p, available = 0, len(words)
    for start in range(0, count, lanes):
        r = min(lanes, count - start)
        xs = x[:r]
        slot = (xs & mask) + row_class[(start + lane[:r]) // row_length] * np.uint32(m)
        out[start:start + r] = symbol[slot]
        xs = slot_freq[slot] * (xs >> shift) + slot_bias[slot]
        need = xs < low
        n = int(np.count_nonzero(need))
        if n:
            if p + n > available:
                return -1 - start
            xs[need] = (xs[need] << sixteen) | words[p:p + n]
            p += n
        x[:r] = xs
    return p


# --- rans-ctx: hybrid-integer tokens, a table per row class (format 1.5) -------------------
#: Largest ``split``: values below 2^split are tokens of their own (bounds the tables).
MAX_SPLIT = 12
#: Largest number of row classes (tables).
MAX_CLASSES = 16
#: Encoder policy: the (split, msb) pairs tried, and the class counts.
SPLITS = range(0, 9)
MSBS = range(0, 4)
CLASS_COUNTS = (1, 2, 4, 8, 16)
#: Encoder estimate of a table entry's cost in bits (a varint of a frequency, runs of zeros).
ENTRY_BITS = 12
#: Elements converted between tokens and values at once (bounds the working set).
CHUNK = 1 << 16


def token_count(bits: int, split: int, msb: int) -> int:
    """T, the tokens of ``bits``-bit values: 2^split direct ones, then 2^msb per exponent
    ``split .. bits - 1``."""
    return (1 << split) + (bits - split) * (1 << msb)


def tokens(u: np.ndarray, split: int, msb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token, extra bit count k, extra value) of every value (FORMAT.md 2.3): a value below
    2^split is its own token; a larger one, of exponent e (2^e <= u < 2^(e+1)), is the token
    2^split + (e - split) * 2^msb + its msb bits after the leading one, and its low
    k = e - msb bits are stored raw."""
    u = u.astype(np.int64)
    e = np.frexp(np.maximum(u, 1).astype(np.float64))[1].astype(np.int64) - 1
    big = u >= (1 << split)
    k = np.where(big, e - msb, 0)
    head = (u >> k) & ((1 << msb) - 1)
    tok = np.where(big, (1 << split) + (e - split) * (1 << msb) + head, u)
    return tok, k, u & ((1 << k) - 1)


def _token_bits(counts: np.ndarray, bits: int, split: int, msb: int) -> float:
    """Estimated coded bits of values with histogram ``counts`` (one table): the tokens'
    order-0 code length, the table, the raw bits."""
    values = np.flatnonzero(counts)
    tok, k, _ = tokens(values, split, msb)
    c = counts[values]
    per_token = np.bincount(tok, weights=c)
    used = per_token[per_token > 0]
    total = used.sum()
    return float(-(used * np.log2(used / total)).sum() + ENTRY_BITS * len(used) + (c * k).sum())


def _row_classes(u: np.ndarray, rows: int, classes: int) -> np.ndarray:
    """Encoder policy: rows ranked by their mean log-magnitude, cut into ``classes`` groups of
    about equal size (the channels' scales, which differ a lot after batch-norm folding)."""
    if classes == 1:
        return np.zeros(rows, dtype=np.int64)
    scale = np.log2(1.0 + u.reshape(rows, -1)).mean(axis=1)
    rank = np.argsort(np.argsort(scale, kind="stable"), kind="stable")
    return rank * classes // rows


def _packed(values: np.ndarray, widths: np.ndarray) -> bytes:
    """``values[i]`` in ``widths[i]`` bits each, end to end, least significant bit first."""
    out = []
    for a in range(0, len(values), CHUNK):
        v, w = values[a:a + CHUNK], widths[a:a + CHUNK]
        grid = np.arange(int(w.max(initial=0)))
        bit = ((v[:, None] >> grid) & 1).astype(np.uint8)
        out.append(bit[grid < w[:, None]])
    bits = np.concatenate(out) if out else np.zeros(0, np.uint8)
    return np.packbits(bits, bitorder="little").tobytes()


def encode_ctx(values: np.ndarray, rows: int = 1) -> bytes:
    """The ``rans-ctx`` payload of a non-empty int8/int16/uint8/uint16 array, C order, seen as
    ``rows`` rows of equal length (``rows`` divides the size; the output channels of a weight)."""
    flat = np.ascontiguousarray(values).reshape(-1)
    bits = 8 * flat.dtype.itemsize
    u = to_unsigned(flat).astype(np.int64)
    counts = np.bincount(u)
    _, split, msb = min((_token_bits(counts, bits, s, m), s, m) for s in SPLITS if s <= bits
                        for m in MSBS if m <= s)
    best = None
    for classes in CLASS_COUNTS:
        if classes > rows:
            break
        row_class = _row_classes(u, rows, classes)
        by_class = np.bincount(np.repeat(row_class, len(u) // rows) * len(counts) + u,
                               minlength=classes * len(counts)).reshape(classes, len(counts))
        size = (sum(_token_bits(c, bits, split, msb) for c in by_class)
                + rows * (classes - 1).bit_length())
        if best is None or size < best[0]:
            best = (size, row_class)
    assert best is not None
    row_class = best[1]
    tok, k, extra = tokens(u, split, msb)
    context = np.repeat(row_class, len(u) // rows)
    classes = int(row_class.max()) + 1
    size = token_count(bits, split, msb)
    folded = np.bincount(context * size + tok, minlength=classes * size).reshape(classes, size)
    precision, tables = _precision(folded)
    lanes = _lanes(len(u))
    cums = np.concatenate([np.concatenate([[0], np.cumsum(f)[:-1]]) for f in tables])
    flat_freq = np.concatenate(tables)
    index = context * size + tok
    states, words = _code(flat_freq[index], cums[index], precision, lanes)
    width = (classes - 1).bit_length()
    extra_bytes = _packed(extra, k)
    head = (bytes([precision, split, msb, classes]) + _varint(rows) + _varint(lanes)
            + _packed(row_class, np.full(rows, width)) + b"".join(_table_bytes(f) for f in tables))
    return (head + states.astype("<u4").tobytes() + _varint(len(extra_bytes)) + extra_bytes
            + words.astype("<u2").tobytes())


def _precision(counts: np.ndarray) -> tuple[int, list[np.ndarray]]:
    """The table precision n of least estimated size (tables plus code length) and every
    row's counts quantised to 2^n (encoder policy, as ``rans``)."""
    present = int(np.count_nonzero(counts, axis=1).max())
    best = None
    for precision in range(max(1, (present - 1).bit_length()), MAX_PRECISION + 1):
        tables = [quantise(c, precision) for c in counts]
        size = 0.0
        for c, f in zip(counts, tables):
            used = c > 0
            size += 8 * len(_table_bytes(f)) + float(np.sum(c[used] * (precision - np.log2(f[used]))))
        if best is None or size < best[0]:
            best = (size, precision, tables)
    assert best is not None
    return best[1], best[2]


@functools.partial(_refused, "rans-ctx")
def decode_ctx(body: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    """The ``count`` elements of a ``rans-ctx`` payload, by FORMAT.md 2.3; any payload that
    does not follow it is a KernelpackError naming the payload field. Work and memory are
    bounded by ``count``, the payload's length and the tables (at most 16 x 2^15 slots).
    With numba the whole payload is read in one compiled call; one it refuses is read again
    by ``_read_ctx``, which names what is wrong."""
    jit = _jit()
    if jit is not None:
        out = np.empty(count, dtype=f"<u{dtype.itemsize}")
        if jit.decode_ctx(np.frombuffer(body, np.uint8), count, 8 * dtype.itemsize, dtype.kind == "i", out):
            return out.view(dtype)
    return _read_ctx(body, dtype, count)


def _read_ctx(body: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    """``decode_ctx`` field by field, each checked and named where it is wrong (the reference,
    and the path without numba)."""
    bits = 8 * dtype.itemsize
    unsigned = np.dtype(f"<u{dtype.itemsize}")
    reader = _Reader(body)
    precision, split, msb, classes = reader.take(4, "precision, split, msb, classes")
    for field, value, low, high in (("precision", precision, 1, MAX_PRECISION),
                                    ("split", split, 0, min(bits, MAX_SPLIT)), ("msb", msb, 0, split),
                                    ("classes", classes, 1, MAX_CLASSES)):
        if not low <= value <= high:
            raise _bad(f"{field}: {value} is not in [{low}, {high}]")
    rows = reader.varint("rows", 1, count)
    if count % rows:
        raise _bad(f"rows: {rows} rows do not divide the {count} elements")
    lanes = reader.varint("lanes", 1, count)
    width = (classes - 1).bit_length()
    row_class = _unpacked(reader.take(-(-rows * width // 8), "row classes"), rows, width, "row classes")
    if np.count_nonzero(row_class >= classes):
        raise _bad(f"row classes: row {int(np.argmax(row_class >= classes))} has a class >= {classes}")
    size = token_count(bits, split, msb)
    tables = _read_tables(reader, classes, size, 1 << precision)
    states = np.frombuffer(reader.take(4 * lanes, "states"), dtype="<u4").astype(np.uint32)
    if np.count_nonzero(states < STATE_LOW):
        raise _bad(f"states: a state below 2^16 (lane {int(np.argmax(states < STATE_LOW))})")
    extra_size = reader.varint("extra length", 0, 2 * count)
    extra_at = reader.pos
    reader.take(extra_size, "extra")
    stream = _Stream(body, reader.pos, extra_at, extra_size)
    return _run(stream, tables, precision, split, msb, states, count, unsigned, row_class, count // rows, dtype)


def _unpacked(data: bytes, count: int, width: int, field: str) -> np.ndarray:
    """The inverse of ``_packed`` for ``count`` values of ``width`` bits each, as uint32; the
    bits after the last value up to the end of ``data`` must be zero and fill less than a
    byte. (np.unpackbits: a byte-window gather per value cost a small array's whole decode.)"""
    total = count * width
    if len(data) != -(-total // 8):
        raise _bad(f"{field}: {len(data)} bytes hold {total} bits")
    if total % 8 and data[-1] >> (total % 8):
        raise _bad(f"{field}: the bits after the last value are not zero")
    bits = np.unpackbits(np.frombuffer(data, np.uint8), count=total, bitorder="little")
    return bits.reshape(count, width) @ (np.uint32(1) << np.arange(width, dtype=np.uint32))


def _padded(data: bytes) -> np.ndarray:
    """``data`` as bytes with 3 zero bytes after it, so that a 3-byte window never runs out."""
    return np.concatenate([np.frombuffer(data, np.uint8), np.zeros(3, np.uint8)])


def _bits_at(buf: np.ndarray, pos: np.ndarray, width: np.ndarray) -> np.ndarray:
    """The ``width``-bit (<= 17) values at bit positions ``pos`` of ``buf`` (LSB first)."""
    byte = (pos >> 3).astype(np.int64)
    window = buf[byte].astype(np.int64) | buf[byte + 1].astype(np.int64) << 8 | buf[byte + 2].astype(np.int64) << 16
    return (window >> (pos & 7)) & ((1 << width) - 1)


def _numpy_values(out: np.ndarray, buf: np.ndarray, size: int, split: int, msb: int) -> int:
    """Tokens (in ``out``) to values in place, reading the raw bits from the ``size`` bytes of
    ``buf`` in element order, in chunks of CHUNK elements. Returns the bits read, or ``-1 - i``
    for the first element ``i`` whose bits run past the end."""
    base, pos = 1 << split, 0
    for a in range(0, len(out), CHUNK):
        t = out[a:a + CHUNK].astype(np.int64)
        big = t >= base
        d = np.where(big, t - base, 0)
        k = np.where(big, split + (d >> msb) - msb, 0)
        ends = pos + np.cumsum(k)
        if len(ends) and ends[-1] > 8 * size:
            return -1 - (a + int(np.argmax(ends > 8 * size)))
        raw = _bits_at(buf, ends - k, k)
        out[a:a + CHUNK] = np.where(big, (((1 << msb) + (d & ((1 << msb) - 1))) << k) | raw, t)
        pos = int(ends[-1]) if len(ends) else pos
    return pos


# --- the codecs by name ---------------------------------------------------------------------
def encode_as(codec: str, values: np.ndarray, shape: tuple[int, ...] | list[int]) -> bytes:
    """The payload of entropy codec ``codec`` (``rans`` or ``rans-ctx``) for the elements
    ``values`` of an array of ``shape``; the rows of ``rans-ctx`` are its first dimension
    (a weight's output channels), one row if the rank is below 2."""
    if codec == "rans":
        return encode(values)
    return encode_ctx(values, shape[0] if len(shape) >= 2 else 1)


#: The decoders of the entropy codecs by codec name (spec/FORMAT.md sections 2.1, 2.3).
DECODERS = {"rans": decode, "rans-ctx": decode_ctx}
