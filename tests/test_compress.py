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
from kernelpack.converters import compress_, encoded_state, finalize_, rule_for
from kernelpack.converters.examples import LeNet5, ResNetS


def test_rules_exact_names_first_then_the_first_matching_pattern() -> None:
    rules = {"conv2": Series(harmonics=2), "conv*": Basis(bank=4), "fc1.weight": None, "*": Linear()}
    assert rule_for(rules, "conv2") == Series(harmonics=2)
    assert rule_for(rules, "conv1") == Basis(bank=4)
    assert rule_for(rules, "fc1") is None
    assert rule_for(rules, "fc2") == Linear()
    assert rule_for(DCT(), "anything") == DCT()
    assert rule_for({"conv1": DCT()}, "fc3") is None


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
