"""Fuzzing: damaged and hostile containers never crash, hang or fool the reader.

20,000 inputs of scripts/fuzz.py (the same ones every run: run seed 0), each read as a
service would (open and verify: every tensor decoded with numpy, every tenth with torch,
every attachment read; load_numpy; for a file with an ONNX graph, the graph checks and
weights ort_session reads): the reader either succeeds or raises KernelpackError naming
the file; no input takes a second; an input damaged without re-signing never loads unless
it is a seed byte for byte. A few hundred inputs of the coverage-guided harness
(scripts/fuzz_atheris.py, atheris) over containers and over ONNX graphs, for the default
Limits and the service setting, when atheris is installed. Every input a fuzzer ever found
(tests/data/fuzz_regressions/) stays fixed. The long runs use the scripts; their results
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

import kernelpack
from kernelpack.ort import GRAPH

ROOT = Path(__file__).parent.parent
INPUTS = 20_000
REGRESSIONS = sorted((ROOT / "tests" / "data" / "fuzz_regressions").glob("*.kpk"))


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz", ROOT / "scripts" / "fuzz.py")
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
    assert any(f.startswith("attachments.onnx.graph.graph") for f in fields), sorted(fields)  # the graph checks


def test_graph_seeds_are_onnx_models_that_read_the_container(tmp_path: Path) -> None:
    """The graph seeds start the fuzzers at the graph checks: two graphs of references (one
    also holding inline data) are read; the one whose initializer points at a local file is
    refused; the protobuf writer and reader of the graph mutation give back the same bytes."""
    outcomes = []
    for i, blob in enumerate(fuzz.graph_seeds()):
        path = tmp_path / f"{i}.kpk"
        path.write_bytes(blob)
        outcomes.append(fuzz.probe(str(path), "numpy"))
        with kernelpack.open(path) as c:
            graph = c.read_attachment(GRAPH)
        assert fuzz.pb_bytes(fuzz.pb_parse(graph)) == graph
    assert outcomes[:2] == ["ok", "ok"]
    assert outcomes[2].startswith("KernelpackError: attachments.onnx.graph.graph.initializer[3]"), outcomes


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
@pytest.mark.parametrize("limits", ["default", "service"])
def test_every_input_a_fuzzer_found_raises_a_kernelpack_error(path: Path, limits: str) -> None:
    outcome = fuzz.probe(str(path), "numpy", fuzz.LIMITS_BY_NAME[limits])
    assert outcome.startswith(("ok", "KernelpackError")), outcome


# --- coverage-guided (atheris) ------------------------------------------------------------
RUNS = 400


@pytest.fixture(scope="module", params=[("container", "default"), ("container", "service"), ("graph", "service")],
                ids=lambda p: "-".join(p))
def guided(request: Any, tmp_path_factory: Any) -> dict[str, Any]:
    """A short coverage-guided run (fixed libFuzzer seed) and its report."""
    pytest.importorskip("atheris")
    target, limits = request.param
    out = tmp_path_factory.mktemp(f"atheris-{target}-{limits}")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz_atheris.py"), "--target", target,
                           "--limits", limits, "--runs", str(RUNS), "--seed", "1", "--memory-mb", "4096",
                           "--out", str(out), "--report", str(out / "report.json")],
                          capture_output=True, text=True, timeout=300)
    assert (out / "report.json").exists(), done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    report["returncode"] = done.returncode
    return report


def test_coverage_guided_inputs_load_or_raise_a_kernelpack_error(guided: dict[str, Any]) -> None:
    assert guided["inputs"] == RUNS and guided["children"] == [0]
    assert guided["finding_count"] == 0 and guided["hang_count"] == 0, guided["findings"]
    assert set(guided["exception_types"]) == {"KernelpackError"}
    assert guided["returncode"] == 0 and guided["peak_rss_mib"] > 0


def test_coverage_guided_run_learns_with_the_structure_aware_mutators(guided: dict[str, Any]) -> None:
    """libFuzzer keeps inputs that reach new reader code: the corpus grows beyond the seeds, and
    the inputs come from fuzz.py's mutations as well as libFuzzer's own."""
    seeds = len(fuzz.seed_files()) if guided["target"] == "container" else len(fuzz.graph_seeds())
    assert guided["corpus_files"] > seeds and guided["coverage"]["edges"] > 0
    made = set(guided["mutations"])
    assert "libFuzzer" in made and ("header" in made if guided["target"] == "container" else "graph" in made), made


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
