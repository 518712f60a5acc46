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

import math

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


def _bad(message: str) -> KernelpackError:
    return KernelpackError(f"bad rans payload: {message}")


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
    states, words = _code(sym, freq, precision, lanes)
    head = (bytes([precision]) + _varint(k) + _varint(lanes) + _varint(int(escapes.sum()))
            + _table_bytes(freq))
    raw_escapes = u[escapes].astype(f"<u{flat.dtype.itemsize}").tobytes()
    return head + states.astype("<u4").tobytes() + raw_escapes + words.astype("<u2").tobytes()


def _code(sym: np.ndarray, freq: np.ndarray, precision: int, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """rANS over ``lanes`` interleaved states, last element first: the decoder's initial
    states and its word stream (words in the order the decoder reads them)."""
    cum = np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.uint64)
    freq = freq.astype(np.uint64)
    x = np.full(lanes, STATE_LOW, dtype=np.uint64)
    chunks = []
    count = len(sym)
    for start in range(((count - 1) // lanes) * lanes, -1, -lanes):
        s = sym[start:start + lanes]
        r = len(s)
        f, c, xs = freq[s], cum[s], x[:r]
        big = xs >= f << np.uint64(32 - precision)
        if big.any():
            chunks.append((xs[big] & np.uint64(0xFFFF))[::-1])
            xs = np.where(big, xs >> np.uint64(16), xs)
        x[:r] = ((xs // f) << np.uint64(precision)) + xs % f + c
    words = np.concatenate(chunks)[::-1] if chunks else np.zeros(0, np.uint64)
    return x, words


# --- decoder ------------------------------------------------------------------------------
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
    freq = _read_table(reader, k + 1, m)
    states = np.frombuffer(reader.take(4 * lanes, "states"), dtype="<u4").astype(np.uint32)
    if np.any(states < STATE_LOW):
        raise _bad(f"states: a state below 2^16 (lane {int(np.argmax(states < STATE_LOW))})")
    escape_values = np.frombuffer(reader.take(itemsize * n_escapes, "escape values"), dtype=unsigned)
    if np.any(escape_values < k):
        raise _bad(f"escape values: a value below the {k} symbols coded directly")
    rest = body[reader.pos:]
    if len(rest) % 2:
        raise _bad(f"words: {len(rest)} bytes, not a whole number of 16-bit words")
    words = np.frombuffer(rest, dtype="<u2").astype(np.uint32)
    out = _run(states, words, freq, precision, count, unsigned)  # every symbol, k included, fits

    escaped = np.flatnonzero(out == k)
    if len(escaped) != n_escapes:
        raise _bad(f"escapes: {n_escapes} declared, {len(escaped)} decoded")
    if n_escapes:
        out[escaped] = escape_values
    return from_unsigned(out, dtype)


def _run(states: np.ndarray, words: np.ndarray, freq: np.ndarray, precision: int, count: int,
         sym_dtype: np.dtype) -> np.ndarray:
    """The decode loop: one step decodes one element of every lane still running."""
    m = 1 << precision
    symbol = np.repeat(np.arange(len(freq), dtype=sym_dtype), freq)  # slot -> symbol
    cum = np.concatenate([[0], np.cumsum(freq)[:-1]])
    slot_freq = freq[symbol].astype(np.uint32)
    slot_bias = (np.arange(m) - cum[symbol]).astype(np.uint32)  # slot - cum[symbol]
    mask, shift, low = np.uint32(m - 1), np.uint32(precision), np.uint32(STATE_LOW)
    sixteen = np.uint32(16)
    out = np.empty(count, dtype=sym_dtype)
    x = states
    lanes = len(states)
    p, available = 0, len(words)
    for start in range(0, count, lanes):
        r = min(lanes, count - start)
        xs = x[:r]
        slot = xs & mask
        out[start:start + r] = symbol[slot]
        xs = slot_freq[slot] * (xs >> shift) + slot_bias[slot]
        need = xs < low
        n = int(np.count_nonzero(need))
        if n:
            if p + n > available:
                raise _bad(f"words: the stream ends after {available} words, "
                           f"element {start} needs more")
            xs[need] = (xs[need] << sixteen) | words[p:p + n]
            p += n
        x[:r] = xs
    if p != available:
        raise _bad(f"words: {available - p} of {available} words left over")
    if np.any(x != low):
        raise _bad(f"states: lane {int(np.argmax(x != low))} does not end in the state 2^16")
    return out
