"""The public functions' docstrings say Args, Returns, Raises and give an Example, and every
Example runs as written (doctest, in an empty folder), so the docstrings cannot go stale."""

from __future__ import annotations

import doctest
import inspect
import os
import warnings
from pathlib import Path

import pytest

import kernelpack

PUBLIC = ["save", "compress_", "plan", "load", "load_numpy", "load_model", "ort_session"]


@pytest.mark.parametrize("name", PUBLIC)
def test_a_public_function_documents_its_arguments_result_errors_and_an_example(name: str) -> None:
    doc = inspect.getdoc(getattr(kernelpack, name)) or ""
    for section in ("Args:", "Returns:", "Raises:", "Example:"):
        assert section in doc, f"kernelpack.{name}: no {section}"
    documented = set(inspect.signature(getattr(kernelpack, name)).parameters)
    args = doc.split("Args:")[1].split("Returns:")[0]
    missing = [p for p in documented if f"{p}:" not in args]
    assert not missing, f"kernelpack.{name}: Args does not say {missing}"


@pytest.mark.parametrize("name", PUBLIC)
def test_the_example_runs_as_written(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    function = getattr(kernelpack, name)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(function, name, globs={}) if t.examples]
    assert tests, f"kernelpack.{name} has no example"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.onnx.export's legacy exporter
        for test in tests:
            result = runner.run(test, out=lambda text: print(text, end=""))
            assert result.attempted > 1 and result.failed == 0, f"kernelpack.{name}'s example failed (above)"
    assert os.listdir(tmp_path)  # the examples wrote their files here
