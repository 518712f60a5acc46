"""Convolutional Similarity (paper eq. 10, Algorithms 1 and 2): the loss, its fast forms,
the model penalty and the iterative initialisation.

The spec is eq. 10 written out with numpy loops (``eq10``); the naive pairwise form must
equal it, and the fast forms must equal the naive one in value and gradient.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations

import kernelpack
from kernelpack.converters.convsim import METHODS, convsim_init_, convsim_loss, convsim_penalty
from conftest import rel_error, seeds

FAST = ("autocorr", "fft")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def full_xcorr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a (x) b)[n] = sum_m a[m] b[m + n] for every shift n in [1-k, k-1] (paper eq. 1b, 2-D)."""
    kh, kw = a.shape
    padded = np.pad(b, ((kh - 1, kh - 1), (kw - 1, kw - 1)))
    return np.array([[np.sum(a * padded[y:y + kh, x:x + kw]) for x in range(2 * kw - 1)]
                     for y in range(2 * kh - 1)])


def eq10(w: np.ndarray) -> float:
    """L_CS literally: filters i < j, channels c1, c2, squared full cross-correlation."""
    s, c = w.shape[:2]
    return sum(np.sum(full_xcorr(w[i, c1], w[j, c2]) ** 2)
               for i in range(s) for j in range(i + 1, s) for c1 in range(c) for c2 in range(c))


def weights(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)).to(dtype)


def value_and_grad(w: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.detach().clone().requires_grad_()
    loss = convsim_loss(w, method=method)
    loss.backward()
    return loss.detach(), w.grad


layer_shapes = st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5))


# --- the definition ---------------------------------------------------------------------
def test_two_filters_of_one_row():
    """K1 = [1 2], K2 = [3 4]: the full cross-correlation is [4, 11, 6] -> 16 + 121 + 36."""
    w = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 4.0]]]], dtype=torch.float64)
    for method in METHODS:
        assert convsim_loss(w, method=method).item() == pytest.approx(173.0, rel=1e-12)


def test_every_pair_of_filters_counts_once():
    """Three 1x1 filters a, b, c: (ab)^2 + (ac)^2 + (bc)^2, not adjacent pairs only, not i != j."""
    w = torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64).reshape(3, 1, 1, 1)
    for method in METHODS:
        assert convsim_loss(w, method=method).item() == pytest.approx(36 + 100 + 225, rel=1e-12)


def test_every_pair_of_channels_counts():
    """1x1 filters a, b of C channels: sum over (c1, c2) of (a_c1 b_c2)^2 = |a|^2 |b|^2
    (matching channels only would give sum_c (a_c b_c)^2)."""
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64).reshape(2, 2, 1, 1)
    for method in METHODS:
        assert convsim_loss(w, method=method).item() == pytest.approx(5 * 10, rel=1e-12)


@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
       seed=seeds)
def test_naive_form_is_eq10(shape, seed):
    w = weights(seed, shape)
    assert rel_error(convsim_loss(w, method="naive"), eq10(w.numpy())) <= 1e-12


def test_one_filter_has_no_pairs_but_keeps_the_graph():
    for method in METHODS:
        loss, grad = value_and_grad(weights(0, (1, 3, 3, 3)), method)
        assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


# --- the fast forms equal the naive one ---------------------------------------------------
@given(shape=layer_shapes, seed=seeds, method=st.sampled_from(FAST))
def test_fast_forms_match_naive_in_value_and_gradient_fp64(shape, seed, method):
    w = weights(seed, shape)
    value, grad = value_and_grad(w, method)
    ref_value, ref_grad = value_and_grad(w, "naive")
    assert value.dtype == torch.float64
    assert rel_error(value, ref_value) <= 1e-6
    assert rel_error(grad, ref_grad) <= 1e-6


@pytest.mark.parametrize("method", FAST)
def test_fast_forms_gradients_pass_gradcheck(method):
    w = weights(1, (3, 2, 3, 2)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: convsim_loss(x, method=method), (w,))


