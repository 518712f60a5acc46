"""Convolutional Similarity: a training aid that makes a layer's feature maps less alike.

From convolutional-similarity.txt (Belmekki et al.). Not a stored form: it shapes
weights before or during training, and nothing about it is written to a container.

What is computed, followed from the paper
-----------------------------------------
The loss of one layer is eq. 10, exactly::

    L_CS = sum_{i<j} sum_{c1, c2} || K_i[c1] (x) K_j[c2] ||^2

over every pair i < j of the layer's filters, every pair (c1, c2) of input channels, with
(x) the full 2-D cross-correlation ((2kh-1) x (2kw-1) outputs) and ||.||^2 the plain sum
of squares. The paper applies no normalisation (none by the number of pairs, channels or
kernel norms), so neither do we; eq. 9 (ordered pairs i != j) is twice this value. The
authors' public code sums only adjacent filters (i, i+1) and matching channels
(c1 == c2); we follow the paper, not that code.

The loss ignores the layer's stride and padding, as the paper does (eq. 10 is exact for
full cross-correlation and, by its appendix 6.1, approximate for "same" and "valid").
Dilation would not change it: a dilated kernel is the kernel with zeros inserted, and
the sum of squares of a full cross-correlation does not see inserted zeros.

Grouped and depthwise convolutions: a Conv2d weight (C_out, C_in / groups, kh, kw) is
the dense weight with zeros on the input channels outside each filter's group. Eq. 10
sums over all channel pairs, where zero channels add nothing, so applying it to the
stored weight gives exactly eq. 10 of the dense-equivalent layer: all filter pairs,
across groups too. Depthwise (C_in / groups = 1) is the single-channel case.

Why it is cheap (the forms)
---------------------------
Summing over all pairs naively costs O(S^2 C^2) cross-correlations for S filters of C
channels. For any two kernels, ||a (x) b||^2 = <a (x) a, b (x) b> (expand the square and
sum over the shift first), so with Q_i = sum_c K_i[c] (x) K_i[c] the autocorrelation of
filter i summed over its channels::

    sum_{c1, c2} ||K_i[c1] (x) K_j[c2]||^2 = <Q_i, Q_j>
    L_CS = sum_{i<j} <Q_i, Q_j> = (||sum_i Q_i||^2 - sum_i ||Q_i||^2) / 2

which is linear in S. ``method`` picks how Q is obtained:

* ``"autocorr"`` (default): in space. The channel Gram matrix of each filter,
  G_i[m, m'] = sum_c K_i[c][m] K_i[c][m'] over kernel positions m, m', is one batched
  matrix product; Q_i[d] = sum_m G_i[m, m + d] places each row of G_i at its shift and
  adds, which is exactly what ``F.fold`` does. Cost O(S C (kh kw)^2).
* ``"fft"``: by Parseval. On a grid of H x W = (2kh-1) x (2kw-1) points, the smallest
  that holds Q without wrap-around, <Q_i, Q_j> = (1 / HW) sum_w P_i(w) P_j(w) with
  P_i = sum_c |FFT(K_i[c])|^2. Cost O(S C HW log HW): better for large kernels.
* ``"naive"``: the reference, eq. 10 as written: one conv2d per filter i computes every
  K_i[c1] (x) K_j[c2] for j > i. Quadratic in S in time and memory; for tests.

Every form is made of differentiable torch ops, so autograd gives the gradient, and of
deterministic ones (no atomics), so results repeat bit for bit on CPU and CUDA.
float16 and bfloat16 weights are computed in float32: the loss is a sum of fourth
powers of weights over S^2 terms and would overflow float16.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernelpack.errors import KernelpackError


def convsim_loss(weight: torch.Tensor, *, method: str = "autocorr") -> torch.Tensor:
    """L_CS (eq. 10) of one Conv2d weight (C_out, C_in / groups, kh, kw), a 0-d tensor.

    Differentiable. float64 weights give a float64 loss; float32, float16 and bfloat16
    weights a float32 one. ``method``: "autocorr" (default), "fft" or "naive" (above).
    """
    form = _FORMS[_checked_method(method)]
    return form(_checked_weight(weight))


def convsim_penalty(model: nn.Module, *, method: str = "autocorr") -> torch.Tensor:
    """Sum of L_CS over the model's nn.Conv2d layers (paper Algorithm 2's regulariser).

    Use inside any training loop: ``loss = task_loss + beta * convsim_penalty(model)``
    (the paper's beta was 1e-3). Reads ``module.weight``, so a weight parametrized with
    ``torch.nn.utils.parametrize`` is seen as the layer uses it and gradients reach its
    underlying parameters. Each Conv2d module counts once even if reached twice;
    other convolutions (ConvTranspose2d, Conv1d, ...) are not included.
    """
    _checked_method(method)
    losses = []
    for name, module in _conv_layers(model):
        try:
            losses.append(convsim_loss(module.weight, method=method))
        except KernelpackError as error:
            raise error.located(tensor=f"{name}.weight") from None
    return torch.stack(losses).sum()


def convsim_init_(model: nn.Module, steps: int = 500, lr: float = 1e-3, *,
                  method: str = "autocorr") -> list[float]:
    """Minimise ``convsim_penalty(model)`` in place before training (paper Algorithm 1).

    As in the paper (Section 4.2, I = 500, "Adam optimiser with a learning rate of
    0.001"): ``steps`` steps of torch.optim.Adam (default betas and eps, no weight
    decay) on the trainable parameters of the Conv2d layers, starting from the weights
    as they are; only those that the weights depend on move (biases get no gradient).
    Weights are not renormalised, since the paper does not. L_CS is homogeneous of
    degree 4 in the weights, so much of its fall is shrinkage: the paper's CNNs follow
    every conv by BatchNorm, which undoes the scale; without it, mind ``lr`` and ``steps``.

    No random numbers are drawn: the result is a function of the starting weights
    (seed the model's own initialisation for a reproducible run) and repeats bit for
    bit. Gradients of the stepped parameters are left as None.
    Returns the penalty before each step and after the last (steps + 1 floats).
    """
    _checked_method(method)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise KernelpackError(f"must be an integer >= 0, got {steps!r}", field="steps")
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise KernelpackError(f"must be a finite number > 0, got {lr!r}", field="lr")
    params = _trainable_parameters(model)
    optimiser = torch.optim.Adam(params, lr=lr)
    history = []
    with torch.enable_grad():
        for _ in range(steps):
            optimiser.zero_grad(set_to_none=True)
            loss = convsim_penalty(model, method=method)
            history.append(loss.item())
            loss.backward(inputs=params)
            optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    with torch.no_grad():
        history.append(convsim_penalty(model, method=method).item())
    return history


# --- the forms: weight (S, C, kh, kw) -> L_CS ------------------------------------------
def _autocorr_form(w: torch.Tensor) -> torch.Tensor:
    s, c, kh, kw = w.shape
    flat = w.reshape(s, c, kh * kw)
    gram = torch.bmm(flat.transpose(1, 2), flat)  # (S, kh kw, kh kw), symmetric
    # fold adds block l at offset l of the (2kh-1, 2kw-1) grid; row m of G belongs at
    # offset (kh-1, kw-1) - m, i.e. block kh kw - 1 - m: reverse the block order.
    q = F.fold(gram.flip(-1), (2 * kh - 1, 2 * kw - 1), (kh, kw))
    return _pair_sum(q.reshape(s, -1))


def _fft_form(w: torch.Tensor) -> torch.Tensor:
    s, _, kh, kw = w.shape
    grid = (2 * kh - 1, 2 * kw - 1)
    power = torch.fft.rfft2(w, s=grid).abs().square().sum(1)  # (S, 2kh-1, kw)
    # rfft2 keeps kw of the 2kw-1 columns; columns 1.. stand for a conjugate pair each
    # (odd width: no Nyquist column). Fold weights and 1/HW in as square roots.
    counts = torch.full((kw,), 2.0, dtype=power.dtype, device=power.device)
    counts[0] = 1.0
    scaled = power * (counts / math.prod(grid)).sqrt()
    return _pair_sum(scaled.reshape(s, -1))


def _naive_form(w: torch.Tensor) -> torch.Tensor:
    s, _, kh, kw = w.shape
    terms = []
    for i in range(s):  # the last i has no j > i: an empty batch keeps the graph for S = 1
        # batch (j, c2) for j > i against output channel c1: conv2d is cross-correlation,
        # and padding k-1 makes it full, so xcorr[(j, c2), c1] = K_i[c1] (x) K_j[c2].
        xcorr = F.conv2d(w[i + 1:].reshape(-1, 1, kh, kw), w[i].unsqueeze(1),
                         padding=(kh - 1, kw - 1))
        terms.append(xcorr.square().sum())
    return torch.stack(terms).sum()


def _pair_sum(q: torch.Tensor) -> torch.Tensor:
    """sum_{i<j} <q_i, q_j> over the rows of q, in time linear in the number of rows."""
    return (q.sum(0).square().sum() - q.square().sum()) / 2


_FORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "autocorr": _autocorr_form, "fft": _fft_form, "naive": _naive_form}
METHODS = tuple(_FORMS)


# --- checks and model walking ----------------------------------------------------------
def _checked_method(method: str) -> str:
    if method not in _FORMS:
        raise KernelpackError(f"must be one of {', '.join(METHODS)}, got {method!r}", field="method")
    return method


def _checked_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as computed: 4-D, non-empty, real floating point, half types widened."""
    if not isinstance(weight, torch.Tensor):
        raise KernelpackError(f"must be a torch.Tensor, got {type(weight).__name__}", field="weight")
    if weight.dim() != 4 or 0 in weight.shape:
        raise KernelpackError("must be a Conv2d weight (C_out, C_in / groups, kh, kw) with no "
                              f"empty dimension, got shape {tuple(weight.shape)}", field="weight")
    if not weight.is_floating_point():
        raise KernelpackError(f"must be real floating point, got {weight.dtype}", field="weight")
    return weight if weight.dtype in (torch.float32, torch.float64) else weight.float()


def _conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not layers:
        raise KernelpackError("the model has no nn.Conv2d layer", field="model")
    return layers


def _trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the Conv2d layers (parametrization originals included), each once."""
    unique = {id(p): p for _, m in _conv_layers(model) for p in m.parameters() if p.requires_grad}
    if not unique:
        raise KernelpackError("no nn.Conv2d layer has a trainable parameter", field="model")
    return list(unique.values())
