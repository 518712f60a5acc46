"""ONNX Runtime sessions straight from a container: decode once, weights handed over in memory.

A container packed from an ONNX model (``kernelpack pack model.onnx``) or from a PyTorch
model with its exported graph (:func:`kernelpack.onnx_io.torch_graph`) carries the
graph as the attachment ``onnx.graph``: the model with its weights taken out. Each
weight is an initializer that keeps its name, element type and dims but holds no data:
``data_location = EXTERNAL`` with the single ``external_data`` entry
``location = "kernelpack"``, meaning "the container's tensor of this name"
(spec/FORMAT.md, section 10).

:func:`ort_session` decodes those tensors with numpy, casts each to its initializer's
element type and gives them to ONNX Runtime with ``SessionOptions.add_external_initializers``,
the API made for exactly this (initializers declared external, data supplied in
memory): ORT checks each one's name, dims and type, and copies it into the graph
before optimisation, so no dense file is ever written and the decoded arrays can go
once the session exists. (``add_initializer`` would share the buffer instead, but it
needs a data-bearing initializer in the graph and ORT refuses an external one there.)

This module imports neither torch nor the ``onnx`` package: an ORT-only service needs
numpy, kernelpack and onnxruntime. The few graph facts it needs (which initializers
are references, their types and dims) are read from the protobuf wire format directly.
"""

from __future__ import annotations

import ctypes
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from kernelpack.container import Container, Limits
from kernelpack.errors import KernelpackError, need_module

#: The attachment holding the ONNX ModelProto with its weights taken out.
GRAPH = "onnx.graph"
#: ``external_data`` location that means "the container's tensor of the initializer's name".
LOCATION = "kernelpack"
#: ONNX TensorProto element types a weight may have, with their numpy dtypes.
ONNX_FLOAT_TYPES: dict[int, np.dtype] = {1: np.dtype("<f4"), 10: np.dtype("<f2"), 11: np.dtype("<f8")}
#: Tried in this order; CPU is the fallback that always works.
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

log = logging.getLogger("kernelpack.ort")
Provider = str | tuple[str, dict[str, Any]]


# --- the graph's weight references, from the protobuf wire format ---------------------------
@dataclass(frozen=True)
class WeightRef:
    """An initializer of ``onnx.graph`` that the container's tensor ``name`` feeds."""

    name: str
    elem_type: int
    shape: tuple[int, ...]


