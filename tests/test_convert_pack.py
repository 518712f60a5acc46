"""Promise: a weight trained in its form packs to exactly the fields it trained (no re-fit),
and the packed model computes what the trained model computed, up to the canonical decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kernelpack
from kernelpack import DCT, Basis, Dense, Linear, Series
from kernelpack.converters import compress_, fine_tune
from kernelpack.converters._common import fields, form_weights

FORMS = {
    "dct": DCT(keep=0.3),
    "series": Series(harmonics=(2, 3)),
    "series-chebyshev-uniform": Series(family="chebyshev", harmonics=3, points="uniform"),
    "basis": Basis(bank=6),
    "linear": Linear(alpha=0.5),
    "linear-low-rank": Linear(alpha=0.5, rank=2),
    "dense-float16": Dense(dtype="float16"),
    "dct-bfloat16": DCT(keep=0.5, dtype="bfloat16"),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 3, 4, 4, generator=g), torch.randint(0, 5, (64,), generator=g)


def trained(form: str) -> Net:
    torch.manual_seed(0)
    net = Net()
    config = FORMS[form]
    compress_(net, {"conv": config, "fc": config if not isinstance(config, Basis) else None})
    x, y = data()
    fine_tune(net, x, y, epochs=3, lr=1e-2, batch_size=16, progress=False)
    return net


@pytest.mark.parametrize("form", FORMS)
def test_packed_fields_are_the_trained_fields(form: str, tmp_path: Path) -> None:
    net = trained(form)
    path = tmp_path / "net.kpk"
    kernelpack.save(net, path)
    with kernelpack.open(path) as c:
        for name, plist in form_weights(net).items():
            encoded = c.encoded(name)
            expected = plist[0].to_encoded(*fields(plist))
            assert encoded.form == expected.form and encoded.fields() == expected.fields()
            for key, stored in expected.arrays().items():
                got = encoded.arrays()[key]
                assert got.dtype == stored.dtype and np.array_equal(got.data, stored.data), key
        assert all(c.verify().values())


@pytest.mark.parametrize("form", FORMS)
def test_packed_model_computes_what_the_trained_model_computed(form: str, tmp_path: Path) -> None:
    net = trained(form)
    path = tmp_path / "net.kpk"
    kernelpack.save(net, path)
    plain = Net()
    kernelpack.load_model(plain, path)
    x, _ = data(1)
    with torch.no_grad():
        for name, plist in form_weights(net).items():
            decoded = dict(plain.named_parameters())[name]
            np.testing.assert_allclose(decoded.numpy(), getattr(net.get_submodule(name.rsplit(".", 1)[0]),
                                                                 "weight").numpy(), rtol=0, atol=2e-6)
        np.testing.assert_allclose(plain(x).numpy(), net(x).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_training_moves_only_the_fields_and_the_forward_uses_stored_numbers(form: str) -> None:
    torch.manual_seed(0)
    net = Net()
    compress_(net, {"conv": FORMS[form]})
    plist = form_weights(net)["conv.weight"]
    before = [f.detach().clone() for f in fields(plist)]
    x, y = data()
    fine_tune(net, x, y, epochs=2, lr=1e-2, batch_size=16, progress=False)
    after = fields(plist)
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "training moved no field"
    # the weight the layer uses is exactly a function of the stored-rounded fields
    dtype = getattr(FORMS[form], "dtype", "float32")
    rounded = [f.detach().to(torch.float16 if dtype == "float16" else
                             torch.bfloat16 if dtype == "bfloat16" else torch.float32).float()
               for f in after]
    with torch.no_grad():
        assert torch.equal(plist[0](*rounded), net.conv.weight)
