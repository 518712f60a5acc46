"""Concurrency: many threads and processes loading one file at once get identical results,
and a file replaced (atomically) while it is open keeps reading as the file that was opened."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import kernelpack
from conftest import random_array
from kernelpack.layout import digest

THREADS = 8
PROCESSES = 4


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every form, a shared bank used by two tensors, a zstd payload; big enough that loads overlap."""
    path = tmp_path_factory.mktemp("concurrency") / "mixed.kpk"
    bank = np.random.default_rng(9).standard_normal((6, 3, 3))
    tensors = {"bias": random_array(0, (64,)), "zeros": np.zeros(4096, np.float32),
               "dct": random_array(1, (64, 32, 3, 3)), "series": random_array(2, (64, 32, 3, 3)),
               "basis": random_array(3, (64, 32, 3, 3)), "basis2": random_array(4, (32, 16, 3, 3)),
               "linear": random_array(5, (64, 32, 3, 3))}
    forms = {"dct": kernelpack.DCT(), "series": kernelpack.Series(), "linear": kernelpack.Linear(rank=8),
             "basis*": kernelpack.Basis(bank=bank, bank_name="shared")}
    kernelpack.save(tensors, path, forms=forms)
    return path


def digests(state: dict[str, np.ndarray]) -> dict[str, str]:
    return {name: digest(value, "float32" if value.dtype == np.float32 else str(value.dtype)).hex()
            for name, value in state.items()}


def run_threads(work: Callable[[int], dict[str, str]]) -> list[dict[str, str]]:
    """``work(i)`` in THREADS threads started together; their results, errors re-raised."""
    results: list[dict[str, str] | BaseException] = [{} for _ in range(THREADS)]
    start = threading.Barrier(THREADS)

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # reported below, in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def test_threads_loading_one_file_get_identical_results(mixed: Path) -> None:
    """Half load the file themselves, half share one open container (one descriptor, one bank cache)."""
    expected = digests(kernelpack.load_numpy(mixed))
    with kernelpack.open(mixed) as shared:
        results = run_threads(lambda i: digests(kernelpack.load_numpy(mixed)) if i % 2 else
                              digests({n: shared.get_numpy(n) for n in reversed(shared.keys())}))
    assert all(result == expected for result in results)


def test_threads_decoding_one_tensor_of_a_shared_container_with_both_backends(mixed: Path) -> None:
    with kernelpack.open(mixed) as shared:
        expected = digests({"basis": shared.get_numpy("basis")})
        results = run_threads(lambda i: digests({"basis": shared.get_numpy("basis") if i % 2 else
                                                 shared.get_tensor("basis").numpy()}))
    assert all(result == expected for result in results)


def test_processes_loading_one_file_get_identical_results(mixed: Path) -> None:
    code = ("import json, sys, kernelpack, numpy as np\n"
            "from kernelpack.layout import digest\n"
            "out = [{n: digest(v, 'float32').hex() for n, v in kernelpack.load_numpy(sys.argv[1]).items()}\n"
            "       for _ in range(3)]\n"
            "print(json.dumps(out))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(mixed)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(PROCESSES)]
    expected = digests(kernelpack.load_numpy(mixed))
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out) == [expected] * 3


def test_an_open_container_keeps_reading_the_file_it_opened_when_it_is_replaced(mixed: Path, tmp_path: Path) -> None:
    """The writer renames a new file over the old; an open descriptor still reads the old one."""
    path = tmp_path / "model.kpk"
    path.write_bytes(mixed.read_bytes())
    expected = digests(kernelpack.load_numpy(path))
    with kernelpack.open(path) as c:
        kernelpack.save({"other": np.ones(3, np.float32)}, path)
        assert digests({n: c.get_numpy(n) for n in c}) == expected
    assert list(kernelpack.load_numpy(path)) == ["other"]
