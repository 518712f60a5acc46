"""``compress_(model, config)``: put a model's weights in stored forms, in place, for training.

In the style of torchao's ``quantize_``: one call with a config, training code
unchanged. Each chosen weight gets the parametrisation of its form
(``torch.nn.utils.parametrize``), initialised from the trained weight by the form's
closed-form fit; ``kernelpack.save(model, path)`` then packs the trained fields as
they are (no re-fit).

Every parameter of rank >= 2 can take a form, whatever its module: conv and linear
weights, ``nn.LSTM``/``nn.GRU``'s ``weight_ih_l0``/``weight_hh_l0`` (and ``_reverse``),
embeddings, ``ConvTranspose``, grouped and depthwise convs, ``nn.MultiheadAttention``'s
``in_proj_weight`` and its ``out_proj`` linear, a bare ``nn.Parameter``: the form is a
parametrisation of that parameter (torch's ``parametrize`` takes any name). Biases, norms
and other rank-1 parameters stay as they are, unless a rule names one *exactly* with a
``Dense`` config (as a calibrated plan of an ONNX model does for biases and norm
parameters): it then trains quantised like any weight. Patterns never reach them.

A form reads the parameter as torch lays it out: dim 0 holds the rows (LinearConv's
filters and primaries), the last two dims a kernel (series, basis). For ``ConvTranspose``
(C_in, C_out/groups, kh, kw) the rows are therefore the *input* channels; for an RNN
weight (4H or 3H, in) they are the gate rows; for an embedding, the tokens.

A config is what every consumer of :mod:`kernelpack.rules` takes: one form config (the
default for every parameter of rank >= 2), a mapping from names and ``fnmatch`` patterns
to form configs (or ``None``: leave alone), a list of ``kernelpack.Rule``, or a function.
Names are the parameter's (``rnn.weight_ih_l0``, ``features.3.weight``) and its module's
(``rnn``, ``features.3``); precedence (kernelpack.rules' table): the exact parameter name,
then the exact module name, then the first matching pattern, then the default; a parameter
no rule chooses is left alone. So ``{"conv1": Series(harmonics=4), "rnn.weight_hh_l0": None,
"*": Basis(bank=8)}`` gives conv1 a series, leaves one LSTM matrix dense and gives every
other weight a bank. A rule that chooses no parameter compress_ reaches is a warning (a typo
would otherwise leave the model silently uncompressed). ``kernelpack.plan`` returns such a mapping.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from kernelpack.converters._common import FormWeight, _join, _split, form_weights
from kernelpack.converters.basis import BasisWeight
from kernelpack.converters.dct import DCTWeight
from kernelpack.converters.dense import DenseWeight
from kernelpack.converters.linear import LinearWeight
from kernelpack.converters.series import SeriesWeight
from kernelpack.errors import KernelpackError
from kernelpack.forms import DCT, Basis, Config, Dense, Linear, Series
from kernelpack.rules import FormPlan, Match, Rules, report_unused, rules_of

#: The training-time parametrisation of each form's config.
PARAMETRISATIONS: dict[type, type[FormWeight]] = {
    DCT: DCTWeight, Series: SeriesWeight, Basis: BasisWeight, Linear: LinearWeight, Dense: DenseWeight}


def targets(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(module name, module, parameter name, its value) of every parameter, and of every
    parametrised one (so that a rule naming it is refused, not ignored); the trained fields
    inside parametrisations are not targets themselves."""
    inside = {id(m) for module in model.modules() if parametrize.is_parametrized(module)
              for m in module.parametrizations.modules()}
    for module_name, module in model.named_modules():
        if id(module) in inside:
            continue
        for tensor, param in module.named_parameters(recurse=False):
            yield module_name, module, tensor, param
        if parametrize.is_parametrized(module):
            for tensor in module.parametrizations:
                with torch.no_grad():  # its current value, for the rules' selectors
                    value = getattr(module, tensor)
                yield module_name, module, tensor, value


def chosen_parameters(model: nn.Module, rules: Rules) -> list[tuple[str, nn.Module, str, Config | None]]:
    """(module name, module, parameter name, config) of every parameter a rule chooses within
    compress_'s reach (:func:`reaches`); warns of the rules that chose none of them."""
    found, names = [], []
    for module_name, module, tensor, value in targets(model):
        name = _join(module_name, tensor)
        names.append(name)
        try:
            match = rules.match(name, value)
        except KernelpackError as exc:
            raise exc.located(tensor=name) from None
        if match is not None and reaches(match, value):
            found.append((module_name, module, tensor, match))
    report_unused(rules.unused(m for *_, m in found), names, what=REACH)
    return [(m, module, t, match.config) for m, module, t, match in found]


