"""One rule engine: which form config each tensor gets.

``kernelpack.save(..., forms=)``, ``compress_(model, config)``, ``kernelpack.plan(...,
forms=)``, ``pack_onnx(..., forms=)`` and ``kernelpack pack --form/--config`` all choose
through :class:`Rules`, so one set of rules means the same thing everywhere.

A rule has a ``pattern`` (an exact name, or an ``fnmatch`` pattern), optional selectors
(``min_rank``, ``floating``) and a config (``None``: leave the tensor alone, dense as it
is). A tensor ``layer1.0.conv1.weight`` has a *module name*, its name minus the last
``.``-component (``layer1.0.conv1``; a name without a dot has none). For each tensor the
first step that gives a rule whose selectors accept the tensor decides:

====  ==========================================================  ===========================
step  a rule applies when its pattern ...                          e.g. ``layer1.0.conv1.weight``
====  ==========================================================  ===========================
1     is the tensor's name, character for character (even with     ``layer1.0.conv1.weight``
      ``*?[`` in it: names may hold them)
2     is the tensor's module name, character for character         ``layer1.0.conv1``
3     matches the tensor's name or its module name as an           ``*conv*``, ``layer1.*``,
      ``fnmatch`` pattern: the first such rule in the order given  ``*.conv1``
4     (no rule applied) the default config, if one is given        ``Rules(..., default=DCT())``
      (a structured one: rank >= 2 only)
====  ==========================================================  ===========================

A tensor no step chooses gets no config: ``save`` and ``pack_onnx`` store it dense as it is,
``compress_`` leaves it alone, ``plan`` plans it. Exact names win over patterns whatever
their order, so ``{"*": Basis(bank=8), "conv1": Series()}`` gives conv1 a series.

Selectors say which *kind* of tensor a rule takes: ``min_rank`` (rank at least this) and
``floating`` (True: floating tensors only, False: the others only; None: any). A rule with a
structured form (dct, series, basis, linear) takes rank >= 2 only, unless it names the
tensor exactly: ``{"conv1": Series()}`` gives conv1's kernel a series and leaves its bias. So "quantise
the weights" of a model with integer buffers (BatchNorm's ``num_batches_tracked``) and rank-1
biases is one rule: ``Rule("*", Dense(step=0.01), min_rank=2, floating=True)``.

Inputs every consumer takes (:func:`rules_of`): one config (the default for every tensor), a
mapping ``{name or pattern: config or None}`` (rules in the mapping's order), a list of
:class:`Rule`, a :class:`Rules`, or (``save``, ``plan``, ``pack_onnx``) a function
``(name, value) -> config or None`` that decides alone (None: no config). A rule that chooses
no tensor is a warning (a typo would otherwise leave a model silently uncompressed).

JSON (``kernelpack pack --config``; :func:`to_json`, :func:`from_json`)::

    {"default": {"form": "dense", "dtype": "float16"} or null,
     "rules": [{"pattern": "*", "min_rank": 2, "floating": true, "form": "dense", "step": 0.01},
               {"pattern": "head", "form": null}]}

A rule's keys are ``pattern``, the selectors when set, ``form`` (a form's name, or null for
None) and that form's settings (``config_from_dict``'s, tuples as lists).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from kernelpack.errors import KernelpackError
from kernelpack.forms import CONFIGS, Config, Dense, config_from_dict
from kernelpack.forms._base import key_shown, shown

#: Keys of a rule's JSON that are not its form's settings.
SELECTORS = ("min_rank", "floating")
FLOATING = frozenset({"float16", "bfloat16", "float32", "float64"})
_SPECIAL = frozenset("*?[")
_CONFIG_NAMES = "a form config (Dense, DCT, Series, Basis or Linear)"


@dataclass(frozen=True)
class Rule:
    """Tensors whose name or module name ``pattern`` gives (module doc, precedence table), and
    whose kind the selectors accept, get ``config`` (None: left alone, dense as they are)."""

    pattern: str
    config: Config | None
    min_rank: int = 0
    floating: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise KernelpackError(f"a rule's pattern is a name or an fnmatch pattern (a non-empty str), "
                                  f"got {shown(self.pattern)}", field="pattern")
        if self.config is not None and not isinstance(self.config, Config):
            raise KernelpackError(f"rule '{key_shown(self.pattern)}' gives {shown(self.config)}, not "
                                  f"{_CONFIG_NAMES} or None", field="config")
        if isinstance(self.min_rank, bool) or not isinstance(self.min_rank, int) or self.min_rank < 0:
            raise KernelpackError(f"must be an int >= 0, got {shown(self.min_rank)}", field="min_rank")
        if not (self.floating is None or isinstance(self.floating, bool)):
            raise KernelpackError(f"must be true, false or null (any), got {shown(self.floating)}",
                                  field="floating")

    def selects(self, value: Any, exact: bool = False) -> bool:
        """Whether the selectors accept ``value`` (its rank and whether it is floating). A
        structured form (not Dense) takes rank >= 2 only, unless the rule names the tensor
        ``exact``ly: ``{"conv1": Series()}`` means conv1's kernel, not its bias, as in
        ``compress_``; a bias named exactly gets the form's own error."""
        structured = not exact and _structured(self.config)
        if self.min_rank == 0 and self.floating is None and not structured:
            return True
        rank, floating = _kind(value)
        return rank >= max(self.min_rank, 2 * structured) and self.floating in (None, floating)


