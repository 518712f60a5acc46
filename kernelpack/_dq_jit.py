"""The compiled Viterbi search and decode of kernelpack/dq.py (``choose``, ``dequantise``),
used when numba is installed.

Why: the numpy search steps one element of every row at a time (some 30 array operations a
step), which is slow for long rows and arrays of one row, and the numpy decode makes four
passes; these loops do the same arithmetic per element in machine code, in the same order,
so the codes and the bits are the same (tests/test_dq.py compares them). Imported lazily,
as kernelpack/_rans_jit.py.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from kernelpack.dq import MAX_CODE, STATES


@numba.njit(cache=True, nogil=True)
def _candidate(v: float, g: int, c: int) -> float:
    """Candidate ``c`` (0, 1, 2) of a state of grid ``g`` for the value ``v``: dq.candidates."""
    if c == 2:
        return 0.0
    if g == 0:
        return math.floor(v / 2) + c
    sign = 1.0 if v >= 0 else -1.0
    return sign * (math.floor((abs(v) + 1) / 2) + c)


@numba.njit(cache=True, nogil=True)
def viterbi(x: np.ndarray, lam: float, bits: np.ndarray, out: np.ndarray) -> None:
    """dq._numpy_viterbi for every row of ``x`` into ``out``: the same candidates, costs, ties
    (the first of the (state, candidate) pairs in order wins) and back-tracking. Each
    element's six candidates (three a grid) and their squared errors and prices are computed
    once, not once per state (the same numbers: twice as fast)."""
    rows, length = x.shape
    back = np.zeros((length, STATES), dtype=np.uint8)
    cost = np.empty(STATES)
    new = np.empty(STATES)
    code = np.empty((2, 3))
    error = np.empty((2, 3))
    rate = np.zeros((2, 3))
    for r in range(rows):
        cost[:] = np.inf
        cost[0] = 0.0
        for t in range(length):
            v = x[r, t]
            for g in range(2):
                for c in range(3):
                    k = _candidate(v, g, c)
                    sign = 1.0 if k > 0 else (-1.0 if k < 0 else 0.0)
                    d = v - (2 * k - g * sign)
                    code[g, c] = k
                    error[g, c] = d * d
                    if lam:
                        rate[g, c] = lam * bits[min(max(int(k) + MAX_CODE, 0), 2 * MAX_CODE)]
            new[:] = np.inf
            back[t, :] = 0  # a state no candidate reaches points at (0, 0), as numpy's argmin
            for s in range(STATES):
                g, low_grid = s >> 1, s & 1
                for c in range(3):
                    total = cost[s] + error[g, c] + rate[g, c]
                    target = 2 * ((int(code[g, c]) & 1) ^ low_grid) + g
                    if total < new[target]:
                        new[target] = total
                        back[t, target] = 3 * s + c
            cost[:] = new
        state = 0
        for s in range(1, STATES):
            if cost[s] < cost[state]:
                state = s
        for t in range(length - 1, -1, -1):
            chosen = back[t, state]
            source = chosen // 3
            out[r, t] = np.int64(_candidate(x[r, t], source >> 1, chosen % 3))
            state = source


@numba.njit(cache=True, nogil=True)
def dequantise(codes: np.ndarray, step: np.float32, out: np.ndarray) -> None:
    """dq.dequantise over rows (``codes`` and ``out`` of shape (rows, length)): the state machine
    element by element, each level one float32 product, as numpy's (no fast-math, so no
    flush to zero and no fused operations)."""
    rows, length = codes.shape
    for r in range(rows):
        g, low_grid = 0, 0
        for t in range(length):
            q = np.int32(codes[r, t])
            level = 2 * q - (g if q > 0 else (-g if q < 0 else 0))
            out[r, t] = np.float32(level) * step
            g, low_grid = (q & 1) ^ low_grid, g
