"""Write the conformance vectors: small .kpk files covering every form and option, and manifest.json.

The vectors are normative (see README.md): a reader conforms when it decodes every
tensor of every file to the SHA-256 the manifest records. They are written from
deterministic inputs (numpy ``default_rng`` with fixed seeds), so running this
script again reproduces them; byte-identical output additionally needs the same
zstandard library (compressed payloads) and the same LAPACK/scipy (the encoders'
least-squares fits and k-means choose the stored numbers). The digests recorded in
the manifest are not copied from the headers: each file is reopened and every
tensor decoded again with the numpy backend, and that digest must agree with both
the header and a torch CPU decode before the manifest is written.

    python spec/vectors/generate.py            # rewrite the vectors next to this script
    python spec/vectors/generate.py --check    # regenerate into a temporary folder, compare bytes
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from kernelpack import entropy, writer
from kernelpack._backend import NUMPY_DTYPES
from kernelpack.codecs import CODECS, codecs_of
from kernelpack.forms import (DCT, FORMS, Basis, BasisTensor, Config, DCTTensor, Dense, DenseTensor,
                              Encoded, Linear, LinearTensor, Series, SeriesTensor)
from kernelpack.forms._base import Stored, to_stored
from kernelpack.layout import digest
from kernelpack.pack import encode
from kernelpack.reader import Container
from kernelpack.writer import write

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST = "manifest.json"
#: zstd level the vectors are written with (the writer's default).
LEVEL = 19
#: The whole folder must stay small: it is committed and read by every CI run.
MAX_FILE_BYTES = 16 << 10
MAX_TOTAL_BYTES = 300 << 10

#: One tensor of a vector file: its value (numpy or torch) and the config that encodes it,
#: or an already encoded tensor (written as it is).
Entry = tuple[Any, Config] | Encoded


def normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic float32 test data: standard normal from ``default_rng(seed)``."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- the files ----------------------------------------------------------------------------
def dense_file() -> dict[str, Entry]:
    """Every stored dtype as it is, float32 stored narrower, a 0-d scalar, a zero-size tensor."""
    import torch

    rng = np.random.default_rng(100)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3.4e38, -1.5], dtype=np.float32)
    return {
        "float32": (normal(101, (4, 5)), Dense()),
        "float16": (normal(102, (3, 4)).astype(np.float16), Dense()),
        "bfloat16": (torch.from_numpy(normal(103, (2, 3, 4))).to(torch.bfloat16), Dense()),
        "float64": (rng.standard_normal((3, 3)), Dense()),
        "int8": (rng.integers(-128, 128, (5, 4), dtype=np.int8), Dense()),
        "uint8": (rng.integers(0, 256, (7,), dtype=np.uint8), Dense()),
        "int16": (rng.integers(-(1 << 15), 1 << 15, (2, 5), dtype=np.int16), Dense()),
        "uint16": (rng.integers(0, 1 << 16, (2, 2, 2), dtype=np.uint16), Dense()),
        "int32": (rng.integers(-(1 << 31), 1 << 31, (6,), dtype=np.int32), Dense()),
        "int64": (np.array([0, 1, -1, 2**62, -(2**63), 2**63 - 1, 12345], dtype=np.int64), Dense()),
        "int64_small": (np.arange(64, dtype=np.int64) % 5, Dense()),  # compresses: a zstd payload
        "bool": (rng.integers(0, 2, (3, 5)).astype(bool), Dense()),
        "float32_special": (special, Dense()),  # NaN, infinities, -0, a subnormal: copied bit for bit
        "float32_as_float16": (normal(104, (4, 6)), Dense("float16")),
        "float32_as_bfloat16": (normal(105, (3, 7)), Dense("bfloat16")),
        "scalar": (np.array(2.5, dtype=np.float32), Dense()),
        "scalar_int64": (np.array(-3, dtype=np.int64), Dense()),
        "scalar_float16_as_float32": (np.array(0.1, dtype=np.float32), Dense("float16")),
        "empty": (np.zeros((0, 3), dtype=np.float32), Dense()),
    }


def dct_file() -> dict[str, Entry]:
    """All axes and subsets, boundary 0 and all, ranks 1/2/4, each storage dtype, a length-1 axis."""
    return {
        "all_axes_2d": (normal(201, (8, 6)), DCT(boundary=12)),
        "all_axes_4d_bf16": (normal(202, (3, 2, 4, 4)), DCT(boundary=20, dtype="bfloat16")),
        "spatial_axes_4d": (normal(203, (4, 3, 5, 5)), DCT(boundary=30, axes=(2, 3))),
        "axes_0_2_3d_bf16": (normal(204, (4, 3, 5)), DCT(boundary=9, axes=(0, 2), dtype="bfloat16")),
        "one_axis_2d_f32": (normal(205, (5, 7)), DCT(boundary=11, axes=(1,), dtype="float32")),
        "rank1_f32": (normal(206, (16,)), DCT(boundary=5, dtype="float32")),
        "boundary_0": (normal(207, (5, 4)), DCT(boundary=0)),
        "boundary_all_f32": (normal(208, (4, 6)), DCT(boundary=24, dtype="float32")),
        "length1_axis": (normal(209, (6, 1, 5)), DCT(boundary=7)),
        "length1_only": (normal(210, (1,)), DCT(boundary=1, dtype="float32")),
    }


def series_file() -> dict[str, Entry]:
    """Both families, named and explicit points, Nx != Ny, 7x7 / 3x3 / 1x1 kernels, each dtype."""
    explicit_x = tuple(float(v) for v in np.cos(np.linspace(0.2 * np.pi, 0.8 * np.pi, 5)))
    explicit_y = (-1.0, -0.5, 0.0, 0.25, 1.0)
    return {
        "cosine_cgl_3x3": (normal(301, (4, 3, 3, 3)), Series("cosine", 3, "cgl")),
        "chebyshev_uniform_7x7_bf16": (normal(302, (2, 3, 7, 7)),
                                       Series("chebyshev", 4, "uniform", dtype="bfloat16")),
        "explicit_points_5x5_f32": (normal(303, (3, 2, 5, 5)),
                                    Series("cosine", (3, 4), (explicit_x, explicit_y), dtype="float32")),
        "nx_ne_ny_7x3": (normal(304, (2, 2, 7, 3)), Series("chebyshev", (5, 2), ("cgl", "uniform"))),
        "cosine_cgl_7x7_f32": (normal(305, (2, 2, 7, 7)), Series("cosine", 5, "cgl", dtype="float32")),
        "kernel_1x1_f32": (normal(306, (8, 4, 1, 1)), Series("cosine", 1, "cgl", dtype="float32")),
        "kernel_1x1_uniform_bf16": (normal(307, (3, 2, 1, 1)),
                                    Series("chebyshev", (2, 1), "uniform", dtype="bfloat16")),
        "rank2_3x3": (normal(308, (3, 3)), Series("cosine", (2, 3), "cgl")),
    }


def basis_file() -> dict[str, Entry]:
    """A bank shared by two tensors, a depthwise (C, 1, k, k) tensor, bfloat16, a multi-axis filter."""
    shared = normal(401, (8, 3, 3))
    return {
        "conv_a": (normal(402, (6, 4, 3, 3)), Basis(shared, bank_name="shared_3x3")),
        "conv_b": (normal(403, (4, 6, 3, 3)), Basis(shared, bank_name="shared_3x3")),
        "depthwise_bf16": (normal(404, (16, 1, 3, 3)), Basis(6, bank_name="depthwise_kmeans",
                                                            dtype="bfloat16", seed=0)),
        "whole_filters_f32": (normal(405, (5, 2, 3, 3)), Basis(normal(406, (3, 2, 3, 3)),
                                                              bank_name="filters_2x3x3",
                                                              dtype="float32")),
    }


def basis_uint16_file() -> dict[str, Entry]:
    """A bank of 260 filters, so the index is uint16, with slices that pick filters 256..259."""
    bank = normal(501, (260, 3, 3))
    rng = np.random.default_rng(502)
    index = np.concatenate([np.arange(256, 260), rng.integers(0, 260, 60)])
    scale = rng.uniform(0.5, 2.0, (64, 1, 1)) * rng.choice([-1.0, 1.0], (64, 1, 1))
    offset = rng.uniform(-0.5, 0.5, (64, 1, 1))
    slices = (bank[index] * scale + offset).astype(np.float32)  # each slice is a*g+b of its filter
    return {"conv_uint16": (slices.reshape(8, 8, 3, 3), Basis(bank, bank_name="bank_260"))}


def linear_file() -> dict[str, Entry]:
    """Dense A and low-rank A1 A2, with and without order, all primaries (s = 0), each dtype."""
    return {
        "dense_A_order": (normal(601, (8, 3, 3, 3)), Linear(alpha=0.5)),
        "low_rank_order_bf16": (normal(602, (12, 4, 3, 3)), Linear(primaries=6, rank=2, dtype="bfloat16")),
        "all_primaries_f32": (normal(603, (5, 7)), Linear(primaries=5, dtype="float32")),
        # Without order: the primaries are the first rows, as a layer trained as LinearConv stores them.
        "dense_A_no_order_f32": LinearTensor((10, 16), to_stored(normal(604, (4, 16)), "float32"),
                                             (to_stored(normal(605, (4, 6)), "float32"),)),
        "low_rank_no_order": LinearTensor((9, 2, 3, 3), to_stored(normal(606, (5, 2, 3, 3)), "float16"),
                                          (to_stored(normal(607, (5, 2)), "float16"),
                                           to_stored(normal(608, (2, 4)), "float16"))),
    }


def stored(values: list[Any], dtype: str, shape: tuple[int, ...]) -> Stored:
    """Exact stored numbers (no encoder), e.g. a -0.0 an encoder would never write on purpose."""
    return Stored(np.array(values, dtype=NUMPY_DTYPES[dtype]).reshape(shape), dtype)


#: Tensor -> flat indices of its decoded zeros that must be -0 (every other zero must be +0).
NEGATIVE_ZEROS = {"dct_k1": [], "dct_zero_table_entry": [], "series_k1": [],
                  "linear_primaries_copied": [2], "basis_ieee_sum": [0, 3]}


def signed_zero_file() -> dict[str, Entry]:
    """Zeros whose sign the spec fixes: a fixed-point sum that is zero is +0 (dct, series, linear
    combinations, even from -0 coefficients or -0 products); copies keep -0 (linear primaries);
    basis a*g + b is one IEEE product and sum, so -0 + -0 stays -0."""
    zero = -0.0
    return {
        "dct_k1": DCTTensor((4,), (0,), stored([zero], "float16", (1,))),
        # dct_table(3, 2)[1, 1] = cos(pi/2) is exactly 0: element 1 sums -0 * a_0 + -1 * 0.
        "dct_zero_table_entry": DCTTensor((3,), (0,), stored([zero, -1.0], "float32", (2,))),
        "series_k1": SeriesTensor((2, 3, 3), "cosine", ("cgl", "cgl"), stored([zero, zero], "bfloat16",
                                                                              (2, 1, 1))),
        "linear_primaries_copied": LinearTensor((3, 4), stored([-1.0, 2.0, zero, 0.0], "float32", (1, 4)),
                                                (stored([0.0, zero], "float32", (1, 2)),)),
        "basis_ieee_sum": BasisTensor((2, 2, 2), "signed_zero", stored([0.0, 1.0, -1.0, 0.0], "float16",
                                                                       (1, 2, 2)),
                                      stored([0, 0], "uint8", (2,)), stored([-1.0, 2.0], "float16", (2,)),
                                      stored([zero, 0.0], "float16", (2,))),
    }


def codes(values: list[int], dtype: str, step: float, shape: tuple[int, ...] | None = None,
          dq: bool = False) -> Stored:
    """Exact quantised numbers: integer codes and their step (format 1.2; ``dq``: dependent, 1.7)."""
    data = np.array(values, dtype=NUMPY_DTYPES[dtype])
    return Stored(data if shape is None else data.reshape(shape), dtype, step, dq)


def quant_file() -> dict[str, Entry]:
    """Format 1.2, quantised numbers (int8/int16 codes times a float32 step): every number array
    of every form from the encoders (absolute ``step`` and per-array ``rel_step``), a quantised
    dense float32 tensor; by hand, the extreme codes -128/127 and -32768/32767, products that
    round half to even (step 1 + 2^-23), subnormal products (step 2^-149), products near the
    float32 limit (step 2^112), and quantised and float arrays side by side."""
    shared = normal(801, (5, 3, 3))
    tie = float(np.float32(1 + 2.0 ** -23))
    return {
        "dct_step": (normal(802, (6, 4, 3, 3)) * 0.1, DCT(keep=0.2, step=2.0 ** -7)),
        "dct_rel_int16": (normal(803, (8, 6)), DCT(boundary=20, axes=(1,), rel_step=0.001)),
        "series_step": (normal(804, (4, 3, 3, 3)) * 0.1, Series("cosine", (3, 2), "cgl", step=0.01)),
        "basis_rel": (normal(805, (6, 3, 3, 3)), Basis(shared, bank_name="quant_bank", rel_step=0.02)),
        "linear_step": (normal(806, (8, 3, 3, 3)) * 0.1, Linear(alpha=0.5, step=0.004)),
        "linear_low_rank_rel": (normal(807, (10, 12)), Linear(primaries=4, rank=2, rel_step=0.01)),
        "dense_step": (normal(808, (4, 5)) * 0.1, Dense(step=0.003)),
        "dense_rel_int16": (normal(809, (3, 7)), Dense(rel_step=0.0005)),
        "dense_extreme_int8": DenseTensor(codes([-128, -127, -1, 0, 1, 127], "int8", 0.375), "float32"),
        "dense_extreme_int16": DenseTensor(codes([-32768, -32767, -129, 128, 32767], "int16",
                                                 float(np.float32(0.1))), "float32"),
        "dense_ties_to_even": DenseTensor(codes([1, 3, 5, -3, 7, 127], "int8", tie), "float32"),
        "dense_subnormal": DenseTensor(codes([1, 3, -2, 100, -32768], "int16", 2.0 ** -149), "float32"),
        "dense_near_float32_max": DenseTensor(codes([-32768, 32767, 1], "int16", 2.0 ** 112), "float32"),
        "linear_quantised_and_float": LinearTensor((3, 2), codes([3, -5], "int8", 0.25, (1, 2)),
                                                   (to_stored(np.array([[0.5, -1.5]], np.float32), "float16"),)),
    }


def dq_file() -> dict[str, Entry]:
    """Format 1.7, dependent-quantised numbers (``dq_step``, FORMAT.md 3.2): every number array
    of every form from the encoders (``dq=True`` with ``step``, ``rel_step``, ``rd`` 0, 0.3 and the
    default 0.5), the
    grid example of section 3.2, rows that restart the state machine (a dense tensor of 3 rows
    whose rows hold the same codes), a 1-D array as one row (dct coefficients); by hand, the
    extreme codes -128/127 and -32768/32767 on both grids, subnormal products (step 2^-149)
    and levels of 2^16 near the float32 limit (step 2^111)."""
    shared = normal(811, (5, 3, 3))
    row = [1, 1, 2, -1, 3, -128, 127, -128, 127, 0, -1]
    return {
        "dct_dq": (normal(812, (6, 4, 3, 3)) * 0.1, DCT(keep=0.2, step=2.0 ** -8, dq=True)),
        "series_dq_rel": (normal(813, (4, 3, 3, 3)) * 0.1, Series("cosine", (3, 2), "cgl", rel_step=0.01, dq=True)),
        "basis_dq": (normal(814, (6, 3, 3, 3)), Basis(shared, bank_name="dq_bank", rel_step=0.02, dq=True)),
        "linear_dq_low_rank": (normal(815, (10, 12)), Linear(primaries=4, rank=2, rel_step=0.01, dq=True)),
        "dense_dq": (normal(816, (8, 3, 3, 3)) * 0.1, Dense(step=0.002, dq=True)),
        "dense_dq_least_error": (normal(818, (8, 3, 3, 3)) * 0.1, Dense(step=0.002, dq=True, rd=0)),
        "dense_dq_rd_int16": (normal(817, (6, 40)), Dense(step=2.0 ** -10, dq=True, rd=0.3)),
        "dense_grid_example": DenseTensor(codes(row, "int8", 0.5, None, True), "float32"),
        "dense_rows_restart": DenseTensor(codes(row * 3, "int8", 0.25, (3, len(row)), True), "float32"),
        "dense_extreme_int16": DenseTensor(codes([-32768, 32767, -32768, 32767, 1, -32768], "int16",
                                                 float(np.float32(0.1)), None, True), "float32"),
        "dense_subnormal": DenseTensor(codes([1, 3, -2, 100, -32768], "int16", 2.0 ** -149, None, True), "float32"),
        "dense_near_float32_max": DenseTensor(codes([1, -32768, 32767, 1], "int16", 2.0 ** 111, None, True),
                                              "float32"),
    }


def shuffle_file() -> dict[str, Entry]:
    """Format 1.2, codec ``zstd-shuffle`` (byte planes, then one zstd frame), which the writer
    picks where it is the smallest: int16 codes (quantised dense and dct) and int32 numbers
    (zigzag-mapped before the planes), float16, bfloat16, float32, float64 and uint16 arrays
    of 256 to 1024 elements; an int32 array that repeats a block of 37 numbers, which plain
    zstd packs smaller (one match per repeat, where the planes need four)."""
    rng = np.random.default_rng(900)
    return {
        "dense_int16_codes": (normal(901, (16, 64)), Dense(rel_step=0.01)),
        "dct_int16_codes": (normal(902, (8, 8, 3, 3)), DCT(keep=0.5, rel_step=0.005)),
        "dense_float16_scales": (rng.uniform(1, 2, (32, 32)).astype(np.float16), Dense()),  # like norm scales
        "dense_float32_as_bfloat16": (normal(904, (32, 32)), Dense("bfloat16")),
        "dense_float32": (normal(905, (16, 64)) * 0.05, Dense()),
        "dense_float64": (rng.standard_normal(256), Dense()),
        "dense_int32": (rng.integers(-1000, 1000, 512, dtype=np.int32), Dense()),
        "dense_uint16": (rng.integers(0, 300, 512, dtype=np.uint16), Dense()),
        "dense_int32_repeating": (np.resize((np.arange(37, dtype=np.int64) * 2654435761 % 2**32 - 2**31)
                                            .astype(np.int32), 512), Dense()),
    }


def laplace_codes(seed: int, size: int, scale: float, dtype: str) -> np.ndarray:
    """Integer codes of a Laplacian of ``scale`` (weights quantised at a step), clipped to ``dtype``."""
    info = np.iinfo(dtype)
    values = np.rint(np.random.default_rng(seed).laplace(0.0, scale, size))
    return np.clip(values, info.min, info.max).astype(dtype)


def dense_codes(values: np.ndarray, step: float | None = None) -> DenseTensor:
    """A dense tensor of integer elements, or of quantised numbers when ``step`` is given."""
    dtype = str(values.dtype)
    return DenseTensor(Stored(values, dtype, step), "float32" if step is not None else dtype)


def rans_file() -> dict[str, Entry]:
    """Format 1.3, codec ``rans`` (FORMAT.md 2.1) on every array of int8, int16, uint8 and
    uint16 (forced, even where another codec is smaller): quantised Laplacian codes of several
    widths (scales 0.3 to 300), all zeros, a single nonzero symbol, uniform uint8 and uint16
    values, escapes (int16 codes with outliers at -32768 and 32767, a uint8 array with 255s),
    tiny arrays of 1 and 2 elements, one lane and many lanes, dct coefficients and a basis
    index."""
    outliers = laplace_codes(1206, 1500, 3.0, "int16")
    outliers[[10, 700, 1499]] = [-32768, 32767, 12345]
    return {
        "laplace_int8": dense_codes(laplace_codes(1201, 2000, 4.0, "int8"), 2.0 ** -7),
        "laplace_int8_peaked": dense_codes(laplace_codes(1202, 3000, 0.3, "int8"), 2.0 ** -6),
        "laplace_int16_wide": dense_codes(laplace_codes(1203, 1200, 300.0, "int16"), 2.0 ** -12),
        "laplace_int16_narrow": dense_codes(laplace_codes(1204, 1024, 1.5, "int16"), 0.375),
        "int16_outliers": dense_codes(outliers, 2.0 ** -10),
        "zeros_int16": dense_codes(np.zeros((40, 50), np.int16), 0.5),
        "single_symbol_int8": dense_codes(np.full(700, -7, np.int8), 0.25),
        "uniform_uint8": dense_codes(np.random.default_rng(1207).integers(0, 256, 1024).astype(np.uint8)),
        "uint8_with_255": dense_codes(np.resize(np.array([0, 1, 1, 2, 255], np.uint8), 600)),
        "uniform_uint16": dense_codes(np.random.default_rng(1208).integers(0, 1000, 512).astype(np.uint16)),
        "tiny_int8_1": dense_codes(np.array([-3], np.int8), 0.5),
        "tiny_int16_2": dense_codes(np.array([-32768, 32767], np.int16), 2.0 ** -15),
        "tiny_uint8_2": dense_codes(np.array([7, 7], np.uint8)),
        "tiny_uint16_1": dense_codes(np.array([65535], np.uint16)),
        "dct_codes": (normal(1209, (8, 8, 3, 3)), DCT(keep=0.3, rel_step=0.02)),
        "basis_index": (normal(1210, (16, 4, 3, 3)), Basis(8, bank_name="rans_bank", seed=0)),
    }


def rans_large_file() -> dict[str, Entry]:
    """Format 1.3, codec ``rans`` on arrays of 100k+ elements (about a hundred lanes): peaked int8
    codes of a Laplacian of scale 0.25 (120,000) and uint16 zeros (100,003: the last step
    has fewer lanes than the others)."""
    return {
        "large_laplace_int8": dense_codes(laplace_codes(1301, 120_000, 0.25, "int8"), 2.0 ** -8),
        "large_zeros_uint16": dense_codes(np.zeros(100_003, np.uint16)),
    }


def channel_codes(seed: int, rows: int, columns: int, scales: tuple[float, float], dtype: str) -> np.ndarray:
    """Laplacian codes whose scale grows geometrically from row to row (a weight's output
    channels after batch-norm folding), clipped to ``dtype``; absolute values if unsigned."""
    info = np.iinfo(dtype)
    scale = np.geomspace(*scales, rows)[:, None]
    values = np.rint(np.random.default_rng(seed).laplace(0.0, 1.0, (rows, columns)) * scale)
    values = np.abs(values) if info.min == 0 else values
    return np.clip(values, info.min, info.max).astype(dtype)


def rans_ctx_file() -> dict[str, Entry]:
    """Format 1.5, codec ``rans-ctx`` (FORMAT.md 2.3) on every array of int8, int16, uint8 and
    uint16 (forced, even where another codec is smaller): rows of channel scales from 0.5 to
    2000 (several row classes, tokens with extra bits up to exponent 15), one-row and 1-D
    arrays (one class), Laplacian codes of scales 0.3 to 300, all zeros, a single symbol,
    uniform uint8 and uint16 values, the extremes -32768 and 32767, tiny arrays of 1 and 2
    elements, one lane and a few."""
    extremes = laplace_codes(1506, 1500, 3.0, "int16")
    extremes[[10, 700, 1499]] = [-32768, 32767, 12345]
    return {
        "channels_int16": dense_codes(channel_codes(1501, 64, 72, (0.5, 2000.0), "int16"), 2.0 ** -12),
        "channels_int8": dense_codes(channel_codes(1502, 32, 27, (0.3, 40.0), "int8"), 2.0 ** -7),
        "channels_uint8": dense_codes(channel_codes(1503, 24, 50, (1.0, 60.0), "uint8")),
        "channels_uint16": dense_codes(channel_codes(1504, 16, 64, (2.0, 900.0), "uint16")),
        "laplace_int8_peaked": dense_codes(laplace_codes(1507, 3000, 0.3, "int8"), 2.0 ** -6),
        "laplace_int16_wide": dense_codes(laplace_codes(1508, 1200, 300.0, "int16"), 2.0 ** -12),
        "int16_extremes": dense_codes(extremes, 2.0 ** -10),
        "zeros_int16": dense_codes(np.zeros((40, 50), np.int16), 0.5),
        "single_symbol_int8": dense_codes(np.full((7, 100), -7, np.int8), 0.25),
        "uniform_uint8": dense_codes(np.random.default_rng(1509).integers(0, 256, (8, 128)).astype(np.uint8)),
        "uniform_uint16": dense_codes(np.random.default_rng(1510).integers(0, 65536, 512).astype(np.uint16)),
        "tiny_int8_1": dense_codes(np.array([-3], np.int8), 0.5),
        "tiny_int16_2": dense_codes(np.array([[-32768], [32767]], np.int16), 2.0 ** -15),
        "tiny_uint8_2": dense_codes(np.array([7, 200], np.uint8)),
        "tiny_uint16_1": dense_codes(np.array([65535], np.uint16)),
    }


def rans_ctx_large_file() -> dict[str, Entry]:
    """Format 1.5, codec ``rans-ctx`` on an array of 100,000 elements (about a hundred lanes,
    16 row classes): int8 codes of 400 rows of channel scales from 0.001 to 2."""
    return {"large_channels_int8": dense_codes(channel_codes(1505, 400, 250, (0.001, 2.0), "int8"), 2.0 ** -9)}


#: NaNs of the 2-byte float dtypes, both signs, signalling (quiet bit clear) and quiet, several
#: payloads, then +-inf and 1.0: 15 patterns, a "short" array (fewer than 16 elements).
NAN_PATTERNS = {
    "float16": [0x7C01, 0xFC01, 0x7D55, 0xFCAA, 0x7DFF, 0xFDFF, 0x7E00, 0xFE00, 0x7E01, 0xFF55,
                0x7FFF, 0xFFFF, 0x7C00, 0xFC00, 0x3C00],
    "bfloat16": [0x7F81, 0xFF81, 0x7F95, 0xFFAA, 0x7FBF, 0xFFBF, 0x7FC0, 0xFFC0, 0x7FC1, 0xFFD5,
                 0x7FFF, 0xFFFF, 0x7F80, 0xFF80, 0x3F80],
}
#: float32 NaNs and limits an encoder narrows (FORMAT.md 3, "Narrowing"): payloads only in the
#: low bits (0x7F800001 would carry into the exponent, or lose every payload bit), both signs.
NARROWED_NANS = [0x7F800001, 0xFF800001, 0x7F802000, 0xFFA00000, 0x7FC00000, 0xFFC00001, 0x7FFFFFFF,
                 0xFFFFFFFF, 0x7F800000, 0xFF800000, 0x3F800000, 0x477FE000, 0x80000000]
#: A "long" array: beyond 4096 elements, the sizes at which backends switch to vectorised loops.
LONG = 4103


def nan_bits(dtype: str, size: int, seed: int) -> Stored:
    """Stored float16/bfloat16 bits with every NaN pattern: the patterns themselves when short;
    when long, small numbers (compressible) with each pattern at 16 random places and the
    patterns again at the end (the loop remainder)."""
    patterns = np.array(NAN_PATTERNS[dtype], dtype=np.uint16)
    if size <= len(patterns):
        bits = patterns[:size]
    else:
        rng = np.random.default_rng(seed)
        numbers = (rng.integers(-64, 64, size) / 16).astype(np.float32)
        bits = to_stored(numbers, dtype).data.view(np.uint16).copy()
        spots = rng.choice(size - len(patterns), 16 * len(patterns), replace=False)
        bits[spots] = np.resize(patterns, len(spots))
        bits[-len(patterns):] = patterns
    return Stored(bits.view(NUMPY_DTYPES[dtype]), dtype)


def nan_file() -> dict[str, Entry]:
    """NaN payloads (FORMAT.md 3, "Widening to float32"): float16 and bfloat16 data with quiet and
    signalling NaNs of both signs and several payloads, short (15 elements) and long (4103),
    widened exactly to float32 (a signalling NaN stays signalling; torch's cast alone would
    quiet it) and copied as they are; float32 NaNs narrowed by the encoder to quiet NaNs that
    keep sign and top payload bits. Compressed forms refuse NaN (FORMAT.md 3): dense only."""
    tensors: dict[str, Entry] = {}
    for seed, dtype in enumerate(NAN_PATTERNS):
        for length, size in (("short", len(NAN_PATTERNS[dtype])), ("long", LONG)):
            tensors[f"{dtype}_{length}_as_float32"] = DenseTensor(nan_bits(dtype, size, 1100 + seed),
                                                                  "float32")
        tensors[f"{dtype}_short"] = DenseTensor(nan_bits(dtype, len(NAN_PATTERNS[dtype]), 0), dtype)
        tensors[f"float32_as_{dtype}"] = (np.array(NARROWED_NANS, dtype=np.uint32).view(np.float32),
                                          Dense(dtype))
    return tensors


def mixed_file() -> dict[str, Entry]:
    """A small model: every form side by side, names in non-sorted order, as save() writes them."""
    return {
        "features.0.weight": (normal(701, (4, 3, 3, 3)), Series("cosine", 2)),
        "features.0.bias": (normal(702, (4,)), Dense()),
        "features.3.weight": (normal(703, (8, 4, 3, 3)), Linear(alpha=0.5)),
        "features.3.dw.weight": (normal(704, (8, 1, 3, 3)), Basis(4, bank_name="dw")),
        "classifier.weight": (normal(705, (10, 32)), DCT(boundary=40)),
        "classifier.bias": (normal(706, (10,)), Dense("float16")),
        "num_batches_tracked": (np.array(7, dtype=np.int64), Dense()),
    }


@dataclass(frozen=True)
class VectorFile:
    name: str
    description: str
    tensors: Callable[[], dict[str, Entry]]
    metadata: tuple[tuple[str, str], ...] = ()
    #: The minor format version the file is written for: the writer may use its codecs only
    #: (so a file of 1.0 stays 1.0, not 1.2 because zstd-shuffle saved a few bytes).
    minor: int = 0
    #: A codec written on every array that takes it, even where another is smaller (so that
    #: the vectors of a codec cover arrays it would lose on: tiny and uniform ones).
    force: str | None = None


FILES = (
    VectorFile("dense.kpk", dense_file.__doc__ or "", dense_file),
    VectorFile("dct.kpk", dct_file.__doc__ or "", dct_file),
    VectorFile("series.kpk", series_file.__doc__ or "", series_file),
    VectorFile("basis.kpk", basis_file.__doc__ or "", basis_file),
    VectorFile("basis_uint16.kpk", basis_uint16_file.__doc__ or "", basis_uint16_file),
    VectorFile("linear.kpk", linear_file.__doc__ or "", linear_file),
    VectorFile("mixed.kpk", mixed_file.__doc__ or "", mixed_file,
               (("source", "kernelpack spec/vectors"), ("note", "unicode µ ✓"))),
    VectorFile("signed_zero.kpk", signed_zero_file.__doc__ or "", signed_zero_file),
    VectorFile("empty.kpk", "No tensors: metadata only.", dict, (("empty", "true"),)),
    VectorFile("quant.kpk", quant_file.__doc__ or "", quant_file, minor=2),
    VectorFile("dq.kpk", dq_file.__doc__ or "", dq_file, minor=7),
    VectorFile("shuffle.kpk", shuffle_file.__doc__ or "", shuffle_file, minor=2),
    VectorFile("nan.kpk", nan_file.__doc__ or "", nan_file),
    VectorFile("rans.kpk", rans_file.__doc__ or "", rans_file, minor=3, force="rans"),
    VectorFile("rans_large.kpk", rans_large_file.__doc__ or "", rans_large_file, minor=3, force="rans"),
    VectorFile("rans_ctx.kpk", rans_ctx_file.__doc__ or "", rans_ctx_file, minor=5, force="rans-ctx"),
    VectorFile("rans_ctx_large.kpk", rans_ctx_large_file.__doc__ or "", rans_ctx_large_file, minor=5,
               force="rans-ctx"),
)


@contextlib.contextmanager
def forced(codec: str | None) -> Iterator[None]:
    """The writer with ``codec`` on every array whose stored dtype it takes (``rans`` or
    ``rans-ctx``, the entropy codecs)."""
    if codec is None:
        yield
        return
    assert codec in entropy.DECODERS
    choose = writer._compress  # the name write's _payload looks up

    def compress(raw: bytes, dtype: np.dtype, level: int, codecs: Any, name: str | None = None,
                 shape: Sequence[int] = ()) -> tuple[str, bytes]:
        if raw and name in entropy.DTYPES:
            return codec, entropy.encode_as(codec, np.frombuffer(raw, dtype=dtype), shape)
        return choose(raw, dtype, level, codecs, name, shape)

    writer._compress = compress
    try:
        yield
    finally:
        writer._compress = choose


# --- writing and recording ----------------------------------------------------------------
def build(vector: VectorFile) -> dict[str, Encoded]:
    """Encode every tensor of one file."""
    return {name: entry if isinstance(entry, Encoded) else encode(name, entry[0], entry[1])
            for name, entry in vector.tensors().items()}


def record(path: str, description: str) -> dict[str, Any]:
    """The manifest entry of a written file, from decoding it again (numpy, then torch CPU)."""
    from kernelpack._backend import TorchOps

    with open(path, "rb") as f:
        raw = f.read()
    tensors: dict[str, Any] = {}
    with Container(path) as c:
        c.check_padding()
        for name in c.keys():
            info = c.info(name)
            sha = digest(c.get_numpy(name), info.dtype)
            torch_sha = digest(TorchOps("cpu").to_numpy(c.get_tensor(name)), info.dtype)
            if not sha == torch_sha == info.digest:
                raise AssertionError(f"{path}: {name}: numpy, torch and header digests disagree")
            tensors[name] = {
                "form": info.form, "shape": list(info.shape), "dtype": info.dtype, "sha256": sha.hex(),
                "fields": info.fields, "arrays": {k: array_entry(r) for k, r in info.arrays.items()},
            }
        banks = {k: array_entry(r) for k, r in c.bank_info().items()}
        metadata, version = c.metadata(), list(c.version)
    return {"description": description, "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
            "version": version, "metadata": metadata, "banks": banks, "tensors": tensors}


def array_entry(ref: Any) -> dict[str, Any]:
    """A stored array in the manifest: dtype, shape, codec and, if quantised, its step (``dq_step``)."""
    entry = {"dtype": ref.spec.dtype, "shape": list(ref.spec.shape), "codec": ref.codec}
    return entry if ref.spec.step is None else {**entry, "dq_step" if ref.spec.dq else "step": ref.spec.step}


def check_coverage(manifest: dict[str, Any]) -> None:
    """The options the vectors promise are really in the files (an encoder change could drop one)."""
    tensors = {(f, n): t for f, entry in manifest["files"].items() for n, t in entry["tensors"].items()}
    codecs = {a["codec"] for t in tensors.values() for a in t["arrays"].values()}
    series = tensors[("series.kpk", "explicit_points_5x5_f32")]
    promises = {
        "every codec": codecs == set(CODECS),
        "zstd-shuffle on int16 codes, float16, float32": {
            a["dtype"] for (f, _), t in tensors.items() if f == "shuffle.kpk" for a in t["arrays"].values()
            if a["codec"] == "zstd-shuffle"} >= {"int16", "int32", "float16", "float32"},
        "plain zstd beside zstd-shuffle": "zstd" in {
            a["codec"] for a in manifest["files"]["shuffle.kpk"]["tensors"]["dense_int32_repeating"]["arrays"].values()},
        "uint16 index": tensors[("basis_uint16.kpk", "conv_uint16")]["arrays"]["index"]["dtype"] == "uint16",
        "order present": "order" in tensors[("linear.kpk", "dense_A_order")]["arrays"],
        "order absent": "order" not in tensors[("linear.kpk", "dense_A_no_order_f32")]["arrays"],
        "low rank": "A1" in tensors[("linear.kpk", "low_rank_order_bf16")]["arrays"],
        "s = 0": tensors[("linear.kpk", "all_primaries_f32")]["arrays"]["A"]["shape"] == [5, 0],
        "explicit points": all(isinstance(p, list) for p in series["fields"]["points"]),
        "boundary 0": tensors[("dct.kpk", "boundary_0")]["fields"]["boundary"] == 0,
        "shared bank": tensors[("basis.kpk", "conv_a")]["fields"]["bank"]
        == tensors[("basis.kpk", "conv_b")]["fields"]["bank"],
        "int8 and int16 codes": {a["dtype"] for (f, _), t in tensors.items() if f == "quant.kpk"
                                 for a in t["arrays"].values() if "step" in a} == {"int8", "int16"},
        "every form quantised": {t["form"] for (f, _), t in tensors.items() if f == "quant.kpk"
                                 and any("step" in a for a in t["arrays"].values())} == set(FORMS),
        "quantised bank": "step" in manifest["files"]["quant.kpk"]["banks"]["quant_bank"],
        "every form dependent-quantised": {t["form"] for (f, _), t in tensors.items() if f == "dq.kpk"
                                           and any("dq_step" in a for a in t["arrays"].values())} == set(FORMS),
        "dq: int8 and int16 codes": {a["dtype"] for (f, _), t in tensors.items() if f == "dq.kpk"
                                     for a in t["arrays"].values() if "dq_step" in a} == {"int8", "int16"},
        "dependent-quantised bank": "dq_step" in manifest["files"]["dq.kpk"]["banks"]["dq_bank"],
        "each file is the version it is written for": all(
            manifest["files"][v.name]["version"] == [1, v.minor] for v in FILES),
    }
    broken = [k for k, ok in promises.items() if not ok]
    if broken:
        raise AssertionError(f"the vectors no longer cover: {broken}")


def check_signed_zeros(folder: str) -> None:
    """The decoded zeros of signed_zero.kpk carry exactly the signs NEGATIVE_ZEROS lists."""
    with Container(os.path.join(folder, "signed_zero.kpk")) as c:
        for name, negative in NEGATIVE_ZEROS.items():
            flat = c.get_numpy(name).reshape(-1)
            found = np.flatnonzero((flat == 0) & np.signbit(flat)).tolist()
            if found != negative or not np.any(flat == 0):
                raise AssertionError(f"signed_zero.kpk: {name}: -0 at {found}, expected {negative}")


def check_uint16_indices(folder: str) -> None:
    """The uint16 vector really uses indices above 255 (not only a wide dtype)."""
    with Container(os.path.join(folder, "basis_uint16.kpk")) as c:
        index = c.encoded("conv_uint16").arrays()["index"].data
    if int(index.max()) < 256:
        raise AssertionError("basis_uint16.kpk: no bank index above 255")


def widened_nan_bits(stored: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 bits of stored float16/bfloat16 NaNs by FORMAT.md 3 (integers only, no cast)."""
    h = stored.view(np.uint16).astype(np.uint32)
    if dtype == "bfloat16":
        return h << 16
    return ((h & 0x8000) << 16) | 0x7F800000 | ((h & 0x3FF) << 13)


