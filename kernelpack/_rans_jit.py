"""Compiled loops of the rANS codecs (``rans``, ``rans-ctx``; spec/FORMAT.md 2.1, 2.3), used by
kernelpack/entropy.py when numba is installed (``pip install kernelpack[fast]``).

Why: the numpy loops in entropy.py decode one element of every lane per Python step, about
15 µs a step, and the encoder's lane policy gives every array of more than 1024 elements
about a thousand steps: 1–20 MB/s of codes on real models, where the codes of a weight are
a few kilobytes to a megabyte. These loops run the same arithmetic element by element in
machine code: about 240 MB/s of int16 codes on one core here (benchmarks/entropy.py), and
they release the GIL, so the whole-file thread pool decodes arrays in parallel.

The frequency tables are read and the slot tables built here too: with a Python varint per
table entry they took a quarter of a decode on PP-OCRv4 det's codes (8 tables per array).

They are the same algorithm as entropy.py's loops, not a second definition: every payload
decodes to the same elements and the encoder writes the same bytes, which
tests/test_codec_rans_ctx.py checks on every conformance vector and on generated arrays
with both paths. The numpy loops stay the reference (and the path without numba). The
import is lazy: numba is loaded (about 0.3 s) and the loops compiled or read from numba's
cache only when a process first codes a rans payload.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def decode_loop(x: np.ndarray, words: np.ndarray, symbol: np.ndarray, slot_freq: np.ndarray,
                slot_bias: np.ndarray, precision: int, row_class: np.ndarray, row_length: int,
                out: np.ndarray) -> int:
    """The decode loop of FORMAT.md 2.1 / 2.3 over ``out`` (states ``x`` updated in place).
    Returns the number of words read, or ``-1 - i`` if element ``i`` needed a word after the
    last one."""
    mask = np.uint32((1 << precision) - 1)
    table = np.uint32(1 << precision)
    shift = np.uint32(precision)
    low = np.uint32(1 << 16)
    lanes = x.shape[0]
    count = out.shape[0]
    p = 0
    available = words.shape[0]
    row, boundary = 0, row_length  # the row of element i, and where the next row starts
    for start in range(0, count, lanes):
        for lane in range(min(lanes, count - start)):
            i = start + lane
            if i == boundary:  # i // row_length without a division per element
                row += 1
                boundary += row_length
            state = x[lane]
            slot = (state & mask) + row_class[row] * table
            out[i] = symbol[slot]
            state = slot_freq[slot] * (state >> shift) + slot_bias[slot]
            if state < low:
                if p >= available:
                    return -1 - i
                state = (state << np.uint32(16)) | words[p]
                p += 1
            x[lane] = state
    return p


@numba.njit(cache=True, nogil=True)
def encode_loop(freq: np.ndarray, cum: np.ndarray, precision: int, lanes: int, x: np.ndarray,
                words: np.ndarray) -> int:
    """The encoder of FORMAT.md 2.1 (last element first, lanes from the last to the first):
    element ``i`` coded with ``freq[i]`` at ``cum[i]``; ``x`` the lanes' states (updated in
    place), ``words`` filled in order of emission. Returns the number of words emitted."""
    count = freq.shape[0]
    emitted = 0
    last = ((count - 1) // lanes) * lanes
    for start in range(last, -1, -lanes):
        for lane in range(min(lanes, count - start) - 1, -1, -1):
            f = np.uint64(freq[start + lane])
            state = x[lane]
            if state >= f << np.uint64(32 - precision):
                words[emitted] = state & np.uint64(0xFFFF)
                emitted += 1
                state >>= np.uint64(16)
            x[lane] = (state // f << np.uint64(precision)) + state % f + np.uint64(cum[start + lane])
    return emitted


@numba.njit(cache=True, nogil=True)
def values_loop(out: np.ndarray, extra: np.ndarray, size: int, split: int, msb: int) -> int:
    """Tokens in ``out`` to values in place, reading every element's extra bits from the
    ``size`` bytes of ``extra`` (followed by 3 zero bytes; FORMAT.md 2.3, LSB first, element
    order). Returns the bits read, or ``-1 - i`` if element ``i``'s bits run past the end."""
    base = 1 << split
    bits = size * 8
    pos = 0
    for i in range(out.shape[0]):
        t = np.int64(out[i])
        if t < base:
            continue
        d = t - base
        k = split + (d >> msb) - msb
        if pos + k > bits:
            return -1 - i
        at = pos >> 3
        window = np.int64(extra[at]) | np.int64(extra[at + 1]) << 8 | np.int64(extra[at + 2]) << 16
        raw = (window >> (pos & 7)) & ((np.int64(1) << k) - 1)
        pos += k
        out[i] = (((np.int64(1) << msb) + (d & ((1 << msb) - 1))) << k) | raw
    return pos


@numba.njit(cache=True, nogil=True)
def _short_varint(buf: np.ndarray, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it, or position -1 for one the reader
    refuses: truncated, not in its shortest form, or over 3 bytes (a table's values are at
    most 2^16, so a longer one is out of range anyway)."""
    value = 0
    for b in range(3):
        if pos >= end:
            return 0, -1
        byte = np.int64(buf[pos])
        pos += 1
        value |= (byte & 0x7F) << (7 * b)
        if byte < 0x80:
            return (0, -1) if byte == 0 and b > 0 else (value, pos)
    return 0, -1


@numba.njit(cache=True, nogil=True)
def tables_loop(buf: np.ndarray, pos: int, m: int, freq: np.ndarray) -> int:
    """The frequency tables of FORMAT.md 2.1 / 2.3 (a varint per symbol; a zero is followed by
    the varint length - 1 of a run of absent symbols), one per row of ``freq`` (zeros on
    entry), read from ``buf`` at ``pos``. Returns the position after the last table, or -1 for
    anything entropy.py's reader refuses (it then reads the same bytes and says what)."""
    classes, size = freq.shape
    end = buf.shape[0]
    for g in range(classes):
        i = 0
        total = 0
        while i < size:
            value, pos = _short_varint(buf, pos, end)
            if pos < 0 or value > m:
                return -1
            if value:
                freq[g, i] = value
                total += value
                i += 1
                continue
            run, pos = _short_varint(buf, pos, end)
            if pos < 0 or run > size - i - 1:
                return -1
            i += run + 1
        if total != m:
            return -1
    return pos


@numba.njit(cache=True, nogil=True)
def slots_loop(freq: np.ndarray, precision: int, symbol: np.ndarray, slot_freq: np.ndarray,
               slot_bias: np.ndarray) -> None:
    """The decode tables of ``decode_loop`` from the frequency tables (rows of ``freq``, each
    summing to 2^precision): slot ``g * 2^precision + s`` holds the symbol whose range of
    table ``g`` holds ``s``, its frequency and ``s`` minus the range's start."""
    classes, size = freq.shape
    m = 1 << precision
    for g in range(classes):
        slot = g * m
        for i in range(size):
            f = freq[g, i]
            for j in range(f):
                symbol[slot + j] = i
                slot_freq[slot + j] = f
                slot_bias[slot + j] = j
            slot += f