#: What compress_ gives forms to, in its warning for a rule that chose nothing.
REACH = "parameter compress_ reaches (rank >= 2, or rank 1 named exactly with a Dense config)"


def reaches(match: Match, value: torch.Tensor) -> bool:
    """Parameters of rank >= 2 take a form by any rule; a rank-1 one (a bias, a norm's scale)
    only by a rule naming it exactly with a Dense config, as a calibrated plan of an ONNX model
    does: a pattern such as ``'*'`` means the weights, and a bias in a structured form has no
    kernel to fit."""
    return value.ndim >= 2 or value.ndim == 1 and match.step == "name" and isinstance(match.config, Dense)


def compress_(model: nn.Module, config: FormPlan) -> nn.Module:
    """Put the weights a config chooses in their forms, in place, for training or fine-tuning.

    Each chosen weight becomes a ``torch.nn.utils.parametrize`` parametrisation holding its
    form's stored fields, fitted in closed form from the weight; the forward pass uses the
    numbers as they will be stored, so ``kernelpack.save(model, path)`` packs exactly what
    was trained. Training code stays unchanged.

    Args:
        model: the ``nn.Module`` to change.
        config: which parameter gets which form (rules as for ``save``). Parameters of rank
            >= 2 take a form by any rule; rank-1 ones (biases, norm scales) only by a rule
            naming them exactly with a Dense config. A Dense config without a narrower dtype
            or a step leaves the weight alone.

    Returns:
        ``model`` itself.

    Raises:
        KernelpackError: naming the parameter and field; the model and every rule are
            checked before any weight changes. A rule no parameter matches is a UserWarning.

    Example:
        >>> import torch, kernelpack
        >>> from kernelpack import Series
        >>> from torch.nn.utils import parametrize
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        >>> _ = kernelpack.compress_(model, {"0": Series(harmonics=2)})  # conv 0's kernel, not its bias
        >>> parametrize.is_parametrized(model[0], "weight"), parametrize.is_parametrized(model[2])
        (True, False)
        >>> _ = kernelpack.save(model, "trained.kpk")  # the series coefficients it trained
    """
    if not isinstance(model, nn.Module):
        raise KernelpackError(f"takes an nn.Module, got {type(model).__name__}", field="model")
    if config is None:  # nothing to do is a mistake here, not "leave every weight alone"
        raise KernelpackError("compress_ needs a config: a form config, a mapping of names and patterns to "
                              "configs, a list of kernelpack.Rule, or a function", field="config")
    rules = rules_of(config, "config")
    hessians = getattr(config, "hessians", None) or {}  # a calibrated Plan's statistics
    for module_name, module, tensor, chosen in chosen_parameters(model, rules):
        if chosen is None or (isinstance(chosen, Dense) and chosen.dtype in (None, "float32")
                              and not chosen.quantised):
            continue
        try:
            if parametrize.is_parametrized(module, tensor):
                raise KernelpackError("is already parametrised", field=tensor)
            if type(chosen) not in PARAMETRISATIONS:
                raise KernelpackError(f"{chosen!r} is not a form config", field="config")
            choice = chosen.code_choice  # the straight-through forward rounds each number alone, to nearest
            if choice is not None:
                raise KernelpackError(f"{choice[1]} chooses codes from the whole array at pack time; training "
                                      f"quantises to nearest: use {choice[0]} in save's forms, not in compress_",
                                      field=choice[0])
            form = PARAMETRISATIONS[type(chosen)](getattr(module, tensor).shape, chosen)
            form.hessian = hessians.get(_join(module_name, tensor))
            try:
                parametrize.register_parametrization(module, tensor, form)
            finally:
                form.hessian = None
        except KernelpackError as exc:
            raise exc.located(tensor=_join(module_name, tensor)) from None
    return model


def finalize_(model: nn.Module) -> nn.Module:
    """Replace every kernelpack parametrisation by its current dense weight (for export)."""
    for name in form_weights(model):
        module_name, tensor = _split(name)
        parametrize.remove_parametrizations(model.get_submodule(module_name), tensor, leave_parametrized=True)
    return model