def narrowed_nan_bits(bits: np.ndarray, dtype: str) -> np.ndarray:
    """The stored bits an encoder writes for float32 NaNs by FORMAT.md 3, "Narrowing"."""
    if dtype == "bfloat16":
        return (bits >> 16) | 0x0040
    return ((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x1FF)


def check_nans(folder: str) -> None:
    """nan.kpk holds what it promises: quiet and signalling NaNs of both signs in short and long
    arrays of each dtype, widened by the spec's rule, and float32 NaNs narrowed by its rule."""
    with Container(os.path.join(folder, "nan.kpk")) as c:
        for dtype, quiet in (("float16", 0x0200), ("bfloat16", 0x0040)):
            inf = {"float16": 0x7C00, "bfloat16": 0x7F80}[dtype]
            for length in ("short", "long"):
                name = f"{dtype}_{length}_as_float32"
                stored = c.encoded(name).arrays()["data"].data.view(np.uint16)
                nan = (stored & 0x7FFF) > inf
                kinds = {(bool(h & 0x8000), bool(h & quiet)) for h in stored[nan].tolist()}
                long = stored.size > 4096
                if kinds != {(s, q) for s in (False, True) for q in (False, True)} \
                        or long != (length == "long") or (stored.size < 16) == long:
                    raise AssertionError(f"nan.kpk: {name} lacks a kind of NaN or has the wrong length")
                decoded = c.get_numpy(name).view(np.uint32)
                if not np.array_equal(decoded[nan], widened_nan_bits(stored[nan], dtype)):
                    raise AssertionError(f"nan.kpk: {name}: NaNs not widened as FORMAT.md 3 says")
            source = np.array(NARROWED_NANS, dtype=np.uint32)
            nan = (source & 0x7FFFFFFF) > 0x7F800000
            written = c.encoded(f"float32_as_{dtype}").arrays()["data"].data.view(np.uint16)
            if not np.array_equal(written[nan], narrowed_nan_bits(source[nan], dtype)):
                raise AssertionError(f"nan.kpk: float32_as_{dtype}: NaNs not narrowed as FORMAT.md 3 says")


def rans_fields(body: bytes) -> tuple[int, int, int, int]:
    """precision, symbols K, lanes N and escapes E of a rans payload (FORMAT.md 2.1)."""
    reader = entropy._Reader(body)
    precision = reader.take(1, "precision")[0]
    return (precision, reader.varint("symbols", 0, 1 << 16), reader.varint("lanes", 1, 1 << 31),
            reader.varint("escapes", 0, 1 << 31))


def check_rans(folder: str) -> None:
    """The rans vectors hold what they promise: every int8/int16/uint8/uint16 array is rans,
    every such dtype occurs, with escapes, with one lane and with hundreds, at several
    precisions, in arrays of 1, 2 and 100,000+ elements."""
    fields, dtypes, sizes = [], set(), set()
    for name in ("rans.kpk", "rans_large.kpk"):
        with Container(os.path.join(folder, name)) as c:
            refs = [r for n in c.keys() for r in c.info(n).arrays.values()] + list(c.bank_info().values())
            for ref in refs:
                if ref.spec.dtype not in entropy.DTYPES:
                    continue
                if ref.codec != "rans":
                    raise AssertionError(f"{name}: a {ref.spec.dtype} array is {ref.codec}, not rans")
                fields.append(rans_fields(c._read(ref.length, c._data_start + ref.offset)))
                dtypes.add(ref.spec.dtype)
                sizes.add(ref.spec.size)
    precisions, lanes = {f[0] for f in fields}, {f[2] for f in fields}
    if not (dtypes == entropy.DTYPES and any(f[3] for f in fields) and 1 in lanes and max(lanes) >= 64
            and len(precisions) >= 3 and {1, 2} <= sizes and max(sizes) >= 100_000):
        raise AssertionError(f"the rans vectors no longer cover their promises: {dtypes} {fields}")


def rans_ctx_fields(body: bytes) -> dict[str, int]:
    """precision, split, msb, classes, rows, lanes and extra length of a rans-ctx payload
    (FORMAT.md 2.3)."""
    reader = entropy._Reader(body)
    precision, split, msb, classes = reader.take(4, "head")
    rows, lanes = reader.varint("rows", 1, 1 << 31), reader.varint("lanes", 1, 1 << 31)
    reader.take(-(-rows * (classes - 1).bit_length() // 8), "row classes")
    return {"precision": precision, "split": split, "msb": msb, "classes": classes, "rows": rows, "lanes": lanes}


def check_rans_ctx(folder: str) -> None:
    """The rans-ctx vectors hold what they promise: every int8/int16/uint8/uint16 array is
    rans-ctx, every such dtype occurs, with 1 and with 16 row classes, one lane and about a
    hundred, several splits and msb counts, in arrays of 1, 2 and 100,000 elements."""
    fields, dtypes, sizes = [], set(), set()
    for name in ("rans_ctx.kpk", "rans_ctx_large.kpk"):
        with Container(os.path.join(folder, name)) as c:
            for ref in (r for n in c.keys() for r in c.info(n).arrays.values()):
                if ref.codec != "rans-ctx":
                    raise AssertionError(f"{name}: a {ref.spec.dtype} array is {ref.codec}, not rans-ctx")
                fields.append(rans_ctx_fields(c._read(ref.length, c._data_start + ref.offset)))
                dtypes.add(ref.spec.dtype)
                sizes.add(ref.spec.size)
    seen = {key: {f[key] for f in fields} for key in fields[0]}
    if not (dtypes == entropy.DTYPES and {1, 16} <= seen["classes"] and 1 in seen["lanes"]
            and max(seen["lanes"]) >= 64 and len(seen["split"]) >= 3 and len(seen["msb"]) >= 2
            and {1, 2, 100_000} <= sizes):
        raise AssertionError(f"the rans-ctx vectors no longer cover their promises: {dtypes} {seen} {sizes}")


def generate(folder: str) -> dict[str, Any]:
    """Write every vector file and manifest.json into ``folder``; return the manifest."""
    os.makedirs(folder, exist_ok=True)
    files: dict[str, Any] = {}
    for vector in FILES:
        path = os.path.join(folder, vector.name)
        with forced(vector.force):
            write(path, build(vector), dict(vector.metadata), level=LEVEL, codecs=codecs_of(vector.minor),
                  compact=False)
        files[vector.name] = record(path, " ".join(vector.description.split()))
        if files[vector.name]["size"] > MAX_FILE_BYTES:
            raise AssertionError(f"{vector.name} is {files[vector.name]['size']} bytes; keep vectors small")
    total = sum(f["size"] for f in files.values())
    if total > MAX_TOTAL_BYTES:
        raise AssertionError(f"the vectors take {total} bytes; the limit is {MAX_TOTAL_BYTES}")
    manifest = {"format_version": [1, 5], "generator": "spec/vectors/generate.py", "files": files}
    check_coverage(manifest)
    check_uint16_indices(folder)
    check_signed_zeros(folder)
    check_nans(folder)
    check_rans(folder)
    check_rans_ctx(folder)
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=HERE, help="folder to write into (default: next to this script)")
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary folder and compare with --out byte for byte")
    args = parser.parse_args(argv)
    if not args.check:
        manifest = generate(args.out)
        print(f"wrote {len(manifest['files'])} files and {MANIFEST} to {args.out}")
        return 0
    names = [v.name for v in FILES] + [MANIFEST]
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp)
        _, mismatch, errors = filecmp.cmpfiles(args.out, tmp, names, shallow=False)
    for name in mismatch + errors:
        print(f"differs: {name}")
    print("identical" if not mismatch + errors else "NOT identical")
    return 1 if mismatch + errors else 0


if __name__ == "__main__":
    sys.exit(main())
