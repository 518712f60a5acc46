"""Parallel load: a whole-file load gives the same tensors, and fails with the same error,
on any number of threads as one tensor after another (kernelpack.runtime, ``threads``).

Tensors whose decode costs less than ``_parallel.PARALLEL_MIN_WORK`` decode in the calling thread and the
others on the pool; the tests run with the real threshold and with 0 (every tensor on the
pool), and check that the pool was used, so that both paths are exercised.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import tracemalloc
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import kernelpack
from conftest import RawFile, random_array
from kernelpack import _parallel
from kernelpack.layout import digest
from kernelpack.reader import Container

VECTORS = Path(__file__).parent.parent / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text(encoding="utf-8"))
MiB = 1 << 20
BIG = (64, 32, 4, 4)  # 32768 elements: at the threshold, so it goes to the pool


@pytest.fixture(params=["threshold", "all-on-pool"])
def pools(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Runs with the real PARALLEL_MIN_WORK and AUTO_PARALLEL_WORK and with both 0; yields the
    worker counts of the pools made."""
    if request.param == "all-on-pool":
        monkeypatch.setattr(_parallel, "PARALLEL_MIN_WORK", 0)
        monkeypatch.setattr(_parallel, "AUTO_PARALLEL_WORK", 0)
    made: list[int] = []
    real = concurrent.futures.ThreadPoolExecutor  # _parallel imports it when a job first needs a pool

    def counting(workers: int, **kwargs: Any) -> Any:
        made.append(workers)
        return real(workers, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", counting)
    yield made


@pytest.fixture(scope="module")
def every_form(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every form and storage dtype, a shared bank, small and big tensors interleaved."""
    path = tmp_path_factory.mktemp("parallel") / "every_form.kpk"
    bank = np.random.default_rng(7).standard_normal((5, 4, 4))
    tensors = {"bias": random_array(0, (64,)), "dense": random_array(1, BIG),
               "dct": random_array(2, BIG), "steps": np.arange(12, dtype=np.int64),
               "series": random_array(3, BIG), "basis": random_array(4, BIG),
               "basis_small": random_array(5, (4, 2, 4, 4)), "linear": random_array(6, (128, 32, 4, 4)),
               "dense_bf16": random_array(7, BIG), "dct_small": random_array(8, (6, 5))}
    forms = {"dense": kernelpack.Dense("float16"), "dense_bf16": kernelpack.Dense("bfloat16"),
             "dct*": kernelpack.DCT(keep=0.2), "series": kernelpack.Series(harmonics=3),
             "basis*": kernelpack.Basis(bank=bank, bank_name="shared"),
             "linear": kernelpack.Linear(rank=6)}
    kernelpack.save(tensors, path, forms=forms)
    return path


def digests(state: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of each decoded tensor, over its raw bits (torch tensors via numpy)."""
    out = {}
    for name, value in state.items():
        array = value.numpy() if hasattr(value, "numpy") else value
        out[name] = digest(array, str(array.dtype)).hex()
    return out


def one_by_one(path: Path) -> dict[str, str]:
    """The reference: each tensor decoded on its own, through the lazy reader."""
    with Container(path) as c:
        return digests({name: c.get_numpy(name) for name in c.keys()})


@pytest.mark.parametrize("threads", [1, 2, 3, None])
def test_every_form_loads_to_the_same_bits_on_any_number_of_threads(
        every_form: Path, pools: list[int], threads: int | None) -> None:
    expected = one_by_one(every_form)
    state = kernelpack.load_numpy(every_form, threads=threads)
    assert list(state) == list(expected)  # the file's order
    assert digests(state) == expected
    assert digests(kernelpack.load(every_form, threads=threads)) == expected
    wanted = (os.cpu_count() or 1) if threads is None else threads
    # the pool really ran (one thread never makes one; by default, neither does a file this small)
    assert bool(pools) == (wanted > 1 and (threads is not None or _parallel.AUTO_PARALLEL_WORK == 0))


@pytest.mark.parametrize("name", sorted(MANIFEST["files"]))
def test_the_conformance_vectors_load_to_their_digests_on_two_threads(name: str, pools: list[int]) -> None:
    expected = MANIFEST["files"][name]["tensors"]
    state = kernelpack.load_numpy(VECTORS / name, threads=2)
    assert sorted(state) == sorted(expected)
    for tensor, entry in expected.items():
        assert digest(state[tensor], entry["dtype"]).hex() == entry["sha256"], tensor


def corrupt(path: Path, out: Path, *tensors: str) -> Path:
    """A copy of ``path`` with one byte of each named tensor's first payload flipped."""
    raw = RawFile.read(path)
    data = bytearray(raw.data)
    for tensor in tensors:
        ref = next(r for k, r in raw.refs() if k[:2] == ("tensors", tensor))
        data[ref["offset"]] ^= 0xFF
    raw.data = bytes(data)
    raw.write(out)
    return out


@pytest.mark.parametrize("broken, first", [
    (("linear", "dense"), "dense"),  # two big ones: the earlier, though the pool starts the bigger first
    (("steps", "series"), "steps"),  # a small one before a big one
    (("series", "basis_small"), "series"),  # a big one before a small one (small ones run first)
    (("dct_small", "bias"), "bias"),  # two small ones
])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_first_failing_tensor_in_file_order_is_the_error(
        every_form: Path, tmp_path: Path, pools: list[int], broken: tuple[str, ...], first: str,
        threads: int) -> None:
    path = corrupt(every_form, tmp_path / "broken.kpk", *broken)
    for load in (kernelpack.load_numpy, kernelpack.load):
        with pytest.raises(kernelpack.KernelpackError, match="checksum mismatch") as caught:
            load(path, threads=threads)
        assert (caught.value.path, caught.value.tensor) == (str(path), first)
        assert caught.value.field is not None and caught.value.field.startswith("arrays.")


def test_a_tensor_over_the_limits_is_refused_before_it_is_allocated(tmp_path: Path, pools: list[int]) -> None:
    """The limit check of each tensor still comes before its payload is read or decoded."""
    path = tmp_path / "big.kpk"
    small = {f"small{i}": random_array(i, (32, 32, 4, 4)) for i in range(3)}  # 0.5 MiB as float32
    kernelpack.save({**small, "huge": np.ones((1024, 1024, 4), np.float32)}, path)  # 16 MiB
    limits = kernelpack.Limits(max_decoded_bytes=4 * MiB)
    tracemalloc.start()
    try:
        with pytest.raises(kernelpack.KernelpackError, match="max_decoded_bytes") as caught:
            kernelpack.load_numpy(path, limits=limits, threads=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (caught.value.tensor, caught.value.field) == ("huge", "shape")
    assert peak < 4 * MiB, f"{peak / MiB:.1f} MiB allocated for a refused 16 MiB tensor"


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_threads_must_be_a_positive_integer_or_none(every_form: Path, threads: Any) -> None:
    with pytest.raises(ValueError, match="threads"):
        kernelpack.load_numpy(every_form, threads=threads)


def blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@pytest.mark.parametrize("threads", [1, 2])
def test_a_load_with_large_products_holds_blas_to_one_thread_while_it_runs(
        every_form: Path, monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """_parallel.blas_limit_for: every decode of the load sees numpy's BLAS on one thread, and
    the application's setting is back when the load returns (and when it fails)."""
    before = blas_threads()
    seen: list[list[int]] = []
    real = Container.get_numpy

    def spying(self: Container, name: str) -> Any:
        seen.append(blas_threads())
        return real(self, name)

    monkeypatch.setattr(Container, "get_numpy", spying)
    monkeypatch.setattr(_parallel, "blas_threaded", lambda entries: entries > 0)  # dct's and linear's count
    kernelpack.load_numpy(every_form, threads=threads)
    assert seen and all(set(s) == {1} for s in seen)
    assert blas_threads() == before
    monkeypatch.setattr(_parallel, "blas_threaded", lambda entries: False)  # no large product: left alone
    seen.clear()
    kernelpack.load_numpy(every_form, threads=threads)
    assert seen and all(s == before for s in seen)
