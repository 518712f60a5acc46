"""The Python API's conventions (issue 16): what ``import *`` brings, the version, reprs."""

from __future__ import annotations

import builtins
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

import kernelpack

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"


def test_import_star_does_not_shadow_the_builtin_open() -> None:
    namespace: dict = {}
    exec("from kernelpack import *", namespace)
    assert "open" not in namespace and "save" in namespace and "load_numpy" in namespace
    assert kernelpack.open is not builtins.open  # kernelpack.open stays reachable by name


def test_version_comes_from_the_package_metadata() -> None:
    assert kernelpack.__version__ == version("kernelpack")
    assert (Path(kernelpack.__file__).parent / "py.typed").exists()


def test_reprs_say_what_a_container_and_a_tensor_are_without_digest_bytes(tmp_path) -> None:
    path = tmp_path / "m.kpk"
    kernelpack.save({"w": np.ones((4, 4), np.float32)}, path)
    with kernelpack.open(path) as c:
        assert repr(c) == f"<kernelpack.Container {str(path)!r} format 1.6, 1 tensors, open>"
        info = repr(c.info("w"))
        assert info.startswith("TensorInfo(name='w', form='dense', shape=(4, 4), dtype='float32'")
        assert "\\x" not in info and info.endswith(f"digest={c.info('w').digest.hex()[:8]}...)")
    assert repr(c).endswith("closed>")


def test_metadata_is_a_method_giving_a_copy_as_safetensors_users_expect(tmp_path) -> None:
    kernelpack.save({"w": np.ones(2, np.float32)}, tmp_path / "m.kpk", metadata={"arch": "cnn"})
    kernelpack.save({"w": np.ones(2, np.float32)}, tmp_path / "none.kpk")
    with kernelpack.open(tmp_path / "m.kpk") as c, kernelpack.open(tmp_path / "none.kpk") as bare:
        c.metadata()["arch"] = "changed"
        assert c.metadata() == {"arch": "cnn"} and bare.metadata() == {}


def test_a_plans_repr_says_what_it_costs_and_loses_then_its_configs() -> None:
    weights = {"w": np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)}
    plan = kernelpack.plan(weights, max_error=0.05, progress=False)
    assert repr(plan) == (f"<kernelpack.Plan 1 tensors, {plan.bytes:,} bytes, estimated error {plan.estimated:.4g}: "
                          f"{dict(plan)!r}>")
    assert plan == dict(plan)  # still the mapping save reads


def test_a_forms_key_that_matches_no_tensor_warns(tmp_path) -> None:
    """A module's name ('conv1') chooses its tensors (kernelpack.rules); a key that chooses
    nothing ('conv3') is said, with what names look like, not silently dense."""
    import warnings

    import pytest

    state = {"conv1.weight": np.ones((2, 2, 3, 3), np.float32), "conv1.bias": np.ones(2, np.float32)}
    with pytest.warns(UserWarning, match=r"rule 'conv3' chose no tensor.*'conv1\.weight'.*'conv1'.*'conv1\.\*'"):
        kernelpack.save(state, tmp_path / "a.kpk", forms={"conv3": kernelpack.Dense(dtype="float16")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoded = kernelpack.save(state, tmp_path / "b.kpk", forms={"conv1": kernelpack.Dense(dtype="float16")})
    assert {n: t.arrays()["data"].dtype for n, t in encoded.items()} == {"conv1.weight": "float16", "conv1.bias": "float16"}


def test_progress_bars_only_on_a_terminal_or_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """kernelpack._progress: a tqdm bar when asked (True) or when stderr is a terminal (None);
    otherwise an object with the same methods doing nothing; the items pass through either way."""
    import io
    import sys

    from tqdm import tqdm

    from kernelpack._progress import Quiet, progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert isinstance(progress(range(3), None, "x", "it"), Quiet)
    assert isinstance(progress(range(3), False, "x", "it"), Quiet)
    bar = progress(range(3), True, "x", "it")
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
    quiet = progress(range(3), None, "x", "it")
    quiet.update()
    quiet.set_postfix(a=1)
    quiet.close()
    assert list(quiet) == [0, 1, 2]


def test_no_module_outside_a_form_special_cases_a_form_by_name() -> None:
    """One home per form: the reader and the CLI ask the form's class (bank_of, describe,
    INDEX_ARRAYS, ANY_DTYPE) instead of testing its name (issue 16)."""
    import re

    root = Path(kernelpack.__file__).parent
    pattern = re.compile(r"""form\s*(==|!=)\s*["'](dense|dct|series|basis|linear)["']""")
    found = [f"{path.relative_to(root)}:{n}" for path in root.rglob("*.py") if path.parent.name != "forms"
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert found == []
