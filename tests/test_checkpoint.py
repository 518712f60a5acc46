"""A plain torch checkpoint of a model with forms in place restores its very forward pass:
steps, boundaries, banks, indices and orders are all in ``state_dict`` (buffers or extra state
of plain numbers), readable by ``torch.load(weights_only=True)``."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

import kernelpack
from kernelpack import DCT, Basis, Dense, Linear, Series
from kernelpack.converters import TailDropout, compress_

CONFIGS = {
    "dense-float16": Dense(dtype="float16"), "dense-quantised": Dense(rel_step=0.05),
    "dct": DCT(keep=0.6), "dct-quantised": DCT(keep=0.6, rel_step=0.05),
    "series": Series(harmonics=2), "series-quantised": Series(harmonics=2, rel_step=0.05),
    "basis": Basis(bank=4), "basis-quantised": Basis(bank=4, rel_step=0.05),
    "linear": Linear(alpha=0.5), "linear-quantised": Linear(alpha=0.5, rank=2, rel_step=0.05),
}


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 5))


def trained(config: kernelpack.forms.Config) -> tuple[nn.Module, TailDropout | None]:
    """A model with ``config`` on both convs, trained a few steps (and, for dct, tail-dropped)."""
    model = compress_(net(0), {"0": config, "2": config})
    schedule = TailDropout(model, 0.3, gamma=0.5, epochs=3) if isinstance(config, DCT) else None
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad(), loss.backward(), optimiser.step()
        if schedule is not None:
            schedule.step()
    return model, schedule


def checkpoint(model: nn.Module) -> dict[str, object]:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", CONFIGS)
def test_a_restored_checkpoint_computes_and_packs_bit_identically(name: str, tmp_path: Path) -> None:
    model, _ = trained(CONFIGS[name])
    fresh = compress_(net(7), {"0": CONFIGS[name], "2": CONFIGS[name]})  # its own fit: other steps
    fresh.load_state_dict(checkpoint(model))
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    kernelpack.save(model, tmp_path / "trained.kpk")
    kernelpack.save(fresh, tmp_path / "restored.kpk")
    assert (tmp_path / "trained.kpk").read_bytes() == (tmp_path / "restored.kpk").read_bytes()


def test_the_dct_boundary_set_by_tail_dropout_is_in_the_checkpoint() -> None:
    model, schedule = trained(DCT(keep=0.6))
    state = checkpoint(model)
    boundaries = {k: v["boundary"] for k, v in state.items() if k.endswith("_extra_state")}
    assert sorted(boundaries.values()) == sorted(schedule.weights[n].boundary for n in schedule.weights)
    assert all(b < DCT(keep=0.6).boundary_for(w.size) for b, w in zip(boundaries.values(),
                                                                     schedule.weights.values()))


def test_a_checkpoint_of_another_quantisation_is_refused_by_name() -> None:
    model, _ = trained(Series(harmonics=2))
    fresh = compress_(net(0), {"0": Series(harmonics=2, rel_step=0.05), "2": Series(harmonics=2)})
    with pytest.raises(kernelpack.KernelpackError) as caught:
        fresh.load_state_dict(checkpoint(model))
    assert caught.value.field == "extra_state.steps"
