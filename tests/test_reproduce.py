"""Small versions of the paper reproductions on real MNIST digits (the full runs are
``python -m kernelpack.converters.reproduce``): every form trains or converts LeNet-5 and
the decoded, packed model keeps its accuracy."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kernelpack import Basis, Linear, Series
from kernelpack.converters import reproduce
from kernelpack.converters.convsim import convsim_init_

SETTINGS = reproduce.Settings.quick()
pytestmark = pytest.mark.slow  # about 150 s: CI runs it, a local loop may not (-m "not slow")


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


def test_the_fr_target_split_is_carved_from_the_training_digits(data: reproduce.Data) -> None:
    x_train, y_train, x_val, y_val = reproduce.validation_split(data)
    assert len(x_train) == 3500 and len(x_val) == 500 and len(y_train) == 3500 and len(y_val) == 500
    def digits(x: torch.Tensor) -> set[bytes]:
        return {row.numpy().tobytes() for row in x.flatten(1)}

    validation = digits(x_val)
    assert len(validation) == 500 and validation <= digits(data[0])  # training digits, no repeats
    assert not validation & digits(x_train) and not validation & digits(data[2])  # disjoint, no test digit


def test_the_fr_target_recipe_runs_end_to_end_and_packs(data: reproduce.Data) -> None:
    s = replace(reproduce.fr_target_settings(), base_epochs=2, fr_epochs=1, fr_total=2)
    rows = reproduce.fr_target(reproduce.validation_split(data), s, seeds=(0,), log=lambda r: None)
    teacher, fr = rows
    assert teacher.accuracy > 0.8 and teacher.numbers == 61_470
    # 2 epochs of FR at 1000 numbers are too few to learn (accuracy near chance): the full
    # recipe's figures are in docs/reproduction/fr_target.md
    assert fr.numbers == reproduce.FR_TARGET and fr.bytes < teacher.bytes / 10
    text = reproduce._fr_markdown(rows, "validation", "command", 1.0)
    assert f"{reproduce.FR_TARGET:,} weight numbers" in text
