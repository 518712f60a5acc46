"""The benchmark's peer codecs (benchmarks/peers.py) give back what they promise: lossless peers
the same bits, lossy peers every element within their quantizer's bound, the same names, shapes
and float32 everywhere; NNCodec's import-time stubs vanish after the import."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import numpy as np
import pytest

from benchmark_modules import load

P = load("peers")
F32_EPS = 2.0 ** -24  # float32 unit roundoff


def needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"the {module} peer is not installed: {P.INSTALL[module]}")


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    """Conv, linear, bias and norm tensors; a name NNCodec would misread; extreme values
    (a BN variance beyond float16's range, subnormals, -0.0, an all-zero channel)."""
    rng = np.random.default_rng(0)
    conv = (rng.standard_normal((16, 8, 3, 3)) * 0.1).astype(np.float32)
    conv[3] = 0.0
    conv[5, 0, 0, :] = [-0.0, 1e-40, -3e-39]
    return {
        "conv1.weight": conv,
        "stage_H1.block_G2.weight": (rng.standard_normal((12, 20)) * 0.5).astype(np.float32),
        "conv1.bias": (rng.standard_normal(16) * 0.01).astype(np.float32),
        "bn.running_var": np.array([9.79e7, 1.0, 1e-5, 0.25] * 4, np.float32),
        "depthwise.weight": (rng.standard_normal((32, 1, 5, 5)) * 2).astype(np.float32),
    }


def roundtrip(peer, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    artifact = peer.encode(weights)
    assert isinstance(artifact, bytes)
    decoded = peer.decode(artifact)
    assert set(decoded) == set(weights)
    for name, w in weights.items():
        assert decoded[name].dtype == np.float32 and decoded[name].shape == w.shape, name
    return decoded


def lossless_peers() -> list:
    return [pytest.param(P.safetensors_f32, id="safetensors"), pytest.param(lambda: P.zstd_peer("float32"), id="zstd f32"),
            pytest.param(P.zipnn_f32, id="zipnn", marks=pytest.mark.skipif(
                importlib.util.find_spec("zipnn") is None, reason=f"the zipnn peer is not installed: {P.INSTALL['zipnn']}"))]


@pytest.mark.parametrize("make", lossless_peers())
def test_lossless_peers_give_back_the_same_bits(make, weights):
    peer = make()
    assert not peer.lossy
    decoded = roundtrip(peer, weights)
    for name, w in weights.items():
        assert np.array_equal(decoded[name].view(np.uint32), w.view(np.uint32)), name


def test_zipnn_leaves_the_callers_arrays_alone(weights):
    needs("zipnn")
    before = {k: v.copy() for k, v in weights.items()}
    P.zipnn_f32().encode(weights)
    assert all(np.array_equal(weights[k].view(np.uint32), before[k].view(np.uint32)) for k in weights)


def test_zstd_f16_rounds_matrices_to_float16_and_keeps_1d_tensors(weights):
    peer = P.zstd_peer("float16")
    assert peer.lossy and peer.name == "zstd f16"
    decoded = roundtrip(peer, weights)
    for name, w in weights.items():
        expected = w.astype(np.float16).astype(np.float32) if w.ndim >= 2 else w
        assert np.array_equal(decoded[name].view(np.uint32), expected.view(np.uint32)), name
    assert np.isfinite(decoded["bn.running_var"]).all()  # 9.79e7 > float16's 65504 stays finite


def test_int8_is_within_half_a_step_per_channel_and_keeps_1d_tensors(weights):
    decoded = roundtrip(P.int8_zstd(), weights)
    for name, w in weights.items():
        if w.ndim == 1:
            assert np.array_equal(decoded[name], w), name
            continue
        scale = np.abs(w).reshape(len(w), -1).max(axis=1) / 127
        bound = scale * (0.5 + 4 * 127 * F32_EPS)  # rounding to the grid, plus float32 division and product
        error = np.abs(decoded[name] - w).reshape(len(w), -1).max(axis=1)
        assert (error <= bound).all(), (name, (error / scale).max())
        assert np.allclose(np.abs(decoded[name]).reshape(len(w), -1).max(axis=1), scale * 127, rtol=1e-6)
    assert not decoded["conv1.weight"][3].any()  # an all-zero channel: scale 0, no division by it


def test_int8_codes_round_half_to_even():
    codes, scale = P.int8_channel(np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5]], np.float32))
    assert scale.tolist() == [1.0] and codes.tolist() == [[127, 0, 2, 2, 0, -2]]


