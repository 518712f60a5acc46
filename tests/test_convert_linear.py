"""LinearConv in training: primaries and A train, the order of converted layers is kept, and
the correlation regulariser is the paper's Algorithm 1 (linearconv.txt)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kernelpack
from kernelpack import Linear
from kernelpack.converters import compress_, correlation_loss, fine_tune
from kernelpack.converters._common import fields


def test_a_converted_layer_keeps_its_pivot_order_and_starts_at_the_closed_form_fit() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    dense = conv.weight.detach().double().numpy().copy()
    expected = Linear(alpha=0.5).encode(dense)
    compress_(conv, Linear(alpha=0.5))
    plist = conv.parametrizations.weight
    assert torch.equal(plist[0].order, torch.from_numpy(expected.order.data.astype(np.int64)))
    from kernelpack._backend import NumpyOps

    np.testing.assert_allclose(conv.weight.detach().numpy(), expected.decode(NumpyOps()), atol=1e-6)


def test_a_layer_trained_from_scratch_has_its_primaries_first_and_no_order() -> None:
    torch.manual_seed(0)
    fc = compress_(nn.Linear(6, 6), Linear(primaries=3, pivot=False))
    assert torch.equal(fc.parametrizations.weight[0].order, torch.arange(6))  # the identity, not stored
    (primaries, a) = fields(fc.parametrizations.weight)
    with torch.no_grad():
        np.testing.assert_allclose(fc.weight[:3].numpy(), primaries.half().float().numpy())
        np.testing.assert_allclose(fc.weight[3:].numpy(), (a.half().float().T @ primaries.half().float()).numpy(),
                                   atol=1e-6)
    assert "order" not in kernelpack.converters.encoded_state(fc)["weight"].arrays()


def test_correlation_loss_is_algorithm_1() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 1))
    compress_(net, Linear(alpha=0.5, dtype="float32"))
    expected = 0.0
    for layer in (net[0], net[2]):
        primaries = fields(layer.parametrizations.weight)[0].detach().double()
        v = primaries.reshape(len(primaries), -1)
        v = v / v.norm(dim=1, keepdim=True)
        expected += float((v @ v.T - torch.eye(len(v), dtype=v.dtype)).abs().sum())
    assert float(correlation_loss(net).detach()) == pytest.approx(expected, rel=1e-5)


def test_correlation_loss_is_zero_for_orthogonal_primaries_and_training_reduces_it() -> None:
    fc = compress_(nn.Linear(4, 4), Linear(primaries=2, dtype="float32"))
    (primaries, _) = fields(fc.parametrizations.weight)
    with torch.no_grad():
        primaries.copy_(torch.tensor([[3.0, 0, 0, 0], [0, -2.0, 0, 0]]))
    assert float(correlation_loss(fc).detach()) == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    compress_(net, {"1": Linear(alpha=0.5)})
    x, y = torch.randn(64, 4, 4), torch.randint(0, 3, (64,))
    before = float(correlation_loss(net).detach())
    fine_tune(net, x, y, epochs=20, lr=1e-2, regularizer=lambda m: 0.1 * correlation_loss(m), progress=False)
    assert float(correlation_loss(net).detach()) < 0.5 * before


def test_correlation_loss_needs_a_linear_layer() -> None:
    with pytest.raises(kernelpack.KernelpackError):
        correlation_loss(nn.Linear(3, 3))
