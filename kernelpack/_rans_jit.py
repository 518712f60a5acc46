"""Compiled loops of the rANS codecs (``rans``, ``rans-ctx``; spec/FORMAT.md 2.1, 2.3), used by
kernelpack/entropy.py when numba is installed (``pip install kernelpack[fast]``).

Why: the numpy loops in entropy.py decode one element of every lane per Python step, about
15 µs a step, and the encoder's lane policy gives every array of more than 1024 elements
about a thousand steps: 1–20 MB/s of codes on real models, where the codes of a weight are
a few kilobytes to a megabyte. These loops run the same arithmetic element by element in
machine code, and they release the GIL, so the whole-file thread pool decodes arrays in
parallel.

A ``rans-ctx`` payload is decoded in one call (``decode_ctx``: its fields, tables, the
decode table, the rANS loop, the tokens made values with their raw bits, the zigzag undone),
a ``rans`` payload in two (``tables_loop``, ``decode_loop``) after entropy.py has read its
fields. Separate passes (slot tables, tokens, values, zigzag in numpy) cost twice the rANS
loop itself, and the fields read in Python cost as much as the decode of an array of a few
thousand codes (benchmarks/entropy.py measures the decode beside zstd's of the same codes).

They are the same algorithm as entropy.py's loops, not a second definition: every payload
decodes to the same elements and the encoder writes the same bytes, and every malformed
payload is refused with the same message, which tests/test_codec_rans_ctx.py checks on
every conformance vector, on generated arrays and on corrupted payloads with both paths.
The numpy loops stay the reference (and the path without numba). The import is lazy: numba
is loaded (about 0.3 s) and the loops compiled or read from numba's cache only when a
process first codes a rans payload.
"""

from __future__ import annotations

import numba
import numpy as np

from kernelpack.entropy import MAX_CLASSES, MAX_PRECISION, MAX_SPLIT, MAX_VARINT, STATE_LOW


#: Bit fields of a decode table entry (``entries``): the slot's offset in its token's range,
#: the token's frequency (at most 2^15), its value with the raw bits zero, and k, the number
#: of raw bits (at most 15).
BIAS, FREQ, HIGH, RAW = 0, 16, 32, 48
#: Slots (classes x 2^precision) over which ``decode_loop`` reads a token's entry through a
#: byte per slot (``token_entries``) rather than an entry per slot (``entries``), if the
#: tokens fit a byte: 8 bytes a slot is then 512 KiB or more, and a row's reads of it miss
#: the caches (3.4 ns a code at 2 MiB, 16 classes of 2^14, against 2.1 through bytes); under
#: it the second read costs about 15%.
LARGE_TABLE = 1 << 16


@numba.njit(cache=True, nogil=True)
def _token_entry(freq: np.ndarray, g: int, t: int, split: int, msb: int) -> int:
    """Token ``t`` of table ``g`` as a decode table entry without its offset: its frequency,
    its value with the raw bits zero and their number k (the token-to-value arithmetic of
    FORMAT.md 2.3 done once per token, not once per element; tokens below 2^split are values
    of their own)."""
    high, k = t, 0
    if t >= 1 << split:
        d = t - (1 << split)
        k = split + (d >> msb) - msb
        high = ((1 << msb) + (d & ((1 << msb) - 1))) << k
    return freq[g, t] << FREQ | high << HIGH | k << RAW


@numba.njit(cache=True, nogil=True)
def entries(freq: np.ndarray, precision: int, split: int, msb: int) -> np.ndarray:
    """The decode table of ``decode_loop`` from the frequency tables (rows of ``freq``, each
    summing to 2^precision): slot ``g * 2^precision + s`` of table ``g`` describes the token
    whose range holds ``s``, with ``s``'s offset in that range, in one int64 so that a step
    makes one table read (one read, not three arrays)."""
    classes, size = freq.shape
    table = np.empty(classes << precision, dtype=np.int64)
    slot = 0
    for g in range(classes):
        for t in range(size):
            entry = _token_entry(freq, g, t, split, msb)
            for j in range(freq[g, t]):
                table[slot + j] = entry + (j << BIAS)
            slot += freq[g, t]
    return table


