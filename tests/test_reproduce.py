"""Small versions of the paper reproductions on real MNIST digits (the full runs are
``python -m kernelpack.converters.reproduce``): every form trains or converts LeNet-5 and
the decoded, packed model keeps its accuracy."""

from __future__ import annotations

import pytest
import torch

from kernelpack import Basis, Linear, Series
from kernelpack.converters import reproduce
from kernelpack.converters.convsim import convsim_init_

SETTINGS = reproduce.Settings.quick()


@pytest.fixture(scope="module")
def data() -> reproduce.Data:
    torch.set_num_threads(1)  # small batches: threads only contend on 2 cores
    return reproduce.data()


@pytest.fixture(scope="module")
def base(data: reproduce.Data) -> torch.nn.Module:
    return reproduce.baseline(data, SETTINGS)


def test_the_dense_baseline_learns_and_float16_keeps_it(data: reproduce.Data, base: torch.nn.Module) -> None:
    acc32, bytes32, conv32, numbers = reproduce.packed(base, data)
    acc16, bytes16, conv16, _ = reproduce.packed(base, data, reproduce.FP16)
    assert conv32 <= 4 * (150 + 2400) and conv16 < 0.55 * conv32
    assert acc32 >= 0.95 and abs(acc16 - acc32) <= 0.003
    assert numbers == 61_470 and bytes16 < 0.55 * bytes32


# post-hoc drops as measured (facts.md: series 4 -0.1, bank 16 -1.3, LinearConv 0.5 -6.4 points on
# a 30-epoch baseline; this 8-epoch baseline is less robust); a short fine-tune recovers them all
@pytest.mark.parametrize("config, tolerance", [(Series(harmonics=4), 0.01), (Basis(bank=16), 0.06),
                                               (Linear(alpha=0.5), 0.25)])
def test_conv_forms_post_hoc_and_fine_tuned(data: reproduce.Data, base: torch.nn.Module, config: object,
                                            tolerance: float) -> None:
    reference = reproduce.packed(base, data)[0]
    post = reproduce.timed(lambda: reproduce.conv_form(data, SETTINGS, base, "m", config, False), data)
    tuned = reproduce.timed(lambda: reproduce.conv_form(data, SETTINGS, base, "m", config, True), data)
    assert post.accuracy >= reference - tolerance
    assert tuned.accuracy >= reference - 0.03  # a 3-epoch fine-tune; the full runs recover all
    assert tuned.numbers < 61_470


def test_frequency_regularisation_trains_to_a_budget(data: reproduce.Data, base: torch.nn.Module) -> None:
    row = reproduce.timed(lambda: reproduce.frequency(data, SETTINGS, 4000, teacher=base), data)
    assert row.numbers == 4000 and row.accuracy >= 0.9


def test_convsim_initialisation_lowers_the_loss_and_trains(data: reproduce.Data) -> None:
    torch.manual_seed(0)
    history = convsim_init_(reproduce.LeNet5((3, 8)), steps=SETTINGS.convsim_steps)
    assert history[-1] < 0.9 * history[0]
    row = reproduce.timed(lambda: reproduce.convsim(data, SETTINGS, "init", 0), data)
    assert row.accuracy >= 0.9 and row.numbers == 3 * 25 + 8 * 3 * 25 + 120 * 200 + 84 * 120 + 10 * 84
