"""kernelpack.rules: one rule engine for save, compress_, plan, pack_onnx and ``kernelpack pack``.

Read as the spec: the precedence table step by step, what ``None`` means, the warning for a
rule that chooses nothing (Python and command line), the rank/floating selectors on a model
with integer buffers, the JSON that ``pack --config`` reads (round trip for every form
config), and bad rules refused naming their field."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import kernelpack
from kernelpack import DCT, Basis, Dense, KernelpackError, Linear, Rule, Rules, Series
from kernelpack.cli import main
from kernelpack.rules import Match, from_json, read_rules, rules_of, to_json, write_rules

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

A, B, C, D = Series(harmonics=2), Basis(bank=4), DCT(keep=0.5), Linear(alpha=0.5)
KERNEL = np.ones((4, 2, 3, 3), np.float32)
BIAS = np.ones(4, np.float32)


def match(forms, name: str, value=KERNEL) -> Match | None:
    return rules_of(forms).match(name, value)


# --- the precedence table ------------------------------------------------------------------
def test_step_1_the_exact_tensor_name_wins_wherever_it_is_listed() -> None:
    forms = {"*": A, "conv1": B, "conv1.weight": C}
    assert match(forms, "conv1.weight") == Match(C, "name", 2)


def test_step_1_holds_for_names_with_fnmatch_characters_in_them() -> None:
    forms = {"a*": A, "a[0]*?.weight": C}  # as a pattern it would not even match its own name
    assert match(forms, "a[0]*?.weight") == Match(C, "name", 1)
    assert match(forms, "a0xy.weight") == Match(A, "pattern", 0)  # others: patterns in order
    assert match({"a[0]*?.weight": C}, "a0xy.weight") == Match(C, "pattern", 0)


def test_step_2_the_exact_module_name_comes_before_every_pattern() -> None:
    forms = {"conv1.*": A, "conv1": B}
    assert match(forms, "conv1.weight") == Match(B, "module", 1)
    assert match(forms, "conv1.bias", BIAS) is None  # a structured form's rule takes kernels only
    assert match(forms, "layer.conv1.weight") is None  # the module is 'layer.conv1', not 'conv1'


def test_step_3_the_first_pattern_in_order_on_the_tensor_or_the_module_name() -> None:
    forms = {"*conv1": A, "*.weight": B, "*": C}
    assert match(forms, "layer1.0.conv1.weight") == Match(A, "pattern", 0)  # on the module name
    assert match(forms, "layer1.0.conv2.weight") == Match(B, "pattern", 1)  # on the tensor name
    assert match(forms, "layer1.0.conv2.bias", BIAS) is None  # structured: rank >= 2 only
    assert match({**forms, "*.bias": Dense()}, "layer1.0.conv2.bias", BIAS) == Match(Dense(), "pattern", 3)
    assert match(forms, "scale") == Match(C, "pattern", 2)  # a name without a dot has no module


def test_step_4_the_default_for_every_tensor_no_rule_chooses() -> None:
    rules = Rules((Rule("fc*", D),), default=C)
    assert rules.match("fc1.weight", KERNEL) == Match(D, "pattern", 0)
    assert rules.match("conv1.weight", KERNEL) == Match(C, "default")
    assert match(C, "anything") == Match(C, "default")  # one config is the default for all
    assert match({"fc*": D}, "conv1.weight") is None  # no default: no config


def test_a_structured_form_by_module_name_pattern_or_default_takes_the_kernel_not_the_bias(tmp_path: Path) -> None:
    """As compress_ reads it: ``{"conv1": Series()}`` is conv1's kernel; its bias stays as it
    is, without a word (the rule chose a tensor). Named exactly, a bias gets the form's error."""
    state = {"conv1.weight": KERNEL, "conv1.bias": BIAS}
    for forms in ({"conv1": A}, {"conv*": A}, A):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            encoded = kernelpack.save(state, tmp_path / "m.kpk", forms=forms)
        assert encoded["conv1.weight"].form == "series" and encoded["conv1.bias"].form == "dense"
    with pytest.raises(KernelpackError) as caught:
        kernelpack.save(state, tmp_path / "m.kpk", forms={"conv1.bias": A})
    assert (caught.value.tensor, caught.value.field) == ("conv1.bias", "shape")


