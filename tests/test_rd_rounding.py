"""Rate-distortion rounding (``rd``, kernelpack.forms._base.rd_round): an encoder option that
chooses codes knowing what they cost. The decode stays codes x step (nothing in the file
says how the codes were chosen); a code only ever moves one step toward zero from round to
nearest; the codes' order-0 entropy drops and the error grows, both the more the larger rd;
rd 0 is round to nearest; every bad use is refused naming tensor and field."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import kernelpack
from kernelpack import DCT, Dense, Linear, Series
from kernelpack._backend import get_ops
from kernelpack.forms._base import quantise
from kernelpack.rules import config_from_dict, config_to_dict

STEP = 0.01
CODECS = ("none", "zstd", "zstd-shuffle", "rans", "rans-ctx")


def laplace(seed: int = 0, shape: tuple[int, ...] = (64, 32, 3, 3)) -> np.ndarray:
    return np.random.default_rng(seed).laplace(0, 0.03, shape).astype(np.float32)


def entropy_bits(codes: np.ndarray) -> float:
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def test_rd_zero_is_round_to_nearest() -> None:
    w = laplace()
    assert np.array_equal(quantise(w, STEP, 0.0).data, quantise(w, STEP).data)
    assert np.array_equal(Dense(step=STEP, rd=0).encode(w, "float32").arrays()["data"].data,
                          quantise(w, STEP).data)


def test_codes_move_at_most_one_step_toward_zero_and_cost_fewer_bits_for_more_error() -> None:
    w = laplace()
    nearest = quantise(w, STEP).data.astype(np.int32)
    bits, errors = [entropy_bits(nearest)], [float(np.square(w - nearest * np.float32(STEP)).sum())]
    for rd in (0.05, 0.2, 0.5):
        codes = quantise(w, STEP, rd).data.astype(np.int32)
        moved = codes != nearest
        assert moved.any()
        assert np.array_equal(codes[moved], nearest[moved] - np.sign(nearest[moved]))
        bits.append(entropy_bits(codes))
        errors.append(float(np.square(w - codes * np.float32(STEP)).sum()))
    assert bits == sorted(bits, reverse=True) and errors == sorted(errors)
    assert bits[-1] < 0.99 * bits[0]


def test_a_code_only_moves_if_it_was_near_a_rounding_boundary() -> None:
    """The error a move adds, 1 - 2|x - q| in steps squared, is paid for by at most rd times
    the bits saved: a code whose value was within a quarter step of it never moves at rd 0.1
    unless it saves more than 5 bits."""
    w = laplace(1)
    x = w.astype(np.float64) / STEP
    nearest = np.rint(x)
    codes = quantise(w, STEP, 0.1).data
    added = 1 - 2 * np.abs(x - nearest)
    assert np.all(added[codes != nearest] <= 0.1 * 32)  # the price of a code never seen
    assert (added[codes != nearest] < 0.5).mean() > 0.99


@pytest.mark.parametrize("config", [Dense(step=STEP, rd=0.2), DCT(keep=0.5, step=STEP, rd=0.2),
                                    Series(harmonics=(3, 3), rel_step=0.05, rd=0.2),
                                    Linear(alpha=0.5, step=STEP, rd=0.2)], ids=lambda c: type(c).__name__)
def test_a_rounded_file_decodes_to_codes_times_step_and_is_smaller(config, tmp_path: Path) -> None:
    w = laplace(2)
    sizes = {}
    for c in (replace(config, rd=None), config):
        path = tmp_path / f"{c.rd}.kpk"
        kernelpack.save({"w": w}, path, forms={"w": c}, codecs=CODECS)
        sizes[c.rd] = path.stat().st_size
        with kernelpack.open(path) as f:
            assert f.verify() == {"w": True}
        assert np.array_equal(kernelpack.load_numpy(path)["w"], c.encode(w, "float32").decode(get_ops("numpy")))
    assert sizes[0.2] < sizes[None]

def test_rd_round_trips_through_the_json_config() -> None:
    config = Dense(step=STEP, rd=0.2)
    assert config_to_dict(config) == {"form": "dense", "step": STEP, "rd": 0.2}
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize("config", [Dense(rd=0.2), Dense(step=STEP, rd=-1.0), Dense(step=STEP, rd=float("nan")),
                                    Dense(step=STEP, rd="0.2"), DCT(keep=0.5, rd=0.1)])
def test_a_bad_rd_is_refused_naming_tensor_and_field(config, tmp_path: Path) -> None:
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.save({"w": laplace()}, tmp_path / "q.kpk", forms={"w": config})
    assert (caught.value.tensor, caught.value.field) == ("w", "rd")


def test_training_refuses_rd_rather_than_train_other_codes_than_it_packs() -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.compress_(model, Dense(step=STEP, rd=0.2))
    assert (caught.value.tensor, caught.value.field) == ("0.weight", "rd")