@numba.njit(cache=True, nogil=True)
def token_entries(freq: np.ndarray, precision: int, split: int, msb: int) -> tuple[np.ndarray, np.ndarray]:
    """``entries`` in two reads, for tables over LARGE_TABLE slots of at most 256 tokens: the
    token of slot ``g * 2^precision + s`` (a byte), and the entry of token ``t`` of table ``g``
    at ``g * T + t`` less the token's first slot, so that entry + ``s`` is ``entries``'."""
    classes, size = freq.shape
    slots = np.empty(classes << precision, dtype=np.uint8)
    tokens = np.empty(classes * size, dtype=np.int64)
    for g in range(classes):
        first = 0
        for t in range(size):
            tokens[g * size + t] = _token_entry(freq, g, t, split, msb) - first
            slots[(g << precision) + first:(g << precision) + first + freq[g, t]] = t
            first += freq[g, t]
    return slots, tokens


@numba.njit(cache=True, nogil=True)
def _padded(body: np.ndarray, at: int, size: int, pad: int) -> np.ndarray:
    """The ``size`` bytes at ``at`` of ``body``, then at least ``pad`` zero bytes, in a whole
    number of 32-bit words (to be viewed as little-endian words: a copy and a view, where a
    loop assembling the words byte by byte cost a quarter of a small array's decode)."""
    padded = np.zeros(4 * ((size + pad) // 4 + 1), dtype=np.uint8)
    padded[:size] = body[at:at + size]
    return padded


@numba.njit(cache=True, nogil=True)
def decode_loop(body: np.ndarray, words_at: int, extra_at: int, extra_size: int, freq: np.ndarray,
                precision: int, split: int, msb: int, x: np.ndarray, row_class: np.ndarray,
                row_length: int, signed: bool, out: np.ndarray) -> tuple[int, int]:
    """The decode of FORMAT.md 2.1 / 2.3 over ``out``: rANS (states ``x``, updated in place;
    the words from byte ``words_at`` of ``body`` to its end; row ``r``'s elements read table
    ``row_class[r]`` of ``freq``), every token made its value with its raw bits (the
    ``extra_size`` bytes at ``extra_at``, in element order), then, if ``signed``, the zigzag
    undone. Returns (words read, or ``-1 - i`` if the step of ``lanes`` elements from ``i``
    needed a word after the last one; raw bits read, or ``-1 - i`` if element ``i``'s run
    past the end).

    One pass, without branches on the data (the renormalisation and the raw bits are read at
    every element and kept or masked): separate token and value passes, and branches taken
    at random, each cost about as much as the rANS arithmetic. No read needs a clamp: the
    words are checked after each step (``_rows``), not at each element, and copied with the
    padding a step can read past their end; the raw bits are copied with what every element
    could read (15 bits each, zeros; memory 2 bytes an element), and checked after the loop
    as before, so that a payload refused for its raw bits is still decoded to the end (the
    reader checks its words and states first). The zigzag is a pass of its own, which numba
    vectorises."""
    lanes = x.shape[0]
    available, bits = (body.shape[0] - words_at) // 2, 8 * extra_size
    words = _padded(body, words_at, 2 * available, 2 * lanes).view(np.uint16)
    raw = _padded(body, extra_at, extra_size, 2 * out.shape[0] + 8).view(np.uint32)
    classes, size = freq.shape
    if size <= 256 and classes << precision > LARGE_TABLE:
        slots, tokens = token_entries(freq, precision, split, msb)
        p, pos, i = _rows(words, raw, slots, tokens, size, precision, x, row_class, row_length, out, available)
    else:
        p, pos, i = _rows(words, raw, None, entries(freq, precision, split, msb), 0, precision, x, row_class,
                          row_length, out, available)
    if p > available:
        return -1 - (i - 1) // lanes * lanes, pos
    if pos > bits:
        return p, -1 - _first_overrun(out, split, msb, bits)
    if signed:
        for j in range(out.shape[0]):
            out[j] = (out[j] >> 1) ^ (0 - (out[j] & 1))
    return p, pos


@numba.njit(cache=True, nogil=True)
def _rows(words: np.ndarray, raw: np.ndarray, slots: np.ndarray | None, table: np.ndarray, size: int,
          precision: int, x: np.ndarray, row_class: np.ndarray, row_length: int, out: np.ndarray,
          available: int) -> tuple[int, int, int]:
    """``decode_loop``'s rANS loop over ``out`` (table ``table``, through ``slots`` unless None:
    ``_entry``), up to the end or the first step after which more than ``available`` words
    were read. Returns the words read, the raw bits read and the elements decoded.

    Consecutive rows of a class are one run, and a run goes by whole steps (``_steps``)
    where it can, in pieces of a step (``_segment``) where it starts or ends inside one: the
    inner loop carries no lane or row arithmetic, and its trip count, the lanes, is the same
    at every step (pieces of varying length, cut at the rows and the lanes, cost 15% more
    at 4 to 9 lanes)."""
    lanes, rows = x.shape[0], row_class.shape[0]
    p, pos, i, lane, r = 0, 0, 0, 0, 0
    while r < rows:
        g = row_class[r]
        end = r + 1
        while end < rows and row_class[end] == g:
            end += 1
        at = (np.int64(g) << precision, np.int64(g) * size)
        left = (end - r) * row_length
        r = end
        while left:
            if lane == 0 and left >= lanes:
                p, pos, n = _steps(words, raw, slots, table, at, precision, x, out, i, left // lanes, p, pos,
                                   available)
            else:
                n = min(left, lanes - lane)
                p, pos = _segment(words, raw, slots, table, at, precision, x, lane, out, i, n, p, pos)
            i += n
            if p > available:
                return p, pos, i
            left -= n
            lane = lane + n if lane + n < lanes else 0
    return p, pos, i


@numba.njit(cache=True, nogil=True)
def _steps(words: np.ndarray, raw: np.ndarray, slots: np.ndarray | None, table: np.ndarray, at: tuple[int, int],
           precision: int, x: np.ndarray, out: np.ndarray, i: int, steps: int, p: int, pos: int,
           available: int) -> tuple[int, int, int]:
    """``steps`` whole steps of ``_rows`` (every lane once) from element ``i``, word ``p`` and
    raw bit ``pos``, up to the first after which more than ``available`` words were read;
    returns the next ``p``, ``pos`` and the elements decoded."""
    lanes = x.shape[0]
    for s in range(steps):
        p, pos = _segment(words, raw, slots, table, at, precision, x, 0, out, i + s * lanes, lanes, p, pos)
        if p > available:
            return p, pos, (s + 1) * lanes
    return p, pos, steps * lanes


@numba.njit(cache=True, nogil=True)
def _segment(words: np.ndarray, raw: np.ndarray, slots: np.ndarray | None, table: np.ndarray, at: tuple[int, int],
             precision: int, x: np.ndarray, lane: int, out: np.ndarray, i: int, n: int, p: int,
             pos: int) -> tuple[int, int]:
    """``_rows``' elements ``i .. i + n - 1`` (lanes ``lane .. lane + n - 1``, one class's, its
    tables ``at``), from word ``p`` and raw bit ``pos``; returns the next ``p`` and ``pos``.
    Indices are unsigned, which spares numba's negative-index test; every one is in range:
    states stay in [2^16, 2^32), row classes and tables were checked, and the words and the
    raw bits are padded for what ``decode_loop`` lets a step read past their end."""
    mask = (1 << precision) - 1
    for j in range(n):
        state = np.int64(x[np.uint64(lane + j)])
        e = _entry(slots, table, at, state & mask)
        state = ((e >> FREQ) & 0xFFFF) * (state >> precision) + ((e >> BIAS) & 0xFFFF)
        need = state < 1 << 16
        word = np.int64(words[np.uint64(p)])  # read before the test: no branch
        x[np.uint64(lane + j)] = (state << 16 | word) if need else state
        p += need
        k = e >> RAW
        w = np.uint64(pos >> 5)
        window = np.int64(raw[w]) | np.int64(raw[w + np.uint64(1)]) << 32
        out[np.uint64(i + j)] = (e >> HIGH) & 0xFFFF | (window >> (pos & 31)) & ((np.int64(1) << k) - 1)
        pos += k
    return p, pos


@numba.njit(cache=True, nogil=True)
def _entry(slots: np.ndarray | None, table: np.ndarray, at: tuple[int, int], s: int) -> int:
    """The ``entries`` entry of slot ``s`` of the class whose tables start ``at`` (its slots,
    its tokens): read from ``table`` (``entries``), or through ``slots`` (``token_entries``).
    numba compiles the two apart (``slots is None`` is known when it types the call)."""
    if slots is None:
        return table[np.uint64(at[0] + s)]
    return table[np.uint64(at[1] + np.int64(slots[np.uint64(at[0] + s)]))] + s


@numba.njit(cache=True, nogil=True)
def _first_overrun(out: np.ndarray, split: int, msb: int, bits: int) -> int:
    """The first element whose raw bits run past ``bits``, from the values ``decode_loop``
    wrote: a value of exponent e >= split has k = e - msb raw bits, whatever bits it read."""
    pos = 0
    for i in range(out.shape[0]):
        u = np.int64(out[i])
        if u >= 1 << split:
            k = -msb
            while u > 1:
                u >>= 1
                k += 1
            if pos + k > bits:
                return i
            pos += k
    return -1


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
def _varint(buf: np.ndarray, pos: int, end: int, longest: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it, or position -1 for one the reader
    refuses: truncated, not in its shortest form, or over ``longest`` bytes (entropy.py's
    MAX_VARINT; 3 in a table, whose values are at most 2^16, so a longer one is out of range
    anyway)."""
    value = 0
    for b in range(longest):
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
            value, pos = _varint(buf, pos, end, 3)
            if pos < 0 or value > m:
                return -1
            if value:
                freq[g, i] = value
                total += value
                i += 1
                continue
            run, pos = _varint(buf, pos, end, 3)
            if pos < 0 or run > size - i - 1:
                return -1
            i += run + 1
        if total != m:
            return -1
    return pos


@numba.njit(cache=True, nogil=True)
def decode_ctx(body: np.ndarray, count: int, bits: int, signed: bool, out: np.ndarray) -> bool:
    """A whole ``rans-ctx`` payload (FORMAT.md 2.3) of ``count`` ``bits``-bit elements into
    ``out`` (zigzag undone if ``signed``): True, or False for anything entropy.py's reader
    refuses (it then reads the payload again and says what). Why here: reading the fields in
    Python (a dozen small numpy calls) cost as much as the decode of an array of a few
    thousand codes. The same checks as the reader's, in its order."""
    end = body.shape[0]
    if end < 4:
        return False
    precision, split, msb, classes = np.int64(body[0]), np.int64(body[1]), np.int64(body[2]), np.int64(body[3])
    if not (1 <= precision <= MAX_PRECISION and split <= min(bits, MAX_SPLIT) and msb <= split
            and 1 <= classes <= MAX_CLASSES):
        return False
    rows, pos = _varint(body, 4, end, MAX_VARINT)
    if pos < 0 or not 1 <= rows <= count or count % rows:
        return False
    lanes, pos = _varint(body, pos, end, MAX_VARINT)
    if pos < 0 or not 1 <= lanes <= count:
        return False
    row_class, pos = _row_classes(body, pos, rows, classes)
    if pos < 0:
        return False
    freq = np.zeros((classes, (1 << split) + (bits - split) * (1 << msb)), dtype=np.int64)
    pos = tables_loop(body, pos, 1 << precision, freq)
    if pos < 0 or pos + 4 * lanes > end:
        return False
    x = np.empty(lanes, dtype=np.uint32)
    for lane in range(lanes):
        at = pos + 4 * lane
        x[lane] = (np.uint32(body[at]) | np.uint32(body[at + 1]) << np.uint32(8)
                   | np.uint32(body[at + 2]) << np.uint32(16) | np.uint32(body[at + 3]) << np.uint32(24))
        if x[lane] < STATE_LOW:
            return False
    extra_size, extra_at = _varint(body, pos + 4 * lanes, end, MAX_VARINT)
    if extra_at < 0 or extra_size > 2 * count or extra_at + extra_size > end or (end - extra_at - extra_size) % 2:
        return False
    words_at = extra_at + extra_size
    p, used = decode_loop(body, words_at, extra_at, extra_size, freq, precision, split, msb, x, row_class,
                          count // rows, signed, out)
    if p != (end - words_at) // 2 or used < 0 or extra_size != (used + 7) // 8:
        return False
    if used % 8 and body[extra_at + extra_size - 1] >> (used % 8):
        return False
    for lane in range(lanes):
        if x[lane] != STATE_LOW:
            return False
    return True


@numba.njit(cache=True, nogil=True)
def _row_classes(body: np.ndarray, pos: int, rows: int, classes: int) -> tuple[np.ndarray, int]:
    """The row classes at ``pos`` (``rows`` values of the bits of ``classes - 1``, LSB first, the
    padding bits zero, each below ``classes``) and the position after them, or position -1."""
    width = 0
    while (1 << width) < classes:
        width += 1
    size = (rows * width + 7) // 8
    row_class = np.zeros(rows, dtype=np.uint32)
    if pos + size > body.shape[0]:
        return row_class, -1
    if (rows * width) % 8 and body[pos + size - 1] >> ((rows * width) % 8):
        return row_class, -1
    for r in range(rows):
        for b in range(width):
            at = r * width + b
            row_class[r] |= np.uint32((body[pos + (at >> 3)] >> (at & 7)) & 1) << np.uint32(b)
        if row_class[r] >= classes:
            return row_class, -1
    return row_class, pos + size

