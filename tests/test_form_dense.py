"""Form ``dense``: the tensor as it is. Any dtype round-trips bit for bit; a float32 tensor
may be stored as float16 or bfloat16 (rounded half to even) and decodes widened to float32."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kernelpack
from conftest import assert_same_bits, raw_bits, save_load, seeds, small_shape

NUMPY_DTYPES = ["float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "int64", "bool"]


def random_bits(seed: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Arbitrary bit patterns (NaN payloads, infinities, subnormals included)."""
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    itemsize = np.dtype(dtype).itemsize
    raw = rng.integers(0, 256, size=(*shape, itemsize), dtype=np.uint8)
    return np.ascontiguousarray(raw).view(dtype).reshape(shape)


def tricky_float32(seed: int) -> np.ndarray:
    """Normal, huge, tiny and subnormal values, halfway cases of both narrow formats, NaN, inf."""
    rng = np.random.default_rng(seed)
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F801000, 0x3F803000, 0x7F7FFFFF,
                     0x00000001, 0x80000001, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7FFFFFFF,
                     0xFFFFFFFF, 0x7F800001, 0x80000000], dtype=np.uint32).view(np.float32)
    values = np.ldexp(rng.standard_normal(200), rng.integers(-30, 20, 200))
    return np.concatenate([ties, values.astype(np.float32)]).reshape(-1, 5)


def same_up_to_nan_payload(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal bits, except that any NaN matches any NaN."""
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    np.testing.assert_array_equal(raw_bits(actual)[~nan], raw_bits(expected)[~nan])


@given(st.sampled_from(NUMPY_DTYPES), small_shape(1, 4, max_dim=4) | st.sampled_from([(0,), (3, 0, 2)]),
       seeds)
def test_any_dtype_round_trips_bit_for_bit(dtype: str, shape: tuple[int, ...], seed: int) -> None:
    array = random_bits(seed, shape, dtype)
    assert_same_bits(save_load({"t": array})["t"], array)


@pytest.mark.parametrize("dtype", ["float32", "int64", "bool"])
def test_a_scalar_stays_a_scalar(dtype: str) -> None:
    array = random_bits(0, (), dtype)
    assert_same_bits(save_load({"t": array})["t"], array)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_torch_backend_decodes_the_same_bits(tmp_path: os.PathLike, dtype: str) -> None:
    array = random_bits(1, (3, 4), dtype)
    path = tmp_path / "dense.kpk"
    kernelpack.save({"t": array}, path)
    decoded = kernelpack.load(path)["t"]
    assert decoded.dtype == torch.from_numpy(array).dtype
    assert_same_bits(decoded, array)


def test_float32_stored_as_float16_decodes_to_the_rounded_value() -> None:
    array = tricky_float32(2)
    with np.errstate(over="ignore"):  # values beyond 65504 become infinities, as they should
        decoded = save_load({"t": array}, forms={"t": kernelpack.Dense(dtype="float16")})["t"]
        expected = array.astype(np.float16).astype(np.float32)
    assert decoded.dtype == np.float32
    same_up_to_nan_payload(decoded, expected)


def test_float32_stored_as_bfloat16_rounds_half_to_even_like_torch() -> None:
    array = tricky_float32(3)
    decoded = save_load({"t": array}, forms={"t": kernelpack.Dense(dtype="bfloat16")})["t"]
    assert decoded.dtype == np.float32
    same_up_to_nan_payload(decoded, torch.from_numpy(array).to(torch.bfloat16).float().numpy())


def test_narrow_data_stored_as_it_is_keeps_its_dtype(tmp_path: os.PathLike) -> None:
    array = np.linspace(-2, 2, 12, dtype=np.float16).reshape(3, 4)
    path = tmp_path / "f16.kpk"
    kernelpack.save({"t": array}, path, forms={"t": kernelpack.Dense(dtype="float16")})
    with kernelpack.open(path) as c:
        assert c.info("t").dtype == "float16"
        assert_same_bits(c.get_numpy("t"), array)
