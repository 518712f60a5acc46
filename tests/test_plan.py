"""``plan(model, max_bytes=..., max_error=...)``: per-tensor configs from closed-form fits that
meet a size or an error budget; usable by ``save`` and ``compress_``; torch-free on numpy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kernelpack
from kernelpack import Series
from kernelpack.converters import compress_
from kernelpack.converters.examples import LeNet5, ResNetS
from kernelpack.converters.planner import default_candidates, measure


def smooth_kernels(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Kernels that are exactly a 2x1 series (linear along x, constant along y) plus tiny noise."""
    rng = np.random.default_rng(seed)
    x = np.cos(np.pi * np.arange(shape[-2]) / (shape[-2] - 1))
    c = rng.standard_normal(shape[:-2] + (2,))
    w = c[..., :1, None] + c[..., 1:, None] * x[:, None]
    return np.broadcast_to(w, shape) + 1e-4 * rng.standard_normal(shape)


def test_error_budget_holds_for_every_tensor_and_anisotropic_orders_are_found() -> None:
    tensors = {"conv.weight": smooth_kernels(0, (16, 8, 5, 5)),
               "fc.weight": np.random.default_rng(1).standard_normal((32, 64)),
               "conv.bias": np.zeros(16)}
    unquantised = lambda name, shape: [c for c in default_candidates(name, shape) if not c.quantised]  # noqa: E731
    chosen = kernelpack.plan(tensors, max_error=0.01, candidates=unquantised)
    assert set(chosen) == {"conv.weight", "fc.weight"}
    assert chosen["conv.weight"] == Series(harmonics=(2, 1))
    for name, config in chosen.items():
        assert measure(tensors[name], config).error <= 0.01
        assert chosen.options[name].error <= 0.01
    # a loose cap on noise: the smallest candidate within it, never one beyond it
    noise = {"fc.weight": tensors["fc.weight"]}
    loose = kernelpack.plan(noise, max_error=0.75)
    assert 0.5 < loose.options["fc.weight"].error <= 0.75
    assert measure(noise["fc.weight"], loose["fc.weight"]).error <= 0.75


def test_size_budget_holds_and_more_bytes_never_cost_accuracy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = LeNet5()
    errors = []
    candidates = [kernelpack.Dense(dtype="float16"), kernelpack.DCT(keep=0.05), kernelpack.DCT(keep=0.2),
                  Series(harmonics=2), Series(harmonics=(3, 2)), kernelpack.Basis(bank=8)]
    for budget in (8_000, 20_000, 60_000):
        chosen = kernelpack.plan(net, max_bytes=budget, candidates=lambda name, shape: [
            c for c in candidates if len(shape) == 4 or not isinstance(c, (Series, kernelpack.Basis))])
        assert chosen.bytes <= budget
        errors.append(sum(o.error ** 2 for o in chosen.options.values()))
        path = tmp_path / f"lenet-{budget}.kpk"
        kernelpack.save(net, path, forms=chosen)
        with kernelpack.open(path) as c:
            stored = sum(c.info(n).stored_bytes for n in chosen) + sum(r.length for r in c.bank_info().values())
        assert stored <= budget  # zstd only shrinks the raw bytes the plan counts
    assert errors == sorted(errors, reverse=True)


def test_impossible_budgets_raise() -> None:
    net = LeNet5()
    candidates = [kernelpack.DCT(keep=0.1), kernelpack.Dense(dtype="float16")]
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.plan(net, max_bytes=100, candidates=candidates)
    assert caught.value.field == "budget"
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.plan(net, max_error=1e-9, candidates=candidates)
    assert caught.value.field == "budget" and caught.value.tensor is not None
    with pytest.raises(kernelpack.KernelpackError):
        kernelpack.plan(net)


