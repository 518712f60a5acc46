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

A config is one form config (the default for every such parameter), or a mapping from
names to form configs (or ``None``: leave alone). A key is an exact name or an ``fnmatch``
pattern, matched against the parameter's name (``rnn.weight_ih_l0``, ``features.3.weight``)
and its module's name (``rnn``, ``features.3``). Precedence: the exact parameter name, then
the exact module name, then the first matching pattern; a parameter no key matches is left
alone. So ``{"conv1": Series(harmonics=4), "rnn.weight_hh_l0": None, "*": Basis(bank=8)}``
gives conv1 a series, leaves one LSTM matrix dense and gives every other weight a bank.
A key that matches no parameter of rank >= 2 is a warning (a typo would otherwise leave
the model silently uncompressed). ``kernelpack.plan`` returns such a mapping.
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from kernelpack.converters._common import FormWeight, fields, form_weights
from kernelpack.converters.basis import BasisWeight
from kernelpack.converters.dct import DCTWeight
from kernelpack.converters.dense import DenseWeight
from kernelpack.converters.linear import LinearWeight
from kernelpack.converters.series import SeriesWeight
from kernelpack.errors import KernelpackError
from kernelpack.forms import DCT, Basis, Config, Dense, Linear, Series
from kernelpack.forms._base import key_shown, shown

#: The training-time parametrisation of each form's config.
PARAMETRISATIONS: dict[type, type[FormWeight]] = {
    DCT: DCTWeight, Series: SeriesWeight, Basis: BasisWeight, Linear: LinearWeight, Dense: DenseWeight}
Rules = Config | Mapping[str, Config | None]


def rule_for(config: Rules, module_name: str, tensor: str = "weight") -> Config | None:
    """The config parameter ``tensor`` of module ``module_name`` gets: its exact parameter name,
    else its exact module name, else the first pattern matching either, else None."""
    if hasattr(config, "encode"):
        return config  # type: ignore[return-value]
    names = (_join(module_name, tensor), module_name)
    for name in names:
        if name in config:  # type: ignore[operator]
            return config[name]  # type: ignore[index]
    for pattern, value in config.items():  # type: ignore[union-attr]
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            return value
    return None


def targets(model: nn.Module, rank: int = 2) -> Iterator[tuple[str, nn.Module, str]]:
    """(module name, module, parameter name) of every parameter of rank >= ``rank`` that can take
    a form, and of every parametrised one (so that a rule naming it is refused, not ignored);
    the trained fields inside parametrisations are not targets themselves."""
    inside = {id(m) for module in model.modules() if parametrize.is_parametrized(module)
              for m in module.parametrizations.modules()}
    for module_name, module in model.named_modules():
        if id(module) in inside:
            continue
        for tensor, param in module.named_parameters(recurse=False):
            if param.ndim >= rank:
                yield module_name, module, tensor
        if parametrize.is_parametrized(module):
            for tensor in module.parametrizations:
                yield module_name, module, tensor


def check_rules(model: Any, config: Any) -> None:
    """``model`` is an nn.Module and ``config`` one form config or a mapping of name patterns to
    form configs or None (fields ``model`` and ``config``)."""
    if not isinstance(model, nn.Module):
        raise KernelpackError(f"takes an nn.Module, got {type(model).__name__}", field="model")
    if isinstance(config, Config):
        return
    if not isinstance(config, Mapping):
        raise KernelpackError(f"must be a form config or a mapping of names and patterns to configs, "
                              f"got {type(config).__name__}", field="config")
    for key, value in config.items():
        if not isinstance(key, str):
            raise KernelpackError(f"a rule's key is a name or pattern (str), got {shown(key)}", field="config")
        if value is not None and not isinstance(value, Config):
            raise KernelpackError(f"rule '{key_shown(key)}' gives {shown(value)}, not a form config (Dense, DCT, "
                                  "Series, Basis or Linear) or None", field="config")


