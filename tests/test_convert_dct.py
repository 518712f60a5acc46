"""Frequency regularisation in training: the masked spectrum, the tail-dropout schedule and
the budget split (frequency-regularization.txt, section 3.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.fft import dctn
from torch import nn

import kernelpack
from kernelpack import DCT
from kernelpack.converters import TailDropout, allocate, compress_
from kernelpack.converters._common import fields, form_weights
from kernelpack.converters.examples import LeNet5

SIZES = {"conv1.weight": 150, "conv2.weight": 2400, "fc1.weight": 48000, "fc2.weight": 10080,
         "fc3.weight": 840}


def test_the_spectrum_is_the_orthonormal_dct_and_the_mask_keeps_the_zigzag_head() -> None:
    conv = nn.Conv2d(3, 4, 3)
    weight = conv.weight.detach().double().numpy().copy()
    compress_(conv, DCT(keep=1.0, dtype="float32"))
    plist = conv.parametrizations.weight
    (spectrum,) = fields(plist)
    np.testing.assert_allclose(spectrum.detach().numpy(), dctn(weight, norm="ortho"), atol=1e-6)
    plist[0].boundary = 10
    rank = plist[0].rank.numpy()
    kept = np.where(rank < 10, dctn(weight, norm="ortho"), 0.0)
    from scipy.fft import idctn

    np.testing.assert_allclose(conv.weight.detach().numpy(), idctn(kept, norm="ortho"), atol=1e-6)
    assert sorted(rank.ravel().tolist()) == list(range(rank.size))


def test_tail_dropout_follows_the_paper_and_lands_on_the_budget() -> None:
    model = compress_(LeNet5(), DCT(keep=1.0))
    total = sum(SIZES.values())
    sched = TailDropout(model, 1000, gamma=0.3, epochs=8, floor=16)
    beta, kept = 1.0, []
    for epoch in range(1, 11):
        counts = sched.step()
        beta = beta - 0.3 * (beta - 1000 / total)
        assert sched.beta == pytest.approx(beta)
        kept.append(sum(counts.values()))
        expected = 1000 if epoch >= 8 else max(1000, round(beta * total))
        assert kept[-1] == expected
    assert kept == sorted(kept, reverse=True) and kept[-1] == 1000
    assert {n: w.boundary for n, w in sched.weights.items()} == counts


def test_tail_dropout_state_round_trips() -> None:
    model = compress_(LeNet5(), DCT(keep=1.0))
    sched = TailDropout(model, 0.05, epochs=20)
    for _ in range(3):
        sched.step()
    other = TailDropout(compress_(LeNet5(), DCT(keep=1.0)), 0.05, epochs=20)
    other.load_state_dict(sched.state_dict())
    assert other.kept == sched.kept and other.step() == sched.step()


def test_allocation_is_exact_floored_capped_and_the_default_feeds_small_tensors() -> None:
    counts = allocate(SIZES, 1000)
    assert sum(counts.values()) == 1000
    assert all(32 <= counts[n] <= SIZES[n] for n in SIZES)
    # a uniform ratio starves conv1 (the paper's collapse); the default rule does not
    uniform = allocate(SIZES, 1000, floor=0, rule="proportional")
    assert uniform["conv1.weight"] <= 3 and counts["conv1.weight"] >= 40
    # caps: a tensor never gets more than its size, the excess goes elsewhere
    capped = allocate({"small": 10, "big": 10_000}, 5000, floor=0)
    assert capped == {"small": 10, "big": 4990}
    assert allocate({"a": 5, "b": 7}, 100) == {"a": 5, "b": 7}


def test_allocation_and_schedule_refuse_impossible_budgets() -> None:
    with pytest.raises(kernelpack.KernelpackError) as caught:
        allocate(SIZES, 100, floor=32)
    assert caught.value.field == "budget"
    with pytest.raises(kernelpack.KernelpackError):
        allocate(SIZES, 1000, rule="cubic")
    with pytest.raises(kernelpack.KernelpackError) as caught:
        TailDropout(LeNet5(), 1000)
    assert caught.value.field == "model"
    with pytest.raises(kernelpack.KernelpackError):
        TailDropout(compress_(LeNet5(), DCT(keep=1.0)), 1000, gamma=0.0)


def test_packed_boundary_is_the_scheduled_one() -> None:
    model = compress_(LeNet5(), DCT(keep=1.0))
    sched = TailDropout(model, 900, epochs=1, floor=20)
    counts = sched.step()
    state = kernelpack.converters.encoded_state(model)
    for name, count in counts.items():
        assert state[name].boundary == count
    assert sum(math.prod(state[n].coefficients.data.shape) for n in counts) == 900
    assert set(form_weights(model)) == set(SIZES)
