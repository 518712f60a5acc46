"""``distill``: a model with forms in place learns from the original on unlabeled inputs, for
logits, CTC-like sequence logits and dense maps; budgets, early stop and the best checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import kernelpack
from kernelpack import DCT, Basis, Dense, Linear, Series
from kernelpack.converters import compress_, distill
from kernelpack.converters.distillation import kl_loss


def classifier() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 6))
    with torch.no_grad():
        net[-1].weight.mul_(10)  # confident logits, as a trained model's
    return net


class Recogniser(nn.Module):
    """A CRNN/CTC-style text recogniser: conv features, one column per time step, a BiLSTM,
    (T, N, C) log-probabilities."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.rnn = nn.LSTM(4 * 6, 8, bidirectional=True)
        self.head = nn.Linear(16, 7)
        with torch.no_grad():
            self.head.weight.mul_(10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        seq = self.features(image).flatten(1, 2).permute(2, 0, 1)  # (T = width, N, 4 * height)
        return self.head(self.rnn(seq)[0]).log_softmax(-1)


class MapNet(nn.Module):
    """A dense-map model (a detector's score and geometry maps) taking a dict batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.down = nn.Conv2d(2, 8, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(8, 2, 2, stride=2)

    def forward(self, image: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.up(torch.relu(self.mix(torch.relu(self.down(image))))) * scale
        return {"score": maps[:, :1], "geometry": maps[:, 1:], "size": torch.tensor(maps.shape[-2:])}


def batches(count: int, make: object, seed: int) -> list[object]:
    g = torch.Generator().manual_seed(seed)
    return [make(g, i) for i in range(count)]  # type: ignore[operator]


IMAGES = lambda g, i: torch.randn(16, 1, 8, 8, generator=g)
LINES = lambda g, i: torch.randn(4, 1, 6, 10 + 3 * (i % 3), generator=g)  # variable widths
MAPS = lambda g, i: {"image": torch.randn(4, 2, 8 + 4 * (i % 2), 12, generator=g),
                     "scale": torch.tensor(1.5)}
CLASSIFIER = {"0": Basis(bank=2), "2": Basis(bank=3), "6": Linear(alpha=0.5)}


def test_a_classifier_agrees_more_after_a_few_steps_and_runs_are_deterministic() -> None:
    def run() -> tuple[kernelpack.converters.DistillResult, torch.Tensor]:
        student = classifier()
        result = distill(student, inputs=batches(8, IMAGES, 1), config=CLASSIFIER, epochs=3, lr=1e-2,
                         eval_inputs=batches(4, IMAGES, 2))
        return result, student(batches(1, IMAGES, 3)[0]).detach()

    (result, out), (again, out2) = run(), run()
    assert (result.losses, result.agreement) == (again.losses, again.agreement)
    assert torch.equal(out, out2)
    assert result.initial_agreement < 0.9 and result.best_agreement >= result.initial_agreement + 0.05
    assert (result.epochs, result.steps, result.stopped) == (3, 24, "epochs")


def test_the_default_teacher_is_the_model_as_it_was_before_compress() -> None:
    original, student = classifier(), classifier()
    x = batches(1, IMAGES, 4)[0]
    distill(student, inputs=[x], config=CLASSIFIER, epochs=1)
    assert kernelpack.converters.encoded_state(student)["0.weight"].form == "basis"
    with pytest.raises(kernelpack.KernelpackError) as caught:
        distill(student, inputs=[x], config=CLASSIFIER)  # already compressed: no original left
    assert caught.value.field == "config"
    with pytest.raises(kernelpack.KernelpackError) as caught:
        distill(student, inputs=[x])
    assert caught.value.field == "teacher"
    assert original(x).shape == (16, 6)


def test_a_ctc_recogniser_with_its_lstm_in_a_form_learns_per_time_step() -> None:
    teacher = Recogniser()
    student = compress_(copy.deepcopy(teacher), {"rnn": DCT(keep=0.3)})
    held = batches(3, LINES, 6)

    def frame_kl() -> float:
        with torch.no_grad():
            return sum(float(kl_loss(student(x), teacher(x), 1.0)) for x in held)

    before = frame_kl()
    result = distill(student, teacher, batches(9, LINES, 5), epochs=4, lr=1e-2, eval_inputs=held)
    assert result.initial_agreement < 0.6 and result.best_agreement > result.initial_agreement + 0.1
    assert frame_kl() < 0.5 * before


def test_a_dense_map_model_with_dict_batches_lowers_its_relative_error() -> None:
    teacher = MapNet()
    student = compress_(copy.deepcopy(teacher), {"down": Series(harmonics=2), "mix": Basis(bank=2),
                                                 "up": Linear(alpha=0.5)})
    result = distill(student, teacher, batches(6, MAPS, 7), epochs=4, lr=1e-2,
                     eval_inputs=batches(2, MAPS, 8), loss={"geometry": "mse"}, features=["mix"])
    assert result.initial_agreement < 0.8  # 1 - relative error of the worse of the two maps
    assert result.best_agreement > result.initial_agreement + 0.1
    with pytest.raises(kernelpack.KernelpackError) as caught:
        distill(student, teacher, batches(1, MAPS, 7), loss={"boxes": "mse"})
    assert caught.value.field == "loss" and "boxes" in str(caught.value)


def test_budgets_early_stop_and_the_best_checkpoint_is_restored() -> None:
    teacher, train, held = classifier(), batches(8, IMAGES, 1), batches(4, IMAGES, 2)
    student = compress_(classifier(), CLASSIFIER)
    timed = distill(student, teacher, train, time_budget=0.3, epochs=10 ** 6, eval_inputs=held)
    assert timed.stopped == "time" and timed.epochs < 10 ** 6 and len(timed.agreement) == timed.epochs

    student = compress_(classifier(), {"2": Basis(bank=3)})
    early = distill(student, teacher, train, epochs=50, lr=3e-3, eval_inputs=held, target_agreement=0.6)
    assert early.initial_agreement < 0.5
    assert early.stopped == "target" and early.epochs < 50 and early.agreement[-1] >= 0.6
    assert distill(student, teacher, train, epochs=5, eval_inputs=held, target_agreement=0.6).epochs == 0

    student = compress_(classifier(), CLASSIFIER)
    ruined = []

    def ruin_after_two_epochs() -> None:  # a step that makes the student worse
        ruined.append(1)
        if len(ruined) == 3:
            with torch.no_grad():
                for p in student.parameters():
                    p.mul_(-1.0)

    result = distill(student, teacher, train, epochs=4, lr=1e-2, eval_inputs=held, epoch_end=[ruin_after_two_epochs])
    assert result.best_epoch <= 2 and result.agreement[-1] < result.best_agreement
    from kernelpack.converters.distillation import Evaluation, Losses

    score = Evaluation(teacher, held, Losses("auto", 4.0), torch.device("cpu"), False).agreement(student)
    assert score == result.best_agreement


def test_labels_add_the_task_loss_and_one_shot_iterators_serve_one_epoch() -> None:
    teacher, student = classifier(), compress_(classifier(), {"*": Dense(rel_step=0.3)})
    g = torch.Generator().manual_seed(9)
    labelled = [(x, torch.randint(0, 6, (16,), generator=g)) for x in batches(4, IMAGES, 1)]
    seen = []

    def task(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(len(labels))
        return nn.functional.cross_entropy(output, labels)

    distill(student, teacher, labelled, epochs=2, task_loss=task)
    assert seen == [16] * 8
    assert distill(student, teacher, iter(batches(2, IMAGES, 1)), epochs=1).steps == 2
    with pytest.raises(kernelpack.KernelpackError) as caught:
        distill(student, teacher, iter(batches(2, IMAGES, 1)), epochs=2)
    assert caught.value.field == "inputs"
    with pytest.raises(kernelpack.KernelpackError) as caught:
        distill(student, teacher, batches(1, IMAGES, 1), features=["nosuch"])
    assert caught.value.field == "features"


def test_the_readme_distillation_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Distilling from the original model, without labels", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    before, after = map(float, capsys.readouterr().out.split("agreement")[1].split("->"))
    assert after >= before and (tmp_path / "digits.kpk").exists()