@pytest.mark.parametrize("qp", [-38, -32, -26])
def test_nncodec_is_within_two_steps_and_nearly_exact_on_1d_tensors(qp, weights, tmp_path, monkeypatch, capsys):
    """NNCodec's dependent quantization reconstructs on two interleaved grids of spacing 2 steps
    chosen by a trellis, so an element may land up to about 2 steps away (1.94 observed on
    PP-OCR); 1-D tensors get nonweight_qp = -75. A tensor whose levels would overflow int32
    gets a coarser step, about max|w| / 2^32 (here the BN variance of 9.79e7); float32
    rounding of large values comes on top."""
    needs("nncodec")
    monkeypatch.chdir(tmp_path)
    peer = P.nncodec_peer(qp)
    assert peer.lossy and peer.name == f"nncodec qp{qp}"
    decoded = roundtrip(peer, weights)
    step, fine = P.nncodec_step(qp), P.nncodec_step(-75)
    for name, w in weights.items():
        bound = 2 * max(step if w.ndim >= 2 else fine, np.abs(w).max() * 2.0 ** -30) + 2 * F32_EPS * np.abs(w)
        assert (np.abs(decoded[name] - w) <= bound).all(), (name, np.abs(decoded[name] - w).max() / step)
    assert np.abs(decoded["conv1.weight"] - weights["conv1.weight"]).max() > step / 4  # it did quantize
    assert os.listdir(tmp_path) == [] and capsys.readouterr().out == ""


def test_nncodec_step_is_its_quantizer_step():
    assert P.nncodec_step(-32) == 2.0 ** -8 and P.nncodec_step(-38) == 1.5 * 2.0 ** -10
    assert P.nncodec_step(-75) == 1.25 * 2.0 ** -19


def test_nncodec_stubs_are_gone_after_its_import():
    needs("nncodec")
    P._import_nncodec()
    assert not any(isinstance(f, P._StubFinder) for f in sys.meta_path)
    assert not any(isinstance(m, P._Stub) for m in sys.modules.values())
    if importlib.util.find_spec("cv2") is None:
        with pytest.raises(ImportError):
            importlib.import_module("cv2")


def test_stubbed_serves_only_missing_roots_and_only_inside_the_block():
    with P.stubbed(["kp_absent_root", "numpy"]) as roots:
        assert roots == ["kp_absent_root"]  # installed packages are never shadowed
        module = importlib.import_module("kp_absent_root.sub")
        assert isinstance(module.anything.deeper, P._Stub)

        class Base(module.Model):  # stubs serve as base classes, as NNCodec's modules use them
            pass
        assert Base.__mro__[-1] is object
    assert "kp_absent_root" not in sys.modules and "kp_absent_root.sub" not in sys.modules
    with pytest.raises(ImportError):
        importlib.import_module("kp_absent_root")


def test_peers_lists_every_method_or_names_the_missing_install(monkeypatch):
    needs("zipnn")
    needs("nncodec")
    names = [p.name for p in P.peers((-38, -26))]
    assert names == ["safetensors f32", "zstd f32", "zipnn", "zstd f16", "int8/ch + zstd", "nncodec qp-38",
                     "nncodec qp-26"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "zipnn" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps zipnn==0\.5\.4"):
        P.peers()


def test_versions_name_every_peer_library():
    versions = P.versions()
    assert set(versions) == {"numpy", "safetensors", "zstandard", "msgpack", "zipnn", "nncodec"}
    assert versions["numpy"] == np.__version__