def _structured(config: Config | None) -> bool:
    """A form with a kernel to fit (dct, series, basis, linear): rank >= 2 unless named exactly."""
    return config is not None and not isinstance(config, Dense)


@dataclass(frozen=True)
class Match:
    """What chose a tensor's config: ``step`` is 'name', 'module', 'pattern' (the precedence
    table's steps 1-3; ``rule`` is its index), 'default' or 'function' (``rule`` None)."""

    config: Config | None
    step: str
    rule: int | None = None


@dataclass(frozen=True)
class Rules:
    """Rules in order and a default: each tensor's config by the precedence table (module doc)."""

    rules: tuple[Rule, ...] = ()
    default: Config | None = None
    _literal: dict[str, list[int]] = field(init=False, repr=False, compare=False)
    _patterns: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        bad = next((r for r in self.rules if not isinstance(r, Rule)), None)
        if bad is not None:
            raise KernelpackError(f"rules must be Rule objects, got {shown(bad)}", field="rules")
        if self.default is not None and not isinstance(self.default, Config):
            raise KernelpackError(f"must be {_CONFIG_NAMES} or None, got {shown(self.default)}", field="default")
        literal: dict[str, list[int]] = {}
        for i, rule in enumerate(self.rules):
            literal.setdefault(rule.pattern, []).append(i)
        object.__setattr__(self, "_literal", literal)
        # A pattern without *?[ matches only itself, which steps 1 and 2 have already tried.
        object.__setattr__(self, "_patterns", [i for i, r in enumerate(self.rules) if _SPECIAL & set(r.pattern)])

    def match(self, name: str, value: Any) -> Match | None:
        """The rule that chooses tensor ``name`` (``value``: the tensor, for the selectors), by
        the precedence table; None when no step does."""
        module = name.rpartition(".")[0]
        for step, key in (("name", name), ("module", module)):
            for i in self._literal.get(key, ()) if key else ():
                if self.rules[i].selects(value, exact=step == "name"):
                    return Match(self.rules[i].config, step, i)
        for i in self._patterns:
            rule = self.rules[i]
            if (fnmatch.fnmatchcase(name, rule.pattern) or module and fnmatch.fnmatchcase(module, rule.pattern)) \
                    and rule.selects(value):
                return Match(rule.config, "pattern", i)
        if self.default is None or _structured(self.default) and _kind(value)[0] < 2:
            return None  # a structured default, like a pattern's, is for the kernels
        return Match(self.default, "default")

    def assign(self, tensors: Mapping[str, Any]) -> dict[str, Match]:
        """The match of every tensor that some step chooses, by name."""
        chosen = {}
        for name, value in tensors.items():
            if not isinstance(name, str):
                raise KernelpackError(f"a tensor's name is a str, got {shown(name)}", field="name")
            try:
                found = self.match(name, value)
            except KernelpackError as exc:
                raise exc.located(tensor=name) from None
            if found is not None:
                chosen[name] = found
        return chosen

    def unused(self, matches: Iterable[Match]) -> list[Rule]:
        """The rules that chose none of ``matches`` (a typo, or every tensor taken by an earlier step)."""
        used = {m.rule for m in matches}
        return [r for i, r in enumerate(self.rules) if i not in used]


@dataclass(frozen=True)
class _Function(Rules):
    """A caller's function ``(name, value) -> config or None`` deciding alone (no JSON form)."""

    function: Callable[[str, Any], Config | None] | None = None
    argument: str = "forms"

    def match(self, name: str, value: Any) -> Match | None:
        config = self.function(name, value)  # type: ignore[misc]
        if config is None:
            return None
        if not isinstance(config, Config):
            raise KernelpackError(f"{self.argument} gave {shown(config)}, not {_CONFIG_NAMES} or None",
                                  tensor=name, field=self.argument)
        return Match(config, "function")


#: How a caller says which tensor gets which form (see the module doc).
FormPlan = Config | Mapping[str, Config | None] | Sequence[Rule] | Rules | Callable[[str, Any], Config | None] | None


