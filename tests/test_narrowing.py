"""Narrowing numbers to a storage dtype loses nothing silently (spec/FORMAT.md 3, "Narrowing"):
a finite number that would round to infinity is refused by every form, the CLI included, and
a NaN narrows to a quiet NaN that keeps its sign and top payload bits."""

from __future__ import annotations

import os

import numpy as np
import pytest

import kernelpack
from kernelpack.cli import main
from kernelpack.forms._base import FINITE_MAX

#: Every form, storing its numbers in ``dtype``.
CONFIGS = {
    "dense": lambda dtype: kernelpack.Dense(dtype=dtype),
    "dct": lambda dtype: kernelpack.DCT(keep=0.5, dtype=dtype),
    "series": lambda dtype: kernelpack.Series(harmonics=2, dtype=dtype),
    "linear": lambda dtype: kernelpack.Linear(alpha=0.5, dtype=dtype),
    "basis": lambda dtype: kernelpack.Basis(4, dtype=dtype),
}


def too_large(dtype: str) -> np.ndarray:
    """Finite float32 weights whose stored numbers round to infinity in ``dtype`` in every form
    (float16: about 1e5; bfloat16: just below float32's largest number)."""
    rng = np.random.default_rng(1)
    low, high = (1e5, 2e5) if dtype == "float16" else (3.397e38, 3.4e38)
    return rng.uniform(low, high, (4, 4, 3, 3)).astype(np.float32)


@pytest.mark.filterwarnings("ignore::UserWarning")  # k-means of near-identical filters
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("form", sorted(CONFIGS))
def test_a_number_beyond_the_storage_dtype_is_refused(tmp_path: os.PathLike, form: str, dtype: str) -> None:
    path = tmp_path / "big.kpk"
    with pytest.raises(kernelpack.KernelpackError) as error:
        kernelpack.save({"conv.weight": too_large(dtype)}, path, forms=CONFIGS[form](dtype))
    assert (error.value.tensor, error.value.field) == ("conv.weight", "dtype")
    assert f"store as {dtype}" in str(error.value) and f"{FINITE_MAX[dtype]:.9g}" in str(error.value)
    assert not os.path.exists(path)


def test_the_cli_refuses_with_one_line_and_exit_2(tmp_path: os.PathLike,
                                                  capsys: pytest.CaptureFixture) -> None:
    """The README's own example, ``--form '*=dense:dtype=float16'``, on a value beyond 65504."""
    from safetensors.numpy import save_file

    source, out = str(tmp_path / "in.safetensors"), str(tmp_path / "out.kpk")
    save_file({"w": np.array([1.0, 7e4], dtype=np.float32)}, source)
    assert main(["pack", source, out, "--form", "*=dense:dtype=float16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kernelpack: error: ") and err.count("\n") == 1
    assert "tensor 'w'" in err and "70000" in err and "65504" in err
    assert not os.path.exists(out)


#: float32 NaNs (both signs, signalling, quiet, payloads only in the low bits) and what the
#: narrowing stores for them: a quiet NaN with the sign and the top payload bits.
NARROWED = {
    "float16": {0x7F800001: 0x7E00, 0xFF800001: 0xFE00, 0x7F802000: 0x7E01, 0xFFA00000: 0xFF00,
                0x7FC00000: 0x7E00, 0x7FFFFFFF: 0x7FFF, 0xFFFFFFFF: 0xFFFF},
    "bfloat16": {0x7F800001: 0x7FC0, 0xFF800001: 0xFFC0, 0x7F802000: 0x7FC0, 0xFFA00000: 0xFFE0,
                 0x7FC00000: 0x7FC0, 0x7FFFFFFF: 0x7FFF, 0xFFFFFFFF: 0xFFFF},
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("size", [7, 5000])
def test_a_nan_narrows_to_a_quiet_nan_keeping_sign_and_payload(dtype: str, size: int) -> None:
    source = np.resize(np.array(list(NARROWED[dtype]), dtype=np.uint32), size)
    stored = kernelpack.Dense(dtype=dtype).encode(source.view(np.float32), "float32").arrays()["data"]
    np.testing.assert_array_equal(stored.data.view(np.uint16),
                                  np.resize(np.array(list(NARROWED[dtype].values()), np.uint16), size))
