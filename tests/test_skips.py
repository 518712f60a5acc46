"""The suite's skip rule (tests/conftest.py): only CUDA tests may skip; any other skip (a
Triton server not installed included) fails the run, so a test cannot silently stop running
in CI."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


def run(pytester: pytest.Pytester, name: str, body: str) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(**{name: body})
    return pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")


def test_an_unmarked_skip_fails_the_run(pytester: pytest.Pytester) -> None:
    result = run(pytester, "test_plain", "import pytest\ndef test_a():\n    pytest.skip('missing')\n")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skipped without an allowed reason*", "*test_plain.py::test_a"])


def test_a_module_skipped_at_import_fails_the_run(pytester: pytest.Pytester) -> None:
    """As tests/test_triton.py would be without the Triton wheel the test command installs."""
    result = run(pytester, "test_module", "import pytest\npytest.skip('gone', allow_module_level=True)\n")
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_cuda_skips_are_allowed(pytester: pytest.Pytester) -> None:
    result = run(pytester, "test_gpu", "import pytest\n@pytest.mark.cuda\ndef test_a():\n    pytest.skip('no GPU')\n"
                 "def test_b():\n    pass\n")
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=1)

