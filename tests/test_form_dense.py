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
from kernelpack.forms import DenseTensor
from kernelpack.forms._base import FINITE_MAX, Stored
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


def within(array: np.ndarray, dtype: str) -> np.ndarray:
    """``array`` with each finite value beyond ``dtype``'s largest finite number replaced by that
    number (sign kept): what a narrowing may store without refusing. NaN and inf stay."""
    limit = np.float32(FINITE_MAX[dtype])
    return np.where(np.isfinite(array) & (np.abs(array) > limit), np.copysign(limit, array), array)


def test_float32_stored_as_float16_decodes_to_the_rounded_value() -> None:
    array = within(tricky_float32(2), "float16")
    decoded = save_load({"t": array}, forms={"t": kernelpack.Dense(dtype="float16")})["t"]
    assert decoded.dtype == np.float32
    same_up_to_nan_payload(decoded, array.astype(np.float16).astype(np.float32))


def test_float32_stored_as_bfloat16_rounds_half_to_even_like_torch() -> None:
    array = within(tricky_float32(3), "bfloat16")
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


# --- nothing lost on write (spec/FORMAT.md 3, "Widening to float32" and "Narrowing") ----------
# (the narrowing rules every form shares are in test_narrowing.py)
@pytest.mark.parametrize("dtype, largest", [("float16", 65520.0), ("float16", -1e5), ("bfloat16", 3.4e38)])
def test_a_finite_value_beyond_the_dtype_is_refused_beside_inf_and_nan(tmp_path: os.PathLike, dtype: str,
                                                                       largest: float) -> None:
    """Not stored as infinity: the error names the tensor, the field, the largest magnitude
    and the dtype's largest finite number, and no file is written."""
    array = np.array([1.0, largest / 2, largest, np.inf, np.nan], dtype=np.float32)
    path = tmp_path / "big.kpk"
    with pytest.raises(kernelpack.KernelpackError) as error:
        kernelpack.save({"fc.bias": array}, path, forms=kernelpack.Dense(dtype=dtype))
    message = str(error.value)
    assert (error.value.tensor, error.value.field) == ("fc.bias", "dtype")
    assert f"{abs(float(np.float32(largest))):.9g}" in message and f"{FINITE_MAX[dtype]:.9g}" in message
    assert "dtype=float32" in message
    assert not os.path.exists(path)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_infinities_nans_and_the_largest_finite_value_are_stored(dtype: str) -> None:
    """Only a finite value turned infinite is loss: input infinities and NaNs are stored, and a
    value that rounds down to the largest finite number is kept."""
    limit = FINITE_MAX[dtype]
    rounds_down = 65519.0 if dtype == "float16" else limit * 1.001
    array = np.array([np.inf, -np.inf, np.nan, limit, -limit, rounds_down], dtype=np.float32)
    decoded = save_load({"t": array}, forms={"t": kernelpack.Dense(dtype=dtype)})["t"]
    np.testing.assert_array_equal(decoded[:5], np.array([np.inf, -np.inf, np.nan, limit, -limit], np.float32))
    assert decoded[5] == limit


def nan_heavy_bits(seed: int, size: int) -> np.ndarray:
    """float16 bit patterns, a third of them NaNs of every sign, payload and kind."""
    rng = np.random.default_rng(seed)
    bits = random_bits(seed, (size,), "float16").view(np.uint16).copy()
    spots = rng.random(size) < 1 / 3
    count = int(spots.sum())
    bits[spots] = (rng.integers(0, 2, count) << 15) | 0x7C00 | rng.integers(1, 0x400, count)
    return bits


@pytest.mark.parametrize("size", [5, 15, 4097, 20000])
def test_save_then_verify_with_torch_passes_for_nan_payloads(tmp_path: os.PathLike, size: int) -> None:
    """A file kernelpack.save wrote verifies with torch as with numpy: float16 data (signalling
    NaNs included) decoded as it is and widened to float32, and float32 NaNs stored narrower."""
    f16 = nan_heavy_bits(size, size).view(np.float16)
    tensors = {"as_is": f16, "widened": DenseTensor(Stored(f16, "float16"), "float32"),
               "narrowed": f16.astype(np.float32), "narrowed_bf16": f16.astype(np.float32)}
    path = tmp_path / "nan.kpk"
    kernelpack.save(tensors, path, forms={"narrowed": kernelpack.Dense(dtype="float16"),
                                          "narrowed_bf16": kernelpack.Dense(dtype="bfloat16")})
    with kernelpack.open(path) as c:
        assert c.verify("numpy") == c.verify("torch") == {name: True for name in tensors}
        assert_same_bits(c.get_tensor("widened").numpy(), c.get_numpy("widened"))


def spec_widened(bits: np.ndarray) -> np.ndarray:
    """float16 bits -> float32 bits as spec/FORMAT.md section 3 says: numbers by value (numpy's
    cast, element by element), an all-ones exponent to sign | 0x7F800000 | payload << 13."""
    h = bits.astype(np.uint32)
    out = bits.view(np.float16).astype(np.float32).view(np.uint32).copy()
    special = (h & 0x7C00) == 0x7C00
    out[special] = ((h[special] & 0x8000) << 16) | 0x7F800000 | ((h[special] & 0x3FF) << 13)
    return out


@pytest.mark.parametrize("denormals_are_zero", [False, True])
def test_every_float16_bit_pattern_widens_as_the_spec_says(monkeypatch: pytest.MonkeyPatch,
                                                           denormals_are_zero: bool) -> None:
    """All 65536 patterns, in an array longer than one block and in a short one, on the
    rebiasing path and on the fallback a thread with denormals-are-zero takes."""
    from kernelpack import _backend

    if denormals_are_zero:  # what such a thread computes for the subnormal probe
        monkeypatch.setattr(_backend, "_TINY", np.zeros(1, dtype=np.float32))
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for bits in (np.tile(every, 3), every[:1000], every[::-1].reshape(256, 256)):
        got = _backend.float16_to_float32(bits.view(np.float16))
        assert got.shape == bits.shape and got.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint32), spec_widened(bits))
