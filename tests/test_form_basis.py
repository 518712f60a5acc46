"""Form ``basis``: every filter slice is a * g + b for one filter g of a bank stored once per file."""

from __future__ import annotations

import math
import os

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import kernelpack
from conftest import NUMPY, assert_roundtrip, basis_cases, random_array, rel_error, unit_filters


def slices_of(array: np.ndarray, encoded: kernelpack.forms.BasisTensor) -> np.ndarray:
    return array.astype(np.float64).reshape(encoded.index.spec.shape[0], -1)


def fit_residuals(slices: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Least-squares residual of every slice (rows) against every filter (rows) as a * g + b."""
    fc = slices - slices.mean(axis=1, keepdims=True)
    gc = bank - bank.mean(axis=1, keepdims=True)
    norms = np.sum(gc**2, axis=1)
    explained = np.divide((fc @ gc.T) ** 2, norms, out=np.zeros((len(fc), len(gc))), where=norms > 0)
    return np.sum(fc**2, axis=1, keepdims=True) - explained


@given(basis_cases())
def test_file_decodes_to_the_encoders_decode(case: tuple[np.ndarray, kernelpack.Basis]) -> None:
    array, config = case
    encoded, _ = assert_roundtrip(array, config)
    n_slices = math.prod(array.shape[:-2])
    bank = encoded.bank
    if isinstance(config.bank, int):  # k-means: as many filters as asked, at most one per slice
        assert bank.spec.shape == (min(config.bank, n_slices), *array.shape[-2:])
    else:
        assert bank.spec.shape == config.bank.shape
    assert bank.dtype == encoded.a.dtype == encoded.b.dtype == config.dtype
    assert encoded.index.dtype == ("uint8" if bank.spec.shape[0] <= 256 else "uint16")
    assert encoded.index.spec.shape == encoded.a.spec.shape == encoded.b.spec.shape == (n_slices,)
    assert int(encoded.index.data.max()) < bank.spec.shape[0]


@given(basis_cases(dtype=st.just("float32")))
def test_each_slice_takes_its_best_bank_filter(case: tuple[np.ndarray, kernelpack.Basis]) -> None:
    """The chosen filter has the smallest least-squares residual of the stored bank, and the
    stored a, b reach that residual."""
    array, config = case
    encoded, decoded = assert_roundtrip(array, config)
    slices = slices_of(array, encoded)
    bank = encoded.bank.values().astype(np.float64).reshape(encoded.bank.spec.shape[0], -1)
    residuals = fit_residuals(slices, bank)
    energy = np.sum(slices**2, axis=1)
    chosen = residuals[np.arange(len(slices)), encoded.index.data.astype(np.int64)]
    assert np.all(chosen <= residuals.min(axis=1) + 1e-9 * energy)
    reached = np.sum((slices_of(decoded, encoded) - slices) ** 2, axis=1)
    assert np.all(reached <= chosen + 1e-6 * energy)


def test_slices_made_from_a_large_bank_are_rebuilt_with_uint16_indices() -> None:
    """Depthwise (C, 1, k, k) slices drawn from filters >= 256 of a 300-filter bank."""
    rng = np.random.default_rng(7)
    bank = unit_filters(8, 300, (3, 3))
    index = rng.integers(256, 300, size=12)
    a, b = rng.uniform(0.5, 2.0, 12) * rng.choice([-1, 1], 12), rng.standard_normal(12)
    array = (a[:, None, None] * bank[index] + b[:, None, None]).astype(np.float32)[:, None]
    encoded, decoded = assert_roundtrip(array, kernelpack.Basis(bank=bank, dtype="float32"))
    assert encoded.index.dtype == "uint16"
    np.testing.assert_array_equal(encoded.index.data, index)
    assert rel_error(decoded, array) < 2**-20


def test_kmeans_bank_with_one_filter_per_slice_is_lossless() -> None:
    array = random_array(9, (3, 2, 3, 3))
    encoded, decoded = assert_roundtrip(array, kernelpack.Basis(bank=6, dtype="float32"))
    assert encoded.bank.spec.shape == (6, 3, 3)
    assert rel_error(decoded, array) < 2**-20


@given(basis_cases(dtype=st.just("float32")))
def test_bank_filters_are_centred_and_unit_norm(case: tuple[np.ndarray, kernelpack.Basis]) -> None:
    array, config = case
    bank = config.encode(array, "float32").bank.values().astype(np.float64)
    rows = bank.reshape(len(bank), -1)
    np.testing.assert_allclose(rows.mean(axis=1), 0.0, atol=1e-6)
    norms = np.linalg.norm(rows, axis=1)
    assert np.all((np.abs(norms - 1) < 1e-6) | (norms < 1e-6))  # constant filters centre to zero


def test_one_bank_is_stored_once_for_many_tensors(tmp_path: os.PathLike) -> None:
    shared = kernelpack.Basis(bank=unit_filters(10, 5, (3, 3)), bank_name="edges")
    tensors = {"conv1.weight": random_array(11, (4, 1, 3, 3)), "conv2.weight": random_array(12, (2, 4, 3, 3))}
    path = tmp_path / "shared.kpk"
    saved = kernelpack.save(tensors, path, forms={"conv*": shared})
    with kernelpack.open(path) as c:
        assert list(c.bank_info()) == ["edges"]
        assert c.bank_info()["edges"].spec.shape == (5, 3, 3)
        for name in tensors:
            assert c.info(name).fields == {"bank": "edges"}
            np.testing.assert_array_equal(c.get_numpy(name), saved[name].decode(NUMPY))