def test_the_parameter_and_module_names_of_recurrent_layers() -> None:
    forms = {"rnn.weight_hh_l0": None, "rnn": C, "*_reverse": D, "*weight_ih*": A}
    assert match(forms, "rnn.weight_hh_l0") == Match(None, "name", 0)
    assert match(forms, "rnn.weight_ih_l0").config == C  # the module's name before patterns
    assert match(forms, "enc.rnn.weight_ih_l0_reverse").config == D  # the first matching pattern
    assert match(forms, "enc.rnn.weight_ih_l1").config == A
    assert match(forms, "enc.rnn.bias_ih_l1", BIAS) is None


def test_none_leaves_a_tensor_alone_in_every_consumer(tmp_path: Path) -> None:
    """``None`` is a choice (dense as it is), not "no rule": a later pattern, the default and
    a budget plan do not reach the tensor."""
    rng = np.random.default_rng(0)
    state = {n: rng.standard_normal((16, 16)).astype(np.float32) for n in ("keep.weight", "fc.weight")}
    forms = {"keep": None, "*": Dense(dtype="float16")}
    encoded = kernelpack.save(state, tmp_path / "m.kpk", forms=forms)
    assert encoded["keep.weight"].arrays()["data"].dtype == "float32"
    assert encoded["fc.weight"].arrays()["data"].dtype == "float16"
    assert "keep.weight" not in kernelpack.plan(state, max_error=0.3, forms={"keep": None}, progress=False)
    net = nn.Sequential()
    net.add_module("keep", nn.Linear(4, 4))
    net.add_module("fc", nn.Linear(4, 4))
    kernelpack.compress_(net, {"keep": None, "*": C})
    assert not parametrize.is_parametrized(net.keep) and parametrize.is_parametrized(net.fc, "weight")


def test_save_and_compress_choose_alike_and_compress_reaches_rank_1_only_by_exact_name() -> None:
    net = Net()
    forms = {"conv": A, "fc.weight": D, "bn.bias": Dense(step=0.25), "*": Dense(dtype="float16")}
    chosen = rules_of(forms).assign(net.state_dict())
    assert chosen["conv.weight"].config == A and chosen["conv.bias"] == Match(Dense(dtype="float16"), "pattern", 3)
    assert chosen["bn.bias"] == Match(Dense(step=0.25), "name", 2)
    with pytest.warns(UserWarning, match=r"rule '\*' chose no parameter compress_ reaches"):
        kernelpack.compress_(net, forms)  # in save, '*' chose bn.weight, the statistics and more
    reached = {f"{m}.{t}" for m, module in net.named_modules() if parametrize.is_parametrized(module)
               for t in module.parametrizations}
    # patterns, module names and the default reach rank >= 2 only; bn.bias by its exact name
    assert reached == {"conv.weight", "fc.weight", "bn.bias"}


# --- a rule that chooses nothing -----------------------------------------------------------
def test_a_rule_that_chooses_no_tensor_is_a_user_warning_with_the_names_it_could_match(tmp_path: Path) -> None:
    state = {"conv1.weight": KERNEL, "conv1.bias": BIAS}
    with pytest.warns(UserWarning, match=r"rules 'conv3', 'fc\*' chose no tensor \(a rule matches a name "
                                         r"such as 'conv1\.weight' or its module's name 'conv1'.*'conv1\.\*'\)"):
        kernelpack.save(state, tmp_path / "m.kpk", forms={"conv3": C, "fc*": D, "conv1": Dense()})


def test_a_rule_every_tensor_of_which_an_earlier_step_took_chose_nothing_too(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"rule 'w\*' chose no tensor"):
        kernelpack.save({"w": KERNEL}, tmp_path / "m.kpk", forms={"w*": C, "w": Dense()})


def test_compress_warns_of_a_rule_that_reaches_no_parameter() -> None:
    with pytest.warns(UserWarning, match=r"rules 'nosuch', '\*\.bias' chose no parameter compress_ reaches"):
        kernelpack.compress_(Net(), {"nosuch": C, "*.bias": C, "conv": A})