@pytest.mark.parametrize("method", METHODS)
def test_float32_stays_float32_and_accurate(method):
    shape = (24, 8, 3, 3) if method == "naive" else (128, 64, 3, 3)
    w = weights(2, shape)
    value, grad = value_and_grad(w.float(), method)
    ref_value, ref_grad = value_and_grad(w.float().double(), "autocorr")
    assert value.dtype == grad.dtype == torch.float32
    assert rel_error(value, ref_value) <= 1e-5
    assert rel_error(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weights_are_computed_in_float32(dtype):
    w = weights(3, (8, 4, 3, 3), dtype)
    for method in METHODS:
        loss = convsim_loss(w, method=method)
        assert loss.dtype == torch.float32
        assert rel_error(loss, convsim_loss(w.double())) <= 1e-5


def test_dilation_does_not_change_the_loss():
    """A dilated kernel is the kernel with zeros inserted; the loss does not see them."""
    w = weights(4, (5, 3, 3, 2))
    dilated = torch.zeros(5, 3, 5, 3, dtype=w.dtype)
    dilated[:, :, ::2, ::2] = w
    for method in METHODS:
        assert rel_error(convsim_loss(dilated, method=method), convsim_loss(w, method="naive")) <= 1e-12


# --- layers and models -------------------------------------------------------------------
def block_diagonal(conv: nn.Conv2d) -> torch.Tensor:
    """The dense (C_out, C_in, kh, kw) weight a grouped convolution stands for."""
    out_per, in_per = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    dense = torch.zeros(conv.out_channels, conv.in_channels, *conv.kernel_size, dtype=conv.weight.dtype)
    for g in range(conv.groups):
        dense[g * out_per:(g + 1) * out_per, g * in_per:(g + 1) * in_per] = conv.weight[g * out_per:(g + 1) * out_per]
    return dense


@pytest.mark.parametrize("groups", [2, 6])  # 6: depthwise
def test_grouped_weight_is_its_dense_equivalent(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, (3, 2), groups=groups).double()
    expected = convsim_loss(block_diagonal(conv), method="naive").detach()
    for method in METHODS:
        assert rel_error(convsim_loss(conv.weight, method=method), expected) <= 1e-12


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shared = nn.Conv2d(4, 4, 3, padding=1)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), shared, nn.ReLU(), shared,
                                      nn.Conv2d(4, 8, 1, groups=2), nn.ConvTranspose2d(8, 8, 3))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 2))


def net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def test_penalty_sums_each_conv2d_layer_once():
    model = net()
    convs = [model.features[0], model.features[2], model.features[5]]
    expected = sum(convsim_loss(c.weight, method="naive") for c in convs).detach()
    for method in METHODS:
        assert rel_error(convsim_penalty(model, method=method), expected) <= 1e-12


def test_penalty_sees_a_parametrized_weight_and_reaches_its_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 5, 3)), nn.Conv2d(5, 2, 1)).double()
    penalty = convsim_penalty(model)
    expected = convsim_loss(model[0].weight) + convsim_loss(model[1].weight)
    assert rel_error(penalty, expected.detach()) <= 1e-12
    penalty.backward()
    originals = model[0].parametrizations.weight
    assert originals.original0.grad is not None and originals.original1.grad is not None
    assert model[0].bias.grad is None


# --- iterative initialisation ------------------------------------------------------------
def conv_parameters(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters()}


def test_init_is_adam_on_the_penalty_without_renormalisation():
    """Algorithm 1 with the paper's optimiser: Adam steps on the conv weights, nothing else."""
    model, reference = net(), net()
    weights_ = [m.weight for m in reference.modules() if isinstance(m, nn.Conv2d)]
    optimiser = torch.optim.Adam(weights_, lr=1e-2)
    for _ in range(5):
        optimiser.zero_grad()
        convsim_penalty(reference).backward()
        optimiser.step()
    history = convsim_init_(model, 5, 1e-2)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert rel_error(p, q.detach()) <= 1e-9, name
        assert p.grad is None
    assert len(history) == 6 and history[-1] < history[0]
    assert history[-1] == pytest.approx(convsim_penalty(model).item(), rel=1e-12)


