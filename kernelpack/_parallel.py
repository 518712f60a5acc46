"""Threads, in one place: how many a job uses, the order-keeping parallel map that loads and
writes run their tensors on, and numpy's BLAS held to one thread while kernelpack's own
threads are the parallelism (kernelpack.runtime, kernelpack.writer, the planner
and calibration use these; none of them makes a pool of its own kind)."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, ContextManager, Sequence, TypeVar

from kernelpack._backend import blas_threaded
from kernelpack.errors import KernelpackError
from kernelpack.forms._base import Cost

Value = TypeVar("Value")


def worker_count(threads: int | None, tasks: int) -> int:
    """Threads a load uses: ``threads`` (None: one per CPU core), never more than ``tasks``."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise KernelpackError(f"must be an integer >= 1 or None, got {threads!r}", field="threads")
    wanted = (os.cpu_count() or 1) if threads is None else threads
    return max(1, min(wanted, tasks))


#: Tensors whose decode costs less work decode in the calling thread, before the others start
#: on the pool: their decode is mostly Python, and a thread running Python beside threads
#: busy in C calls makes each of those wait for the GIL when its call returns (up to the 5 ms
#: switch interval), which made many small tensors load slower on two threads than on one.
#: 2^20 is the work of reading and writing a dense tensor of 2^15 elements.
PARALLEL_MIN_WORK = 1 << 20
#: With ``threads=None`` a load whose pooled tensors cost less work than this in all runs in
#: the calling thread: below it the pool's start and the GIL hand-offs cost more than the
#: second core gives back (measured on the PP-OCR models, 1.2M-2.7M elements of mostly
#: dense tensors: one thread was up to 1.3x faster; a ResNet-18, 11.7M, loads 1.8x faster on
#: two). 2^27 is the work of a dense load of 4M elements.
AUTO_PARALLEL_WORK = 1 << 27


def map_in_order(fn: Callable[[str], Value], names: Sequence[str], threads: int | None,
                 cost: Callable[[str], Cost]) -> dict[str, Value]:
    """``{name: fn(name)}`` in the order of ``names``, on up to ``threads`` threads.

    Items whose work is under PARALLEL_MIN_WORK run first, in the calling thread; the others
    then run on the pool, costliest first, so that no big item is left running alone at the
    end. The exception raised is that of the first failing name in the order of ``names``,
    exactly as a sequential loop would raise it: after a failing small item only the big
    items before it run, and pool results are collected in order. Items not yet started
    are cancelled once one fails, and the pool waits for the running ones (nothing is left
    working after the call).
    """
    costs = {name: cost(name).work for name in names}  # once: for a small tensor it is a good part of its load
    big = [name for name in names if costs[name] >= PARALLEL_MIN_WORK]
    workers = worker_count(threads, len(big))
    if workers == 1 or (threads is None and sum(costs[name] for name in big) < AUTO_PARALLEL_WORK):
        return {name: fn(name) for name in names}
    results: dict[str, Value] = {}
    failure: Exception | None = None
    for position, name in enumerate(names):
        if costs[name] < PARALLEL_MIN_WORK:
            try:
                results[name] = fn(name)
            except Exception as exc:  # raised below, unless a big item before it fails first
                failure, names = exc, names[:position]
                break
    big = [name for name in names if costs[name] >= PARALLEL_MIN_WORK]
    from concurrent.futures import ThreadPoolExecutor  # here: 3 ms of import a one-thread load never needs

    with ThreadPoolExecutor(workers, thread_name_prefix="kernelpack-load") as pool:
        futures = {name: pool.submit(fn, name) for name in sorted(big, key=costs.__getitem__, reverse=True)}
        try:
            results.update((name, futures[name].result()) for name in big)
        finally:
            for future in futures.values():
                future.cancel()
    if failure is not None:
        raise failure
    return {name: results[name] for name in names}


def one_blas_thread() -> ContextManager[Any]:
    """numpy's BLAS on one thread for the duration (threadpoolctl; process-wide while it
    lasts, then restored), for work whose own threads are the parallelism: loads with large
    products (:func:`blas_limit_for`), the planner's tensor threads, calibration's thousands
    of small products (PP-OCR cls collection: 1.0 s on one BLAS thread, 12-17 s on two)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def blas_limit_for(costs: Sequence[Cost]) -> ContextManager[Any]:
    """:func:`one_blas_thread` while a load runs, if one of its decodes has a product BLAS
    would spread over its threads (``Cost.product``, kernelpack._backend.blas_threaded);
    else nothing (threadpoolctl is not even imported).

    Why: the load's own threads are the parallelism (one tensor per core), and BLAS's
    threads beside them only compete: OpenBLAS's workers spin for a while after each call,
    taking the core a load thread needs. On this project's 2-core machine, OpenBLAS on two
    threads was even slower than on one for every product shape measured (1024^3: 35 against
    50 GFLOP/s), and a ResNet-50 dct load took 2.2 s against 1.0 s (benchmarks/README.md,
    load_targets.py). The limit is threadpoolctl's (what scikit-learn does around its own
    BLAS-heavy code)."""
    return one_blas_thread() if any(blas_threaded(c.product) for c in costs) else contextlib.nullcontext()