def test_rules_that_choose_something_say_nothing(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernelpack.save({"conv1.weight": KERNEL, "conv1.bias": BIAS}, tmp_path / "m.kpk",
                        forms={"conv1": Dense(dtype="float16")})
        kernelpack.save({"w": KERNEL}, tmp_path / "f.kpk", forms=lambda name, value: None)  # a function: no rules


def test_the_command_line_says_it_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.npz"
    np.savez(src, **{"conv1.weight": KERNEL, "conv1.bias": BIAS})
    code = main(["pack", str(src), str(tmp_path / "m.kpk"), "--form", "nothing*=dct", "--form", "conv1=dense"])
    err = capsys.readouterr().err
    assert code == 0 and err.startswith("kernelpack: warning: rule 'nothing*' chose no tensor (")


# --- selecting by kind ---------------------------------------------------------------------
class Net(nn.Module):
    """A conv with BatchNorm (float running statistics and the int64 ``num_batches_tracked``)
    and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(16, 3)


WEIGHTS = Rule("*", Dense(step=0.01), min_rank=2, floating=True)


def test_one_rule_quantises_the_weights_of_a_model_with_integer_buffers(tmp_path: Path) -> None:
    net = Net()
    with pytest.raises(KernelpackError, match="bn.num_batches_tracked"):  # no selector: every tensor
        kernelpack.save(net, tmp_path / "all.kpk", forms=Dense(step=0.01))
    encoded = kernelpack.save(net, tmp_path / "m.kpk", forms=[WEIGHTS])
    quantised = {n for n, t in encoded.items() if t.arrays()["data"].dtype == "int8"}
    assert quantised == {"conv.weight", "fc.weight"}
    decoded = kernelpack.load(tmp_path / "m.kpk")
    for name, value in net.state_dict().items():  # biases, norms and the counter as they were
        if name not in quantised:
            assert decoded[name].dtype == value.dtype and torch.equal(decoded[name], value)


def test_floating_false_takes_the_other_tensors() -> None:
    rules = Rules((Rule("*", Dense(), floating=False), Rule("*", C, min_rank=2)))
    chosen = rules.assign(Net().state_dict())
    assert chosen["bn.num_batches_tracked"] == Match(Dense(), "pattern", 0)
    assert chosen["conv.weight"] == Match(C, "pattern", 1)
    assert "bn.running_mean" not in chosen  # floating, rank 1: no rule takes it


def test_the_selectors_on_the_command_line_and_in_a_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.pt"
    torch.save(Net().state_dict(), src)
    out = tmp_path / "m.kpk"
    assert main(["pack", str(src), str(out), "--form", "*=dense:step=0.01,min_rank=2,floating=true"]) == 0
    with kernelpack.open(out) as c:
        assert {n for n in c.keys() if c.info(n).arrays["data"].spec.dtype == "int8"} == {"conv.weight", "fc.weight"}
    state = {n: v.numpy() for n, v in Net().state_dict().items()}
    plan = kernelpack.plan(state, max_error=0.3, forms=[Rule("*", None, min_rank=2)], progress=False)
    assert dict(plan) == {}  # the selected tensors are fixed (left alone), so nothing is planned


# --- JSON -------------------------------------------------------------------------------------
EVERY_CONFIG = [Dense(), Dense(dtype="float16"), Dense(step=0.5), DCT(keep=0.1, axes=(0, 1), rel_step=0.02),
                DCT(boundary=3, dtype="float32"), Series(harmonics=(4, 3), points=("cgl", "uniform")),
                Series(family="sine", harmonics=2), Basis(bank=8, bank_name="shared", seed=3),
                Linear(alpha=0.25, rank=4, pivot=False), Linear(primaries=3, step=0.1)]


@pytest.mark.parametrize("config", EVERY_CONFIG, ids=repr)
def test_every_form_config_round_trips_through_json(config) -> None:
    rules = Rules((Rule("a.*", config), Rule("*", config, min_rank=2, floating=True), Rule("head", None)),
                  default=config)
    data = json.loads(json.dumps(to_json(rules)))
    assert from_json(data) == rules


def test_the_json_format() -> None:
    rules = [WEIGHTS, Rule("head", None), Rule("conv*", Series(harmonics=(4, 3)))]
    assert to_json(rules) == {"default": None, "rules": [
        {"pattern": "*", "min_rank": 2, "floating": True, "form": "dense", "step": 0.01},
        {"pattern": "head", "form": None},
        {"pattern": "conv*", "form": "series", "harmonics": [4, 3]}]}
    assert to_json({"fc": D}) == to_json([Rule("fc", D)])  # a mapping is rules in its order


def test_a_given_bank_round_trips_as_lists() -> None:
    data = to_json(Basis(bank=np.eye(3).reshape(1, 3, 3)))
    assert data["default"]["bank"] == [np.eye(3).tolist()] and to_json(from_json(data)) == data


def test_pack_config_reads_exactly_that_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.pt"
    torch.save(Net().state_dict(), src)
    rules = Rules((WEIGHTS, Rule("*", None, floating=False), Rule("conv.weight", Linear(alpha=0.5))),
                  default=Dense(dtype="float16"))
    write_rules(rules, tmp_path / "forms.json")
    assert read_rules(tmp_path / "forms.json") == rules
    out = tmp_path / "m.kpk"
    assert main(["pack", str(src), str(out), "--config", str(tmp_path / "forms.json")]) == 0
    with kernelpack.open(out) as c:
        info = {n: c.info(n) for n in c.keys()}
    assert info["conv.weight"].form == "linear"  # step 1 (its name) before every pattern
    assert info["fc.weight"].arrays["data"].spec.dtype == "int8"  # the first pattern that selects it
    assert info["bn.num_batches_tracked"].arrays["data"].spec.dtype == "int64"  # null: as it is
    assert info["bn.running_mean"].arrays["data"].spec.dtype == "float16"  # no rule selects it: the default


def test_a_function_has_no_json_form() -> None:
    with pytest.raises(KernelpackError, match="function has no JSON form") as caught:
        to_json(lambda name, value: None)
    assert caught.value.field == "forms"


# --- bad rules --------------------------------------------------------------------------------
@pytest.mark.parametrize("make, field", [
    (lambda: Rule("", C), "pattern"),
    (lambda: Rule(3, C), "pattern"),
    (lambda: Rule("*", "dct"), "config"),
    (lambda: Rule("*", C, min_rank=-1), "min_rank"),
    (lambda: Rule("*", C, min_rank=True), "min_rank"),
    (lambda: Rule("*", C, floating="yes"), "floating"),
    (lambda: Rules((C,)), "rules"),
    (lambda: Rules(default="dct"), "default"),
    (lambda: rules_of({"*": 3}), "forms"),
    (lambda: rules_of({3: C}), "forms"),
    (lambda: rules_of([C]), "forms"),
    (lambda: rules_of({"*": 3}, "config"), "config"),
    (lambda: from_json([]), "config"),
    (lambda: from_json({"rules": [], "extra": 1}), "config"),
    (lambda: from_json({"rules": {}}), "rules"),
    (lambda: from_json({"default": "dense"}), "default"),
    (lambda: from_json({"default": {"form": "zip"}}), "default"),
    (lambda: from_json({"rules": [{"form": "dct"}]}), "rules[0]"),
    (lambda: from_json({"rules": [{"pattern": "*", "form": "dct"}, {"pattern": "*", "form": "series",
                                                                     "harmonic": 3}]}), "rules[1]"),
    (lambda: from_json({"rules": [{"pattern": "*", "form": "dct", "min_rank": "2"}]}), "rules[0].min_rank"),
    (lambda: from_json({"rules": [{"pattern": "*", "form": "dct", "floating": 1}]}), "rules[0].floating"),
    (lambda: from_json({"rules": [{"pattern": "", "form": "dct"}]}), "rules[0].pattern"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_bad_rule_is_refused_naming_its_field(make, field: str) -> None:
    with pytest.raises(KernelpackError) as caught:
        make()
    assert caught.value.field == field


def test_a_bad_rule_file_or_option_names_the_file_or_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "forms.json"
    path.write_text(json.dumps({"rules": [{"pattern": "*", "form": "dct", "min_rank": -2}]}))
    with pytest.raises(KernelpackError, match=r"file '.*forms\.json', field 'rules\[0\]\.min_rank'"):
        read_rules(path)
    src = tmp_path / "in.npz"
    np.savez(src, w=KERNEL)
    assert main(["pack", str(src), str(tmp_path / "m.kpk"), "--form", "*=dct:min_rank=x"]) == 2
    assert "field '--form.min_rank': bad --form '*=dct:min_rank=x'" in capsys.readouterr().err


def test_a_function_giving_no_config_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    with pytest.raises(KernelpackError, match="tensor 'w', field 'forms'"):
        kernelpack.save({"w": KERNEL}, tmp_path / "m.kpk", forms=lambda name, value: "dense")
