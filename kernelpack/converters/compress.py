"""``compress_(model, config)``: put a model's weights in stored forms, in place, for training.

In the style of torchao's ``quantize_``: one call with a config, training code
unchanged. Each chosen weight gets the parametrisation of its form
(``torch.nn.utils.parametrize``), initialised from the trained weight by the form's
closed-form fit; ``kernelpack.save(model, path)`` then packs the trained fields as
they are (no re-fit).

A config is one form config (for every conv and linear weight), or a mapping from
names to form configs (or ``None``: leave alone). A key is an exact name or an
``fnmatch`` pattern, matched against the module's name (``features.3``) and the
weight's name (``features.3.weight``); an exact name wins, then the first matching
pattern, so ``{"conv1": Series(harmonics=4), "*": Basis(bank=8)}`` gives conv1 a
series and every other layer a bank. ``kernelpack.plan`` returns such a mapping.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Mapping

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
#: Layers whose ``weight`` compress_ considers.
LAYERS = (nn.modules.conv._ConvNd, nn.Linear)

Rules = Config | Mapping[str, Config | None]


def rule_for(config: Rules, module_name: str) -> Config | None:
    """The config a layer gets: exact module or weight name, else the first matching pattern."""
    if hasattr(config, "encode"):
        return config  # type: ignore[return-value]
    names = (module_name, f"{module_name}.weight")
    for name in names:
        if name in config:  # type: ignore[operator]
            return config[name]  # type: ignore[index]
    for pattern, value in config.items():  # type: ignore[union-attr]
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            return value
    return None


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
    """Parametrise every conv/linear weight the config names with its form; returns ``model``.

    Dense configs without a narrower dtype leave the weight alone. Errors name the weight; the
    model and every rule are checked first (a rule no layer matches is still checked).
    """
    check_rules(model, config)
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, LAYERS):
            continue
        chosen = rule_for(config, module_name)
        if chosen is None or (isinstance(chosen, Dense) and chosen.dtype in (None, "float32")
                              and not chosen.quantised):
            continue
        name = f"{module_name}.weight"
        try:
            if parametrize.is_parametrized(module, "weight"):
                raise KernelpackError("is already parametrised", field="weight")
            if type(chosen) not in PARAMETRISATIONS:
                raise KernelpackError(f"{chosen!r} is not a form config", field="config")
            form = PARAMETRISATIONS[type(chosen)](module.weight.shape, chosen)
            parametrize.register_parametrization(module, "weight", form)
        except KernelpackError as exc:
            raise exc.located(tensor=name) from None
    return model


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
