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
