"""Conformance: every committed vector in spec/vectors decodes to the digests of its manifest.

The vectors are normative: a change in decode that changes any digest is a format
break (spec/vectors/README.md). These tests decode the committed files; they never
regenerate them (regeneration is byte-identical only with the same zstandard and
LAPACK, see spec/vectors/generate.py --check).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import pytest

from kernelpack.forms import FORMS
from kernelpack.layout import digest
from kernelpack.reader import Container

VECTORS = os.path.join(os.path.dirname(__file__), os.pardir, "spec", "vectors")
with open(os.path.join(VECTORS, "manifest.json"), encoding="utf-8") as _f:
    MANIFEST: dict[str, Any] = json.load(_f)
FILES = sorted(MANIFEST["files"])


def path_of(name: str) -> str:
    return os.path.join(VECTORS, name)


def check_decodes(name: str, backend: str, device: str = "cpu") -> None:
    """Every tensor of vector ``name`` decodes (verify() and get_*) to its manifest digest and shape."""
    expected = MANIFEST["files"][name]["tensors"]
    with Container(path_of(name)) as c:
        assert sorted(c.keys()) == sorted(expected)
        assert c.verify(backend, device) == {t: True for t in expected}
        for tensor, entry in expected.items():
            if backend == "numpy":
                value = c.get_numpy(tensor)
                dtype = "float32" if entry["dtype"] == "bfloat16" else entry["dtype"]  # numpy widens
                assert value.dtype == np.dtype(dtype), tensor
            else:
                import torch

                value = c.get_tensor(tensor, device)
                assert value.dtype == getattr(torch, entry["dtype"]), tensor
                assert value.device.type == device, tensor
                value = value.cpu().float().numpy() if entry["dtype"] == "bfloat16" else value.cpu().numpy()
            assert list(value.shape) == entry["shape"], tensor
            assert digest(value, entry["dtype"]).hex() == entry["sha256"], tensor


@pytest.mark.parametrize("name", FILES)
def test_header_matches_manifest(name: str) -> None:
    """File bytes, metadata, banks and every tensor's header entry are what the manifest records."""
    entry = MANIFEST["files"][name]
    with open(path_of(name), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"]
    with Container(path_of(name)) as c:
        assert c.version == tuple(entry["version"])  # the lowest version that holds the file
        assert c.metadata() == entry["metadata"]
        assert sorted(c.bank_info()) == sorted(entry["banks"])
        for tensor, expected in entry["tensors"].items():
            info = c.info(tensor)
            assert (info.form, list(info.shape), info.dtype) == \
                (expected["form"], expected["shape"], expected["dtype"]), tensor
            assert info.digest.hex() == expected["sha256"], tensor
            assert dict(info.fields) == expected["fields"], tensor


@pytest.mark.parametrize("name", FILES)
def test_numpy_decode(name: str) -> None:
    check_decodes(name, "numpy")


@pytest.mark.parametrize("name", FILES)
def test_torch_cpu_decode(name: str) -> None:
    pytest.importorskip("torch")
    check_decodes(name, "torch")


@pytest.mark.cuda
@pytest.mark.parametrize("name", FILES)
def test_torch_cuda_decode(name: str) -> None:
    """The decode arithmetic on the GPU gives the same bits as on the CPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    check_decodes(name, "torch", "cuda")


def test_every_form_has_a_vector() -> None:
    """A new form cannot ship without a conformance vector."""
    covered = {t["form"] for f in MANIFEST["files"].values() for t in f["tensors"].values()}
    assert set(FORMS) <= covered, f"forms without a vector: {sorted(set(FORMS) - covered)}"


def test_every_vector_is_in_the_manifest() -> None:
    """No stray .kpk file escapes the tests, and no manifest entry lacks its file."""
    on_disk = sorted(f for f in os.listdir(VECTORS) if f.endswith(".kpk"))
    assert on_disk == FILES


def spec_widened_nan_bits(stored: np.ndarray, dtype: str) -> np.ndarray:
    """FORMAT.md 3, "Widening to float32", for NaNs: float16 ``s << 16 | 0x7F800000 | p << 13``,
    bfloat16 ``bits << 16`` (sign, payload and the signalling state kept)."""
    h = stored.view(np.uint16).astype(np.uint32)
    if dtype == "bfloat16":
        return h << 16
    return ((h & 0x8000) << 16) | 0x7F800000 | ((h & 0x3FF) << 13)


def check_nan_widening(backend: str, device: str = "cpu") -> None:
    """Every NaN of the widened tensors of nan.kpk decodes to exactly the spec's bits."""
    with Container(path_of("nan.kpk")) as c:
        widened = [n for n in c.keys() if n.endswith("_as_float32")]
        assert len(widened) == 4  # float16 and bfloat16, short and long
        for name in widened:
            data = c.encoded(name).arrays()["data"]
            bits = data.data.view(np.uint16)
            nan = (bits & 0x7FFF) > (0x7C00 if data.dtype == "float16" else 0x7F80)
            assert nan.any() and (~bits[nan] & (0x0200 if data.dtype == "float16" else 0x0040)).any(), name
            value = c.get_numpy(name) if backend == "numpy" else c.get_tensor(name, device).cpu().numpy()
            expected = spec_widened_nan_bits(bits[nan], data.dtype)
            np.testing.assert_array_equal(value.view(np.uint32)[nan], expected, err_msg=name)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_nan_payloads_widen_exactly(backend: str) -> None:
    """A signalling NaN stays signalling and every payload bit is kept, short arrays and long."""
    if backend == "torch":
        pytest.importorskip("torch")
    check_nan_widening(backend)


@pytest.mark.cuda
def test_nan_payloads_widen_exactly_on_cuda() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    check_nan_widening("torch", "cuda")