def compress_(model: nn.Module, config: Rules) -> nn.Module:
    """Parametrise every parameter of rank >= 2 the config names with its form (and rank-1 ones
    named exactly with a Dense config); returns ``model``.

    Dense configs without a narrower dtype leave the weight alone. Errors name the parameter;
    the model and every rule are checked first (a rule no parameter matches is still checked,
    and a warning).
    """
    check_rules(model, config)
    hessians = getattr(config, "hessians", None) or {}  # a calibrated Plan's statistics
    chosen_for = [(m, module, t, rule_for(config, m, t)) for m, module, t in targets(model)]
    if isinstance(config, Mapping):  # rank-1 parameters: exact names with Dense configs only
        chosen_for += [(m, module, t, config[_join(m, t)]) for m, module, t in targets(model, rank=1)
                       if getattr(module, t).ndim == 1 and isinstance(config.get(_join(m, t)), Dense)]
    _warn_unmatched(config, [_join(m, t) for m, _, t, _ in chosen_for] + [m for m, _, _, _ in chosen_for])
    for module_name, module, tensor, chosen in chosen_for:
        if chosen is None or (isinstance(chosen, Dense) and chosen.dtype in (None, "float32")
                              and not chosen.quantised):
            continue
        try:
            if parametrize.is_parametrized(module, tensor):
                raise KernelpackError("is already parametrised", field=tensor)
            if type(chosen) not in PARAMETRISATIONS:
                raise KernelpackError(f"{chosen!r} is not a form config", field="config")
            form = PARAMETRISATIONS[type(chosen)](getattr(module, tensor).shape, chosen)
            form.hessian = hessians.get(_join(module_name, tensor))
            try:
                parametrize.register_parametrization(module, tensor, form)
            finally:
                form.hessian = None
        except KernelpackError as exc:
            raise exc.located(tensor=_join(module_name, tensor)) from None
    return model


def _warn_unmatched(config: Rules, names: list[str]) -> None:
    """Warn once per mapping key that names or matches none of ``names``."""
    if not isinstance(config, Mapping):
        return
    present = set(names)
    lost = [k for k in config if k not in present and not any(fnmatch.fnmatchcase(n, k) for n in present)]
    if lost:
        warnings.warn(f"compress_: {len(lost)} rule(s) match no parameter of rank >= 2 and do nothing: "
                      f"{', '.join(repr(key_shown(k)) for k in lost[:8])}", stacklevel=3)


def encoded_state(model: nn.Module) -> dict[str, Any]:
    """The model's state for packing: parametrised weights in their stored forms, the rest as is.

    Parametrisation internals (trained fields, banks, indices) are replaced by one entry
    under the plain weight name, so the file loads into the unparametrised model.
    """
    plists = form_weights(model)
    prefixes = {_join(module, "parametrizations", tensor) + ".": name
                for name in plists for module, tensor in [_split(name)]}
    state: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        owner = next((prefixes[p] for p in prefixes if key.startswith(p)), None)
        if owner is None:
            state[key] = value
        elif owner not in state:
            plist = plists[owner]
            try:
                with torch.no_grad():
                    state[owner] = plist[0].to_encoded(*fields(plist))
            except KernelpackError as exc:  # e.g. a trained value beyond float16's range
                raise exc.located(tensor=owner) from None
    return state


def finalize_(model: nn.Module) -> nn.Module:
    """Replace every kernelpack parametrisation by its current dense weight (for export)."""
    for name in form_weights(model):
        module_name, tensor = _split(name)
        parametrize.remove_parametrizations(model.get_submodule(module_name), tensor, leave_parametrized=True)
    return model


def _split(name: str) -> tuple[str, str]:
    """``layer1.0.conv1.weight`` -> (``layer1.0.conv1``, ``weight``); the root module is ''."""
    module, _, tensor = name.rpartition(".")
    return module, tensor


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)