def test_init_moves_only_conv_weights():
    model, before = net(), net()
    convsim_init_(model, 3)
    conv = conv_parameters(model)
    for (name, p), q in zip(model.named_parameters(), before.parameters()):
        moved = not torch.equal(p, q)
        assert moved == (id(p) in conv and not name.endswith("bias")), name
    for a, b in zip(model.buffers(), before.buffers()):
        assert torch.equal(a, b)


def test_init_is_deterministic_and_draws_no_random_numbers():
    first, second = net(), net()
    state = torch.random.get_rng_state()
    history = convsim_init_(first, 10, 1e-2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert convsim_init_(second, 10, 1e-2) == history
    for p, q in zip(first.parameters(), second.parameters()):
        assert torch.equal(p, q)


def test_init_lowers_the_penalty_of_a_parametrized_model_under_no_grad():
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 8, 3)), nn.Conv2d(8, 8, 3))
    with torch.no_grad():
        history = convsim_init_(model, 10, 1e-2)
    assert history[-1] < 0.5 * history[0]


def test_zero_steps_changes_nothing():
    model, before = net(), net()
    assert convsim_init_(model, 0) == [convsim_penalty(before).item()]
    for p, q in zip(model.parameters(), before.parameters()):
        assert torch.equal(p, q)


# --- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("weight, field", [
    (torch.zeros(3, 3, 3), "weight"), (torch.zeros(2, 0, 3, 3), "weight"),
    (torch.zeros(2, 2, 3, 3, dtype=torch.int32), "weight"), (np.zeros((2, 2, 3, 3)), "weight")])
def test_bad_weight(weight, field):
    with pytest.raises(kernelpack.KernelpackError) as error:
        convsim_loss(weight)
    assert error.value.field == field


def test_bad_arguments():
    def field_of(call):
        with pytest.raises(kernelpack.KernelpackError) as error:
            call()
        return error.value.field

    assert field_of(lambda: convsim_loss(torch.zeros(2, 2, 3, 3), method="adjacent")) == "method"
    assert field_of(lambda: convsim_penalty(net(), method="FFT")) == "method"
    assert field_of(lambda: convsim_penalty(nn.Linear(3, 3))) == "model"
    assert field_of(lambda: convsim_init_(net(), -1)) == "steps"
    assert field_of(lambda: convsim_init_(net(), True)) == "steps"
    assert field_of(lambda: convsim_init_(net(), 1, 0.0)) == "lr"
    assert field_of(lambda: convsim_init_(net(), 1, float("nan"))) == "lr"
    frozen = net().requires_grad_(False)
    assert field_of(lambda: convsim_init_(frozen, 1)) == "model"


def test_penalty_names_the_layer_with_a_bad_weight():
    model = net()
    del model.features[5].weight
    model.features[5].weight = torch.zeros(8, 2, 1)
    with pytest.raises(kernelpack.KernelpackError) as error:
        convsim_penalty(model)
    assert error.value.tensor == "features.5.weight" and error.value.field == "weight"


# --- CUDA ---------------------------------------------------------------------------------
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu_naive(method, dtype, tolerance):
    w = weights(5, (16, 8, 3, 2))
    value, grad = value_and_grad(w.to("cuda", dtype), method)
    ref_value, ref_grad = value_and_grad(w.to(dtype).double(), "naive")
    assert value.device.type == "cuda" and value.dtype == dtype
    assert rel_error(value, ref_value) <= tolerance
    assert rel_error(grad, ref_grad) <= tolerance


@pytest.mark.cuda
@cuda
def test_cuda_init_is_deterministic():
    first, second = net().cuda().float(), net().cuda().float()
    assert convsim_init_(first, 10, 1e-2) == convsim_init_(second, 10, 1e-2)
    for p, q in zip(first.parameters(), second.parameters()):
        assert torch.equal(p, q)
