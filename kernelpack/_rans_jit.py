"""Compiled loops of the rANS codecs (``rans``, ``rans-ctx``; spec/FORMAT.md 2.1, 2.3), used by
kernelpack/entropy.py when numba is installed (``pip install kernelpack[fast]``).

Why: the numpy loops in entropy.py decode one element of every lane per Python step, about
15 µs a step, and the encoder's lane policy gives every array of more than 1024 elements
about a thousand steps: 1–20 MB/s of codes on real models, where the codes of a weight are
a few kilobytes to a megabyte. These loops run the same arithmetic element by element in
machine code: about 240 MB/s of int16 codes on one core here (benchmarks/entropy.py), and
they release the GIL, so the whole-file thread pool decodes arrays in parallel.

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
