"""Fuzzing: damaged and hostile containers never crash, hang or fool the reader.

20,000 inputs of scripts/fuzz.py (the same ones every run: run seed 0), each read as a
service would (open, decode every tensor with numpy, every tenth with torch, read every
attachment, verify): the reader either succeeds or raises KernelpackError naming the file;
no input takes a second; an input damaged without re-signing never loads unless it is a
seed byte for byte. The long runs (a million inputs) use the script itself; their results
are in benchmarks/FUZZ.md.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent
INPUTS = 20_000


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kernelpack_fuzz", ROOT / "scripts" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fuzz = load_script()


@pytest.fixture(scope="module")
def run() -> Any:
    return fuzz.run_range(fuzz.seed_files(), seed=0, indices=range(INPUTS), torch_every=10)


def test_every_input_loads_or_raises_a_kernelpack_error(run: Any) -> None:
    assert run.inputs == INPUTS
    assert not run.findings, run.findings[:3]
    assert set(run.exception_types()) == {"KernelpackError"}


def test_no_input_takes_a_second(run: Any) -> None:
    assert run.slowest["seconds"] < 1.0, run.slowest


def test_the_inputs_reach_every_kind_of_check(run: Any) -> None:
    """Not only the header checksum: re-signed inputs get to the fields, the layout, the
    payload checksums, zstd, the values and the memory limit; some load."""
    assert set(run.mutations) == set(fuzz.MUTATIONS)
    fields = {o.removeprefix("KernelpackError: ") for o in run.outcomes}
    assert {"magic", "version", "header_length", "header_sha256", "header", "size", "padding", "shape",
            "dtype", "form", "axes", "boundary", "harmonics", "points", "bank", "metadata",
            "arrays.data", "arrays.coefficients", "arrays.index", "arrays.order", "attachments",
            "ok", "ok, digest mismatch"} <= fields, sorted(fields)
    assert run.outcomes["ok"] + run.outcomes["ok, digest mismatch"] > 100


def test_the_long_run_script_reports_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--count", "300", "--jobs", "2",
                           "--torch-every", "0", "--report", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["inputs"] == 300 and report["finding_count"] == 0
    assert set(report["exception_types"]) == {"KernelpackError"}
    assert report["peak_rss_mib"] > 0 and report["slowest"]["seconds"] < 1.0
    assert sum(report["outcomes"].values()) == 300


def test_the_watchdog_records_a_hang_and_goes_on(tmp_path: Path) -> None:
    """An input that runs past the timeout (here one made to sleep) is recorded as a hang,
    its worker killed, and a new worker runs the rest."""
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--count", "20", "--jobs", "1",
                           "--timeout", "0.5", "--stall", "7", "--torch-every", "0", "--report", str(out)],
                          capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    assert done.returncode == 1 and report["inputs"] == 20 and report["outcomes"]["hang"] == 1
    assert [(f["index"], f["exception"]) for f in report["findings"]] == [(7, "hang over 0.5 s")]
