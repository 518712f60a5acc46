"""The runtime: decode a container once into dense tensors, then run at dense speed.

``load`` returns a state_dict decoded by torch on the requested device (on CUDA the
decode arithmetic itself runs on the GPU); ``load_numpy`` decodes with numpy and
never imports torch (for ONNX Runtime services); ``load_model`` fills a ready
``nn.Module``; ``ort_session`` builds an ``onnxruntime.InferenceSession`` from a container
that carries its ONNX graph (:mod:`kernelpack.ort`, no torch). Every load checks the whole
file: header, layout, zero padding and the SHA-256 of every payload (attachments included),
so that any corrupted byte is an error. ``limits`` (a :class:`Limits`) bounds what a file
may make the reader allocate; services that open untrusted files may lower the defaults.

Whole-file loads decode their tensors on ``threads`` threads (default None: one per CPU
core, at most one per tensor whose decode costs PARALLEL_MIN_WORK or more, and none beside
the calling thread when those tensors cost less than AUTO_PARALLEL_WORK in all; cheaper
tensors decode in the calling thread first). Costs are the work the header declares for
each decode (spec/FORMAT.md section 5: multiply-adds, table entries, elements read and
written), so a small dct tensor with long products goes to the pool where a dense tensor
of the same size does not. Reading, SHA-256, zstd and the large numpy/torch operations
release the GIL. The result is the same with any number of threads (each tensor's decode
is deterministic and independent of the others), and so is a failure: the error raised is
the one of the first failing tensor in the file's order, as a one-thread load would raise.
Each decode is checked against ``limits`` before it allocates, as on one thread; ``threads``
decodes run at once, so peak memory is up to ``threads`` times one decode's.
``threads=1`` decodes in the calling thread, one tensor after another. kernelpack never
changes a thread pool's size (BLAS's, OpenMP's, torch's: process-wide settings stay the
application's); instead its products are cut so that they never make BLAS's threads and
its own collide: tall products run in blocks BLAS keeps on the calling thread
(kernelpack._backend), and while a load with large products runs, numpy's BLAS is held
to one thread (:func:`one_blas_thread`; the one process-wide change, undone when the
load returns).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, ContextManager, Sequence, TypeVar

import numpy as np

from kernelpack._backend import blas_threaded
from kernelpack.container import Container, Limits
from kernelpack.errors import KernelpackError
from kernelpack.forms._base import Cost
from kernelpack.ort import ort_session  # noqa: F401 - an ONNX Runtime session, torch-free


def open(path: str | os.PathLike, limits: Limits | None = None) -> Container:  # noqa: A001
    """Open a container lazily (like safetensors.safe_open): every byte outside the payloads
    checked, tensors decoded one at a time on request. A tensor name the file does not hold
    raises KeyError, as a Mapping's lookup does (``name in c`` tells first); every other bad
    input is a KernelpackError."""
    return Container(path, limits)


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


def one_blas_thread(costs: Sequence[Cost]) -> ContextManager[Any]:
    """numpy's BLAS on one thread while a load runs, if one of its decodes has a product
    BLAS would spread over its threads (``Cost.product``, kernelpack._backend.blas_threaded);
    else nothing (threadpoolctl is not even imported).

    Why: the load's own threads are the parallelism (one tensor per core), and BLAS's
    threads beside them only compete: OpenBLAS's workers spin for a while after each call,
    taking the core a load thread needs. On this project's 2-core machine, OpenBLAS on two
    threads was even slower than on one for every product shape measured (1024^3: 35 against
    50 GFLOP/s), and a ResNet-50 dct load took 2.2 s against 1.0 s (benchmarks/README.md,
    load_targets.py). The limit is threadpoolctl's (what scikit-learn does around its own
    BLAS-heavy code): process-wide while the load runs, restored when it returns."""
    if not any(blas_threaded(c.product) for c in costs):
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _cost(container: Container) -> Callable[[str], Cost]:
    """A tensor's decode cost as its checked header declares it (already computed by the
    load's limit check); none for a name the container lacks (its decode raises the error,
    in the calling thread)."""
    return lambda name: container.cost(name) if name in container else Cost(0, 0, 0)


def decode_all(c: Container, decode: Callable[[str], Value], threads: int | None,
               names: Sequence[str] | None = None) -> dict[str, Value]:
    """``{name: decode(name)}`` for ``names`` (default: every tensor of ``c``, and then the
    payloads no decode reads are checked too), after the whole load is checked against the
    limits: work, and total memory with every result kept and the working sets of the
    threads running at once (which may lower the thread count)."""
    whole = names is None
    names = c.keys() if names is None else list(names)
    auto = worker_count(threads, len(names))
    fitting = c.plan_load(auto, names)
    with one_blas_thread([c.cost(name) for name in names if name in c]):
        state = map_in_order(decode, names, threads if fitting == auto else fitting, _cost(c))
    if whole:
        c.check_payloads()
    return state


def load(path: str | os.PathLike, device: Any = "cpu", limits: Limits | None = None,
         threads: int | None = None) -> dict[str, Any]:
    """Every tensor decoded by torch on ``device``: a state_dict of dense tensors."""
    from kernelpack._backend import TorchOps

    ops = TorchOps(device)
    with Container(path, limits, preload=True) as c:
        return decode_all(c, lambda name: c.decode(name, ops), threads)


def load_numpy(path: str | os.PathLike, limits: Limits | None = None,
               threads: int | None = None) -> dict[str, np.ndarray]:
    """Every tensor decoded by numpy on the CPU (no torch import; bfloat16 widened to float32)."""
    with Container(path, limits, preload=True) as c:
        return decode_all(c, c.get_numpy, threads)


def load_model(model: Any, path: str | os.PathLike, strict: bool = True,
               device: Any = None, limits: Limits | None = None, threads: int | None = None) -> Any:
    """Decode into a ready ``nn.Module`` (on its device unless ``device`` is given).

    Returns what ``load_state_dict`` returns (missing and unexpected keys). A file whose
    tensors do not fit the model (names with ``strict``, shapes always) is a KernelpackError.
    """
    if not (hasattr(model, "load_state_dict") and hasattr(model, "parameters")):
        raise KernelpackError(f"load_model fills an nn.Module, got {type(model).__name__}", field="model")
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else "cpu"
    state = load(path, device=device, limits=limits, threads=threads)
    try:
        return model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:  # torch's report of missing, unexpected and misshapen tensors
        raise KernelpackError(f"does not fit the model: {' '.join(str(exc).split())}",
                              path=os.fspath(path)) from None
