"""``compress_(model, config)``: one call puts a model's layers in their forms, chosen by
name and pattern, initialised by the closed-form fits; the result packs into the plain model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import kernelpack
from kernelpack import DCT, Basis, Dense, Linear, Series
from kernelpack._backend import NumpyOps
from kernelpack.converters import compress_, encoded_state, finalize_
from kernelpack.converters._common import form_weights
from kernelpack.converters.examples import LeNet5, ResNetS


class Layers(nn.Module):
    """One of each layer whose weights are not a Conv/Linear ``weight``, and a bare parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.rnn = nn.LSTM(6, 4, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(8, 4, batch_first=True)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
        self.grouped = nn.Conv2d(6, 4, 3, groups=2)
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4, padding=1)
        self.scale = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = self.gru(self.rnn(self.embed(tokens))[0])[0]
        seq = self.attn(seq, seq, seq, need_weights=False)[0]
        maps = seq.transpose(1, 2)[..., None] * seq.transpose(1, 2)[:, :, None]  # (N, 4, T, T)
        return self.depthwise(self.grouped(self.up(maps))) * self.scale


#: Which parametrised weights each rule reaches, and the form its file stores.
LAYER_RULES = {
    "embed": (Linear(alpha=0.5), {"embed.weight": "linear"}),
    "rnn": (DCT(keep=0.5), {f"rnn.weight_{k}_l{i}{r}": "dct" for k in ("ih", "hh") for i in (0, 1)
                             for r in ("", "_reverse")}),
    "gru.weight_hh_l0": (Dense(rel_step=0.05), {"gru.weight_hh_l0": "dense"}),
    "attn*": (Linear(alpha=0.5, rank=1), {"attn.in_proj_weight": "linear", "attn.out_proj.weight": "linear"}),
    "up": (Basis(bank=4), {"up.weight": "basis"}),
    "grouped": (Series(harmonics=2), {"grouped.weight": "series"}),
    "depthwise.weight": (DCT(keep=0.6, rel_step=0.05), {"depthwise.weight": "dct"}),
    "scale": (Dense(dtype="float16"), {"scale": "dense"}),
}


@pytest.mark.parametrize("rule", LAYER_RULES)
def test_every_weight_of_rank_two_or_more_takes_a_form_packs_and_loads_into_the_plain_model(
        rule: str, tmp_path: Path) -> None:
    config, reached = LAYER_RULES[rule]
    torch.manual_seed(0)
    net = compress_(Layers(), {rule: config})
    tokens = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))
    assert set(form_weights(net)) == set(reached)
    net.eval()
    with torch.no_grad():
        out = net(tokens)
        weights = {n: getattr(net.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in reached}
    path = tmp_path / "layers.kpk"
    kernelpack.save(net, path)
    with kernelpack.open(path) as c:
        assert {n: c.info(n).form for n in reached} == reached
    torch.manual_seed(3)
    plain = Layers().eval()
    kernelpack.load_model(plain, path)
    decoded = kernelpack.load(path)
    with torch.no_grad():
        for name in reached:  # the plain model holds exactly the canonical decode ...
            assert torch.equal(dict(plain.named_parameters())[name], decoded[name])
            # ... which the training-time forward computes up to float32 rounding
            torch.testing.assert_close(decoded[name], weights[name], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(plain(tokens), out, atol=1e-5, rtol=1e-5)


def test_a_rule_that_matches_no_parameter_is_a_warning_naming_it() -> None:
    with pytest.warns(UserWarning, match="'nosuch'.*'\\*.bias'"):
        compress_(Layers(), {"nosuch": DCT(), "*.bias": DCT(), "rnn": Dense(dtype="float16")})
    assert parametrize.is_parametrized(compress_(LeNet5(), {"conv1": Series()}).conv1, "weight")


def test_lenet_layers_get_their_forms_and_start_at_the_closed_form_fit() -> None:
    torch.manual_seed(0)
    net = LeNet5()
    dense = {n: p.detach().double().numpy().copy() for n, p in net.named_parameters()}
    rules = {"conv1": Series(harmonics=3), "conv2": Basis(bank=8), "fc1": DCT(keep=0.1),
             "fc2": Linear(alpha=0.5), "fc3": Dense(dtype="float16")}
    compress_(net, rules)
    for module, config in rules.items():
        assert parametrize.is_parametrized(getattr(net, module), "weight")
        expected = config.encode(dense[f"{module}.weight"], "float32").decode(NumpyOps())
        got = getattr(net, module).weight.detach().numpy()
        np.testing.assert_allclose(got, expected, atol=2e-6 * max(1.0, float(np.abs(expected).max())))
    assert not parametrize.is_parametrized(net.conv1, "bias")


def test_a_resnet_compresses_trains_packs_and_loads_into_the_plain_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ResNetS(width=8)
    compress_(net, {"stem.0": Series(harmonics=3), "*shortcut*": Linear(alpha=0.5), "head": DCT(keep=0.5),
                    "*conv1": Basis(bank=16), "*conv2": Series(harmonics=(2, 3))})
    names = set(encoded_state(net))
    assert names == set(ResNetS(width=8).state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))
    net.train()
    for _ in range(2):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(), loss.backward(), opt.step()
    path = tmp_path / "resnet.kpk"
    kernelpack.save(net, path)
    plain = ResNetS(width=8)
    kernelpack.load_model(plain, path)
    net.eval(), plain.eval()
    with torch.no_grad():
        np.testing.assert_allclose(plain(x).numpy(), net(x).numpy(), atol=1e-5)
    with kernelpack.open(path) as c:
        forms = {c.info(n).form for n in c.keys()}
        assert forms == {"series", "basis", "linear", "dct", "dense"}
        assert c.info("layer1.0.bn1.running_mean").form == "dense"


def test_finalize_leaves_plain_dense_weights() -> None:
    torch.manual_seed(0)
    net = compress_(LeNet5(), Series(harmonics=2))
    x = torch.randn(2, 1, 28, 28)
    before = net(x).detach()
    finalize_(net)
    assert not any(parametrize.is_parametrized(m) for m in net.modules())
    assert set(net.state_dict()) == set(LeNet5().state_dict())
    torch.testing.assert_close(net(x).detach(), before)


def test_dense_float32_leaves_a_layer_alone_and_errors_name_the_weight() -> None:
    net = compress_(LeNet5(), {"conv1": Dense(), "*": None})
    assert not any(parametrize.is_parametrized(m) for m in net.modules())
    net = compress_(LeNet5(), {"conv1": Series()})
    with pytest.raises(kernelpack.KernelpackError) as caught:
        compress_(net, {"conv1": Series()})
    assert caught.value.tensor == "conv1.weight"
    with pytest.raises(kernelpack.KernelpackError) as caught:
        compress_(LeNet5(), {"fc1": Series(family="sine")})
    assert (caught.value.tensor, caught.value.field) == ("fc1.weight", "family")


def test_packing_a_trained_value_its_dtype_cannot_hold_names_the_tensor_and_the_file(tmp_path: Path) -> None:
    net = compress_(LeNet5(), {"conv2": Series(harmonics=2)})
    with torch.no_grad():
        net.conv2.parametrizations.weight.original0.mul_(1e7)  # coefficients beyond float16's 65504
    with pytest.raises(kernelpack.KernelpackError, match="65504") as caught:
        encoded_state(net)
    assert (caught.value.tensor, caught.value.field) == ("conv2.weight", "dtype")
    path = tmp_path / "lenet.kpk"
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.save(net, path)
    assert (caught.value.path, caught.value.tensor) == (str(path), "conv2.weight")
    assert not path.exists()
