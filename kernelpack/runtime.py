"""The runtime: decode a container once into dense tensors, then run at dense speed.

``load`` returns a state_dict decoded by torch on the requested device (on CUDA the
decode arithmetic itself runs on the GPU); ``load_numpy`` decodes with numpy and
never imports torch (for ONNX Runtime services); ``load_model`` fills a ready
``nn.Module``; ``kernelpack.ort_session`` (in :mod:`kernelpack.ort`, which decodes through
this module; no torch) builds an ``onnxruntime.InferenceSession`` from a container that
carries its ONNX graph. Every load checks the whole
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
``threads=1`` decodes in the calling thread, one tensor after another. Thread pools stay
the application's (torch's and OpenMP's are never touched) with one exception, scoped to
the load: BLAS's threads and kernelpack's must not collide, so tall products run in row
blocks that BLAS keeps on the calling thread (kernelpack._backend), and while a load with
products large enough for BLAS's own threads runs, numpy's BLAS is held to one thread
(kernelpack._parallel.blas_limit_for), restored when the load returns.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from kernelpack._parallel import blas_limit_for, map_in_order, worker_count
from kernelpack.errors import KernelpackError
from kernelpack.forms._base import Cost
from kernelpack.limits import Limits
from kernelpack.reader import Container


def open(path: str | os.PathLike, limits: Limits | None = None) -> Container:  # noqa: A001
    """Open a container lazily (like safetensors.safe_open): every byte outside the payloads
    checked, tensors decoded one at a time on request. A tensor name the file does not hold
    raises KeyError, as a Mapping's lookup does (``name in c`` tells first); every other bad
    input is a KernelpackError."""
    return Container(path, limits)


Value = TypeVar("Value")


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
    with blas_limit_for([c.cost(name) for name in names if name in c]):
        state = map_in_order(decode, names, threads if fitting == auto else fitting, _cost(c))
    if whole:
        c.check_payloads()
    return state


def load(path: str | os.PathLike, device: Any = "cpu", limits: Limits | None = None,
         threads: int | None = None) -> dict[str, Any]:
    """Every tensor decoded once, by torch, on ``device``: a state_dict of dense tensors.

    The whole file is checked (header, every payload's SHA-256) before anything is
    returned; decoding is bit-exact, the same bits on every device.

    Args:
        path: the container.
        device: where the tensors are decoded ("cpu", "cuda", a torch.device).
        limits: the reader's bounds (``kernelpack.Limits``; default ``Limits()``).
        threads: tensors decoded at once (None: chosen by their sizes).

    Returns:
        ``{name: torch.Tensor}``, ready for ``load_state_dict``.

    Raises:
        KernelpackError: naming the file, tensor and field, for a damaged or hostile file.

    Example:
        >>> import numpy as np, kernelpack
        >>> _ = kernelpack.save({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "w.kpk")
        >>> kernelpack.load("w.kpk")["w"]
        tensor([[0., 1., 2.],
                [3., 4., 5.]])
    """
    from kernelpack._backend import TorchOps

    ops = TorchOps(device)
    with Container(path, limits, preload=True) as c:
        return decode_all(c, lambda name: c.decode(name, ops), threads)


def load_numpy(path: str | os.PathLike, limits: Limits | None = None,
               threads: int | None = None) -> dict[str, np.ndarray]:
    """Every tensor decoded once, by numpy, on the CPU (torch is not imported).

    Args:
        path: the container.
        limits: the reader's bounds (``kernelpack.Limits``; default ``Limits()``).
        threads: tensors decoded at once (None: chosen by their sizes).

    Returns:
        ``{name: numpy.ndarray}``; bfloat16 tensors widened to float32 (numpy has none).

    Raises:
        KernelpackError: naming the file, tensor and field, for a damaged or hostile file.

    Example:
        >>> import numpy as np, kernelpack
        >>> _ = kernelpack.save({"w": np.arange(3, dtype=np.float32)}, "w.kpk")
        >>> kernelpack.load_numpy("w.kpk")
        {'w': array([0., 1., 2.], dtype=float32)}
    """
    with Container(path, limits, preload=True) as c:
        return decode_all(c, c.get_numpy, threads)


def load_model(model: Any, path: str | os.PathLike, strict: bool = True,
               device: Any = None, limits: Limits | None = None, threads: int | None = None) -> Any:
    """Decode a container into a ready ``nn.Module``, on its device unless ``device`` is given.

    Args:
        model: the module to fill (its architecture; no model class is read from the file).
        path: the container.
        strict: every name must match, as in ``load_state_dict``.
        device: where the tensors are decoded (default: the model's parameters' device).
        limits: the reader's bounds, as for ``load``.
        threads: tensors decoded at once, as for ``load``.

    Returns:
        What ``load_state_dict`` returns (missing and unexpected keys).

    Raises:
        KernelpackError: for a damaged file, and for tensors that do not fit the model
            (names with ``strict``, shapes always).

    Example:
        >>> import torch, kernelpack
        >>> trained = torch.nn.Linear(4, 2)
        >>> _ = kernelpack.save(trained, "linear.kpk")
        >>> fresh = torch.nn.Linear(4, 2)
        >>> kernelpack.load_model(fresh, "linear.kpk")
        <All keys matched successfully>
        >>> torch.equal(fresh.weight, trained.weight)
        True
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