def rules_of(forms: FormPlan, argument: str = "forms") -> Rules:
    """Any input the consumers take (module doc) as :class:`Rules`; a bad one raises naming
    ``argument`` (the caller's parameter) as the field."""
    if forms is None:
        return Rules()
    if isinstance(forms, Rules):
        return forms
    if isinstance(forms, Config):
        return Rules(default=forms)
    if isinstance(forms, Rule):
        return Rules((forms,))
    try:
        if isinstance(forms, Mapping):
            return Rules(tuple(_keyed_rule(key, value) for key, value in forms.items()))
        if isinstance(forms, (list, tuple)) and all(isinstance(r, Rule) for r in forms):
            return Rules(tuple(forms))
    except KernelpackError as exc:
        raise KernelpackError(exc.reason, field=argument) from None
    if callable(forms):
        return _Function(function=forms, argument=argument)
    raise KernelpackError(f"must be {_CONFIG_NAMES}, a mapping of names and patterns to configs, a list of "
                          f"kernelpack.Rule, or a function (name, value) -> config; got {shown(forms)}",
                          field=argument)


def _keyed_rule(key: Any, value: Any) -> Rule:
    if not isinstance(key, str):
        raise KernelpackError(f"a rule's key is a name or pattern (str), got {shown(key)}")
    return Rule(key, value)


def configs_for(forms: FormPlan, tensors: Mapping[str, Any], planned: Mapping[str, Config] | None = None, *,
                report: Callable[[str], None] | None = None) -> dict[str, Config]:
    """Every tensor's config: what the rules choose (None: dense as it is), else its entry in
    ``planned`` (a budget plan of the tensors no rule chose), else dense. Rules that chose
    no tensor are reported (:func:`report_unused`)."""
    rules = rules_of(forms)
    chosen = rules.assign(tensors)
    report_unused(rules.unused(chosen.values()), list(tensors), report=report)
    planned = planned or {}
    return {name: (chosen[name].config if name in chosen else planned.get(name)) or Dense() for name in tensors}


def report_unused(unused: Sequence[Rule], names: Sequence[str], what: str = "tensor",
                  report: Callable[[str], None] | None = None) -> None:
    """Say which rules chose nothing: to ``report`` (the command line's stderr line), else as a
    UserWarning at the caller's line outside kernelpack."""
    if not unused:
        return
    message = _unused_message([_described(r) for r in unused], names, what)
    if report is not None:
        report(message)
    else:
        warnings.warn(message, UserWarning, stacklevel=_outside_kernelpack())


def _described(rule: Rule) -> str:
    """``'*'``, or ``'*' (min_rank=2, floating=True)`` when selectors narrow it."""
    selectors = [f"min_rank={rule.min_rank}"] if rule.min_rank else []
    selectors += [] if rule.floating is None else [f"floating={rule.floating}"]
    return repr(key_shown(rule.pattern)) + (f" ({', '.join(selectors)})" if selectors else "")


def _unused_message(rules: Sequence[str], names: Sequence[str], what: str = "tensor") -> str:
    """``rules 'conv1', 'fc*' chose no tensor (...)``, with what the names to match look like;
    ``rules`` as :func:`_described` writes them."""
    listed = ", ".join(rules[:8]) + (f" and {len(rules) - 8} more" if len(rules) > 8 else "")
    text = f"rule{'s' if len(rules) > 1 else ''} {listed} chose no {what}"
    example = next(iter(names), None)
    if example is None:
        return text
    module = example.rpartition(".")[0]
    names_text = repr(key_shown(example)) + (f" or its module's name {key_shown(module)!r}" if module else "")
    pattern = key_shown(module + ".*" if module else example + "*")
    return f"{text} (a rule matches a name such as {names_text}, exactly or as an fnmatch pattern such as {pattern!r})"


def _outside_kernelpack() -> int:
    """warnings' ``stacklevel`` of the innermost frame outside this package (the user's call),
    counted from the function that calls ``warnings.warn``: save, compress_ and pack_onnx
    reach the warning through different depths."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "kernelpack":
        frame, level = frame.f_back, level + 1
    return level


def _kind(value: Any) -> tuple[int, bool]:
    """(rank, floating) of a tensor: a torch tensor, an array, an already encoded tensor
    (``Encoded``: its decoded dtype) or anything numpy takes."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # Encoded's dtype is its decoded one
        return len(value.shape), str(value.dtype).removeprefix("torch.") in FLOATING
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise KernelpackError(f"is not an array: {shown(value)}: {exc}", field="values") from None
    return array.ndim, array.dtype.name in FLOATING