def test_a_plan_drives_compress_on_a_resnet() -> None:
    torch.manual_seed(0)
    net = ResNetS(width=8)
    chosen = kernelpack.plan(net, max_error=0.3, candidates=[Series(harmonics=2), kernelpack.Dense(dtype="float16")])
    compress_(net, chosen)
    state = kernelpack.converters.encoded_state(net)
    for name, config in chosen.items():
        assert state[name].form == ("series" if isinstance(config, Series) else "dense")


def test_plan_on_numpy_imports_no_torch() -> None:
    code = ("import sys, numpy as np, kernelpack\n"
            "p = kernelpack.plan({'w': np.random.default_rng(0).standard_normal((8, 4, 3, 3))}, max_error=0.5)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print(p['w'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_a_candidate_an_encoder_refuses_is_skipped_and_listed_never_silently() -> None:
    """Beyond 65504 float16 dense refuses (it would store infinity): that tensor gets the next
    candidate, and the plan lists and warns about the one it skipped."""
    rng = np.random.default_rng(2)
    tensors = {"big": 1e5 * rng.standard_normal((8, 16)), "small": rng.standard_normal((8, 16))}
    candidates = [kernelpack.Dense(dtype="float16"), kernelpack.Dense()]
    with pytest.warns(UserWarning, match="skipped 1 candidate.*tensor 'big'.*65504"):
        chosen = kernelpack.plan(tensors, max_error=0.01, candidates=candidates)
    assert chosen == {"big": kernelpack.Dense(), "small": kernelpack.Dense(dtype="float16")}
    assert [(config, "65504" in reason) for config, reason in chosen.skipped["big"]] == [
        (kernelpack.Dense(dtype="float16"), True)]
    assert "small" not in chosen.skipped
    table = chosen.table()
    assert "skipped" in table and "field 'dtype'" in table.split("skipped")[1]


def test_no_candidate_possible_still_raises() -> None:
    tensors = {"big": np.full((8, 16), 1e5)}
    with pytest.raises(kernelpack.KernelpackError, match="no candidate form can encode it") as caught:
        kernelpack.plan(tensors, max_bytes=10_000, candidates=[kernelpack.Dense(dtype="float16")])
    assert (caught.value.tensor, caught.value.field) == ("big", "candidates")


# --- calibrated plans (issue 12) -----------------------------------------------------------------
class DigitsNet(torch.nn.Module):
    """A small CNN on scikit-learn's 8x8 digits: two convolutions and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def digits() -> tuple[DigitsNet, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The net trained 4 epochs (about a second), 200 calibration digits, 297 held-out ones."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    data = load_digits()
    x = torch.tensor(data.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(4):
        for i in range(0, 1500, 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    return net.eval(), {"x": x[:200].numpy()}, {"x": x[1500:].numpy()}


def onnx_bytes(net: torch.nn.Module) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.onnx.export(net, torch.zeros(1, 1, 8, 8), buffer, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return buffer.getvalue()


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class DamperNet(torch.nn.Module):
    """DigitsNet's trained layers and a side branch whose output reaches y damped 1000-fold:
    its weights hardly move y, so a plan that measures sensitivities stores them coarsely."""

    def __init__(self, net: DigitsNet) -> None:
        super().__init__()
        self.net = net
        self.side = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + 1e-3 * self.side(x.flatten(1))


def test_measured_sensitivities_move_bytes_to_the_layers_the_outputs_feel(digits) -> None:
    net, calibration, _ = digits
    torch.manual_seed(1)
    model = DamperNet(net).eval()
    alike = kernelpack.plan(model, calibration["x"], max_output_error=0.02, sensitivity=False)
    felt = kernelpack.plan(model, calibration["x"], max_output_error=0.02)
    assert alike.probes == 0 and felt.probes == len(felt) and felt.measured <= 0.02
    sensitivity = {n: o.sensitivity for n, o in felt.options.items()}
    assert sensitivity["side.weight"] < 0.01 * min(v for n, v in sensitivity.items() if n != "side.weight")
    assert felt.options["side.weight"].bytes < alike.options["side.weight"].bytes
    assert felt.options["side.weight"].error > 10 * alike.options["side.weight"].error
    assert "sensitivity probe(s)" in felt.table()


def test_the_plan_is_the_same_on_one_thread_and_on_several(digits) -> None:
    """Tensors are measured on threads (each with its own factor cache): same configs, bytes,
    errors and skipped candidates with threads=1 and threads=3, and the same first error."""
    net, calibration, _ = digits
    plans = [kernelpack.plan(net, calibration["x"], max_output_error=0.03, threads=t) for t in (1, 3)]
    assert dict(plans[0]) == dict(plans[1]) and plans[0].measured == plans[1].measured
    assert [(o.bytes, o.error, o.output_error, o.aware) for o in plans[0].options.values()] == [
        (o.bytes, o.error, o.output_error, o.aware) for o in plans[1].options.values()]
    tensors = {"a": np.ones((8, 16)), "big": np.full((8, 16), 1e5), "bigger": np.full((8, 32), 1e6)}
    for threads in (1, 3):
        with pytest.raises(kernelpack.KernelpackError, match="no candidate form") as caught:
            kernelpack.plan(tensors, max_bytes=10_000, candidates=[kernelpack.Dense(dtype="float16")], threads=threads)
        assert caught.value.tensor == "big"


def test_a_calibrated_plan_meets_its_output_target_held_out_and_beats_the_weight_only_plan(digits, tmp_path):
    net, calibration, held_out = digits
    target = 0.03
    chosen = kernelpack.plan(net, calibration["x"], max_output_error=target)
    weight_only = kernelpack.plan(net, calibration["x"], max_output_error=target, output_aware=False)
    assert chosen.measured <= target and weight_only.measured <= target
    assert chosen.bytes < weight_only.bytes
    assert all(o.output_error is not None for o in chosen.options.values())
    kernelpack.save(net, tmp_path / "p.kpk", forms=chosen)
    planned = DigitsNet()
    planned.load_state_dict({k: torch.as_tensor(v) for k, v in kernelpack.load_numpy(tmp_path / "p.kpk").items()})
    x = torch.as_tensor(held_out["x"])
    seen = torch.as_tensor(calibration["x"])
    with torch.no_grad():
        assert relative(planned(x).numpy(), net(x).numpy()) <= 2 * target  # held out: within a tolerance
        # the file holds the output-aware fits the plan measured, not a re-fit to the weights
        assert chosen.hessians and relative(planned(seen).numpy(), net(seen).numpy()) == pytest.approx(
            chosen.measured, rel=1e-4)


def test_compress_with_a_calibrated_plan_starts_from_the_plans_output_aware_fits(digits, tmp_path):
    """compress_(model, plan) initialises every form with the fit the plan measured (under its
    calibration statistics), so fine-tuning starts where the post-hoc file is, not at a
    weight-only re-fit that a calibrated plan may be far worse than."""
    import copy

    from kernelpack.converters import compress_

    net, calibration, _ = digits
    chosen = kernelpack.plan(net, calibration["x"], max_output_error=0.05)
    assert chosen.hessians
    kernelpack.save(net, tmp_path / "post_hoc.kpk", forms=chosen)
    student = compress_(copy.deepcopy(net), chosen)
    kernelpack.save(student, tmp_path / "student.kpk", forms=chosen)
    post_hoc, started = (kernelpack.load_numpy(tmp_path / f) for f in ("post_hoc.kpk", "student.kpk"))
    for name in chosen.hessians:
        assert relative(started[name], post_hoc[name]) < 1e-3, name


def test_an_onnx_model_is_planned_and_measured_with_onnx_runtime(digits, tmp_path):
    from kernelpack.onnx_io import pack_onnx

    net, calibration, held_out = digits
    model = onnx_bytes(net)
    target = 0.03
    chosen = kernelpack.plan(model, calibration, max_output_error=target)
    biases = {"c1.bias", "c2.bias"}  # conv biases: planned too, in float storage only (fc's is an Add's)
    assert set(chosen) == {"c1.weight", "c2.weight", "fc.weight"} | biases and chosen.measured <= target
    assert all(isinstance(chosen[b], kernelpack.Dense) and not chosen[b].quantised for b in biases)
    pack_onnx(model, tmp_path / "m.kpk", forms=chosen)
    session = kernelpack.ort_session(tmp_path / "m.kpk", ["CPUExecutionProvider"])
    out = session.run(None, held_out)[0]
    with torch.no_grad():
        assert relative(out, net(torch.as_tensor(held_out["x"])).numpy()) <= 2 * target
        seen = net(torch.as_tensor(calibration["x"])).numpy()
    assert relative(session.run(None, calibration)[0], seen) == pytest.approx(chosen.measured, rel=1e-3)


def test_a_byte_budget_plan_is_measured_and_a_metric_overrides_the_error(digits):
    net, calibration, _ = digits
    small = kernelpack.plan(net, calibration["x"], max_bytes=4000)
    assert small.bytes <= 4000 and small.measured is not None and small.measured > 0
    calls = []

    def disagreement(ref: list, new: list) -> float:
        calls.append(len(ref))
        return float(np.mean(ref[0].argmax(1) != new[0].argmax(1)))

    agreeing = kernelpack.plan(net, calibration["x"], max_output_error=0.01, metric=disagreement)
    assert calls and agreeing.measured <= 0.01 and agreeing.evaluations == len(calls)


def test_an_unreachable_output_target_says_the_best_reached(digits):
    net, calibration, _ = digits
    with pytest.raises(kernelpack.KernelpackError, match=r"no plan meets max_output_error=1e-09.*measured") as caught:
        kernelpack.plan(net, calibration["x"], max_output_error=1e-9, candidates=[kernelpack.Dense(rel_step=0.5)])
    assert caught.value.field == "budget"


def test_output_targets_need_a_graph_and_calibration_inputs(digits):
    net, calibration, _ = digits
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    with pytest.raises(kernelpack.KernelpackError, match="state dict has no graph") as caught:
        kernelpack.plan(state, calibration, max_error=0.1)
    assert caught.value.field == "calibration"
    with pytest.raises(kernelpack.KernelpackError, match="needs calibration inputs"):
        kernelpack.plan(net, max_output_error=0.1)


def test_a_plan_round_trips_through_the_json_config_that_pack_reads(tmp_path):
    from kernelpack.converters.planner import Plan
    from kernelpack.rules import read_rules

    rng = np.random.default_rng(3)
    tensors = {"a[0]*?.weight": rng.standard_normal((16, 8, 3, 3)), "fc.weight": rng.standard_normal((32, 64))}
    chosen = kernelpack.plan(tensors, max_error=0.2)
    chosen.to_json(tmp_path / "plan.json")
    rules = read_rules(tmp_path / "plan.json")
    assert rules.default is None and len(rules.rules) == 2
    assert {n: m.config for n, m in rules.assign(tensors).items()} == dict(chosen)
    again = Plan.from_json(tmp_path / "plan.json")
    assert dict(again) == dict(chosen)
    again.to_json(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == (tmp_path / "plan.json").read_text()


def test_synthetic_statistics_plan_a_state_dict_on_the_estimate() -> None:
    """Precomputed H (``stats``): output-aware fits and the estimated error, no graph to run."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((32, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal((72, 8))
    chosen = kernelpack.plan({"w": w}, max_output_error=0.05, stats={"w": b @ b.T / 8})
    assert chosen.measured is None and chosen.estimated <= 0.05
    assert chosen.options["w"].output_error <= 0.05 < chosen.options["w"].error  # H's null space is free