class _WireError(ValueError):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _WireError("truncated or overlong varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; value is an int or bytes view."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise _WireError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise _WireError("truncated field")
        yield number, wire, value


def _dims(wire: int, value: Any) -> list[int]:
    """TensorProto.dims, packed or not; a negative dim (two's complement) is refused."""
    dims = [value] if wire == 0 else list(_packed(value))
    if any(d >= 1 << 63 for d in dims):
        raise _WireError("negative dimension")
    return dims


def _packed(buf: memoryview) -> Iterator[int]:
    pos = 0
    while pos < len(buf):
        value, pos = _varint(buf, pos)
        yield value


def _reference(tensor: memoryview) -> WeightRef | None:
    """A TensorProto as a WeightRef if it is a kernelpack reference, else None."""
    dims: list[int] = []
    name, elem_type, location, entries = "", 0, 0, {}
    for number, wire, value in _fields(tensor):
        if number == 1:
            dims += _dims(wire, value)
        elif number == 2 and wire == 0:
            elem_type = value
        elif number == 8 and wire == 2:
            name = bytes(value).decode("utf-8")
        elif number == 13 and wire == 2:
            entry = {n: bytes(v).decode("utf-8") for n, w, v in _fields(value) if w == 2}
            entries[entry.get(1, "")] = entry.get(2, "")
        elif number == 14 and wire == 0:
            location = value
    if location != EXTERNAL or entries != {"location": LOCATION}:
        return None
    return WeightRef(name, elem_type, tuple(dims))


def graph_weights(graph: bytes) -> list[WeightRef]:
    """The initializers of a serialized ModelProto that the container feeds, in graph order."""
    refs = []
    for number, wire, model_field in _fields(memoryview(graph)):
        if number != 7 or wire != 2:  # ModelProto.graph
            continue
        for g_number, g_wire, tensor in _fields(model_field):
            if g_number == 5 and g_wire == 2:  # GraphProto.initializer
                ref = _reference(tensor)
                if ref is not None:
                    refs.append(ref)
    return refs


# --- decoding the weights ------------------------------------------------------------------------
def weight_array(container: Container, ref: WeightRef) -> np.ndarray:
    """The container's tensor for one reference, decoded by numpy, in the initializer's type."""
    def bad(message: str, field: str) -> KernelpackError:
        return KernelpackError(message, path=container.path, tensor=ref.name, field=field)

    if ref.name not in container:
        raise bad("the ONNX graph reads this tensor; the container has no tensor of that name",
                  f"attachments.{GRAPH}")
    if ref.elem_type not in ONNX_FLOAT_TYPES:
        raise bad(f"the ONNX graph declares element type {ref.elem_type}; a weight must be float, "
                  "float16 or double", f"attachments.{GRAPH}")
    info = container.info(ref.name)
    if info.shape != ref.shape:
        raise bad(f"decodes to shape {list(info.shape)}; the ONNX graph expects {list(ref.shape)}", "shape")
    if info.dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise bad(f"is {info.dtype}; the ONNX graph expects a float tensor", "dtype")
    return np.ascontiguousarray(container.get_numpy(ref.name), dtype=ONNX_FLOAT_TYPES[ref.elem_type])


def graph_and_weights(path: str | os.PathLike, limits: Limits | None = None,
                      threads: int | None = None) -> tuple[bytes, dict[str, np.ndarray]]:
    """The attached graph and every weight it reads, decoded (numpy, checked against the SHA-256s)
    on ``threads`` threads as by ``kernelpack.load_numpy``, with the same errors as one by one."""
    from kernelpack.runtime import _elements, map_in_order  # runtime imports this module

    with Container(path, limits, preload=True) as c:
        graph = c.read_attachment(GRAPH)
        try:
            refs = graph_weights(graph)
        except (_WireError, UnicodeDecodeError) as exc:
            raise KernelpackError(f"not a valid ONNX ModelProto: {exc}", path=c.path,
                                  field=f"attachments.{GRAPH}") from None
        by_name = {ref.name: ref for ref in refs}  # graph order; a repeated name: its last ref
        return graph, map_in_order(lambda name: weight_array(c, by_name[name]), list(by_name), threads,
                                   _elements(c))


# --- providers ----------------------------------------------------------------------------
def cuda_device_count() -> int:
    """CUDA devices the driver reports (0 without a driver), asked through libcuda, not torch."""
    for library in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(library)
            break
        except OSError:
            continue
    else:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def _provider_name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def usable_providers(requested: Sequence[Provider] | None = None) -> list[Provider]:
    """The requested providers this onnxruntime build has and this machine can run, CPU last.

    GPU providers are dropped when no CUDA device exists, so a session on a machine
    without a GPU starts on the CPU without ORT's error about missing CUDA libraries.
    """
    import onnxruntime

    built = set(onnxruntime.get_available_providers())
    requested = list(DEFAULT_PROVIDERS if requested is None else requested)
    has_gpu = None
    chosen = []
    for provider in requested:
        name = _provider_name(provider)
        if name not in built:
            log.info("onnxruntime has no %s; skipped", name)
            continue
        if name in GPU_PROVIDERS:
            has_gpu = cuda_device_count() > 0 if has_gpu is None else has_gpu
            if not has_gpu:
                log.info("no CUDA device; %s skipped", name)
                continue
        chosen.append(provider)
    if "CPUExecutionProvider" not in map(_provider_name, chosen):
        chosen.append("CPUExecutionProvider")
    return chosen


# --- the session --------------------------------------------------------------------------
def with_weights(options: Any, weights: Mapping[str, np.ndarray]) -> Any:
    """``options`` (an ``onnxruntime.SessionOptions``) given ``weights`` as the graph's external
    initializers, by name: how decoded weights reach ORT without a dense file (ORT refuses
    external references through ``add_initializer``)."""
    import onnxruntime as ort

    options.add_external_initializers(list(weights), [ort.OrtValue.ortvalue_from_numpy(a) for a in weights.values()])
    return options


def ort_session(path: str | os.PathLike, providers: Sequence[Provider] | None = None,
                sess_options: Any = None, limits: Limits | None = None, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for a container holding ``onnx.graph``.

    ``providers`` default to CUDA then CPU; unusable ones are dropped (see
    :func:`usable_providers`) and ``session.get_providers()[0]`` is the one that runs.
    If ORT itself cannot start a GPU provider (e.g. missing cuDNN), it falls back to CPU
    and a ``RuntimeWarning`` says so. ``sess_options`` (an ``onnxruntime.SessionOptions``)
    is used as given, plus the weights; ``limits`` as for ``kernelpack.open``, ``threads`` (the
    weights' decode) as for ``kernelpack.load_numpy``.
    """
    ort = need_module("onnxruntime", "an ONNX Runtime session", "onnx")
    graph, weights = graph_and_weights(path, limits, threads)
    options = with_weights(ort.SessionOptions() if sess_options is None else sess_options, weights)
    chosen = usable_providers(providers)
    try:
        session = ort.InferenceSession(graph, options, providers=chosen)
    except Exception as exc:  # ORT raises its own types (Fail, InvalidGraph, ...): report as one
        raise KernelpackError(f"onnxruntime cannot build a session from the graph: {exc}",
                              path=os.fspath(path), field=f"attachments.{GRAPH}") from None
    running = session.get_providers()
    lost = [p for p in map(_provider_name, chosen) if p not in running]
    if lost:
        warnings.warn(f"onnxruntime could not start {', '.join(lost)} (see its log); running on "
                      f"{running[0]}", RuntimeWarning, stacklevel=2)
    return session