# --- JSON ------------------------------------------------------------------------------------
def to_json(forms: FormPlan) -> dict[str, Any]:
    """Rules as the JSON object ``kernelpack pack --config`` reads (module doc), JSON-ready."""
    rules = rules_of(forms)
    if isinstance(rules, _Function):
        raise KernelpackError("a function has no JSON form: give configs, a mapping or kernelpack.Rule objects",
                              field="forms")
    return {"default": None if rules.default is None else config_to_dict(rules.default),
            "rules": [rule_to_dict(r) for r in rules.rules]}


def from_json(data: Any) -> Rules:
    """The :class:`Rules` a JSON object of :func:`to_json`'s format says; a bad one raises
    naming its field (``rules[2].min_rank``)."""
    if not isinstance(data, Mapping) or set(data) - {"default", "rules"}:
        raise KernelpackError('a form config is {"default": ..., "rules": [...]}, got '
                              + (f"keys {sorted(map(str, data))}" if isinstance(data, Mapping) else shown(data)),
                              field="config")
    rules, default = data.get("rules", []), data.get("default")
    if not isinstance(rules, list):
        raise KernelpackError(f"must be a list, got {shown(rules)}", field="rules")
    if default is not None and not isinstance(default, Mapping):
        raise KernelpackError(f"must be a form's settings ({{\"form\": ...}}) or null, got {shown(default)}",
                              field="default")
    return Rules(tuple(rule_from_dict(r, f"rules[{i}]") for i, r in enumerate(rules)),
                 None if default is None else _config(default, "default"))


def read_rules(path: str | os.PathLike) -> Rules:
    """The rules of a JSON file in :func:`to_json`'s format (errors name the file)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise KernelpackError(f"cannot read the form config: {exc.strerror}", path=os.fspath(path)) from None
    except ValueError as exc:
        raise KernelpackError(f"form config is not valid JSON: {exc}", path=os.fspath(path)) from None
    try:
        return from_json(data)
    except KernelpackError as exc:
        raise exc.located(path=os.fspath(path)) from None


def write_rules(forms: FormPlan, path: str | os.PathLike) -> None:
    """Write :func:`to_json` of ``forms`` to ``path`` (what ``read_rules`` and ``--config`` read)."""
    text = json.dumps(to_json(forms), indent=1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def rule_to_dict(rule: Rule) -> dict[str, Any]:
    """One rule's JSON: pattern, the selectors that are set, form and settings."""
    out: dict[str, Any] = {"pattern": rule.pattern}
    if rule.min_rank:
        out["min_rank"] = rule.min_rank
    if rule.floating is not None:
        out["floating"] = rule.floating
    return {**out, **({"form": None} if rule.config is None else config_to_dict(rule.config))}


def rule_from_dict(spec: Any, where: str) -> Rule:
    """The rule a JSON object (or a ``--form`` rule's parsed settings) says; errors name
    ``where`` and the field (``rules[0].floating``)."""
    if not isinstance(spec, Mapping) or "pattern" not in spec:
        raise KernelpackError(f'must be {{"pattern": "...", "form": "...", ...}}, got {shown(spec)}', field=where)
    settings = {k: v for k, v in spec.items() if k != "pattern" and k not in SELECTORS}
    config = None if "form" in settings and settings["form"] is None and len(settings) == 1 else \
        _config(settings, where)
    try:
        return Rule(spec["pattern"], config, **{k: spec[k] for k in SELECTORS if k in spec})
    except KernelpackError as exc:
        raise KernelpackError(exc.reason, field=f"{where}.{exc.field}") from None


def _config(settings: Mapping[str, Any], where: str) -> Config:
    try:
        return config_from_dict(dict(settings))
    except KernelpackError as exc:
        raise KernelpackError(exc.reason, field=where) from None


def config_to_dict(config: Config) -> dict[str, Any]:
    """``Series(harmonics=(3, 3))`` -> ``{"form": "series", "harmonics": [3, 3]}`` (the inverse of
    ``config_from_dict``): the settings that differ from the defaults, tuples and arrays as lists."""
    form = next(n for n, c in CONFIGS.items() if type(config) is c)
    return {"form": form, **{k: _listed(np.asarray(v).tolist() if hasattr(v, "shape") else v)
                             for k, v in changed_settings(config).items()}}


def changed_settings(config: Config) -> dict[str, Any]:
    """A config's settings that differ from its defaults, as they are (what its JSON and a
    plan's table show)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not (value is f.default or isinstance(value, (int, float, str, tuple)) and value == f.default):
            out[f.name] = value
    return out


def _listed(value: Any) -> Any:
    return [_listed(v) for v in value] if isinstance(value, (tuple, list)) else value
