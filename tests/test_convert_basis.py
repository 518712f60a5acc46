"""The basis form in training: frozen shared banks, trainable a and b, re-assignment, banks
from k-means, from the paper's Gaussian family, or from the user (few-unique-filters.txt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

import kernelpack
from kernelpack import Basis
from kernelpack.converters import compress_, gaussian_bank, model_bank, reassign_
from kernelpack.converters.examples import ResNetS
from kernelpack.forms.basis import normalize_rows


def test_bank_and_index_are_frozen_and_a_b_train() -> None:
    conv = compress_(nn.Conv2d(4, 6, 3), Basis(bank=5))
    plist = conv.parametrizations.weight
    trainable = {n for n, p in conv.named_parameters()}
    assert trainable == {"bias", "parametrizations.weight.original0", "parametrizations.weight.original1"}
    assert {n for n, _ in conv.named_buffers()} == {"parametrizations.weight.0.bank",
                                                     "parametrizations.weight.0.index"}
    assert plist[0].bank.shape == (5, 3, 3) and plist[0].index.shape == (24,)


def test_reassign_moves_a_slice_to_the_filter_its_gradient_pulls_towards() -> None:
    torch.manual_seed(0)
    conv = compress_(nn.Conv2d(2, 4, 3), Basis(bank=4, dtype="float32"))
    plist = conv.parametrizations.weight
    bank = plist[0].bank
    current = int(plist[0].index[0])
    other = (current + 1) % 4
    target = conv.weight.detach().clone()
    target[0, 0] = 2.0 * bank[other] + 0.5
    loss = ((conv.weight - target) ** 2).sum()  # gradient 2 (W - T): lr 0.5 lands on T
    loss.backward()
    reassign_(conv, lr=0.5)
    assert int(plist[0].index[0]) == other
    np.testing.assert_allclose(conv.weight.detach().numpy(), target.numpy(), atol=1e-5)
    before = plist[0].index.clone()
    reassign_(conv, lr=0.5)  # no gradient since: nothing moves
    assert torch.equal(plist[0].index, before)


def test_gaussian_bank_is_the_papers_family_normalised() -> None:
    bank = gaussian_bank(5, sigmas=(0.7, 1.4))
    assert bank.shape == (14, 5, 5)
    flat = bank.reshape(14, -1)
    np.testing.assert_allclose(flat, normalize_rows(flat), atol=1e-12)
    # derivative filters are odd: g_x(-x) = -g_x(x)
    np.testing.assert_allclose(bank[1], -bank[1][:, ::-1], atol=1e-12)
    assert gaussian_bank(1).shape[0] == 0  # a 1x1 kernel has no non-constant filter


def test_one_bank_shared_by_every_layer_is_stored_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ResNetS(width=8)
    bank = model_bank(net, 8)
    assert bank.shape == (8, 3, 3)
    compress_(net, {"*shortcut*": None, "head": None, "*": Basis(bank=bank, bank_name="resnet-3x3")})
    path = tmp_path / "net.kpk"
    kernelpack.save(net, path)
    with kernelpack.open(path) as c:
        assert list(c.bank_info()) == ["resnet-3x3"]
        basis = [n for n in c.keys() if c.info(n).form == "basis"]
        assert len(basis) == 9  # stem + 8 block convs
        plain = ResNetS(width=8)
        kernelpack.load_model(plain, path)
    x = torch.randn(2, 1, 12, 12)
    net.eval(), plain.eval()
    np.testing.assert_allclose(plain(x).detach().numpy(), net(x).detach().numpy(), atol=1e-5)


def test_user_bank_from_the_gaussian_family_trains() -> None:
    conv = compress_(nn.Conv2d(3, 8, 5), Basis(bank=gaussian_bank(5)))
    x, target = torch.randn(4, 3, 9, 9), torch.randn(4, 8, 5, 5)
    opt = torch.optim.Adam(conv.parameters(), lr=1e-2)
    first = None
    for _ in range(10):
        loss = ((conv(x) - target) ** 2).mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad(), loss.backward(), opt.step()
    assert float(loss.detach()) < first
