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

Before any of that, :func:`check_graph` walks every tensor of the ModelProto (initializers,
sparse initializers, node attributes, subgraphs, functions, training_info): each is inline
or, as an initializer of the main graph, a reference; anything that would make ONNX
Runtime read a file (it resolves a relative ``location`` against the working directory) is
refused. :func:`graph_and_weights` is the one door: ``ort_session``, ``kernelpack unpack F
out.onnx`` and the benchmarks get a container's graph only through it.

This module imports neither torch nor the ``onnx`` package: an ORT-only service needs
numpy, kernelpack and onnxruntime. The graph is read from the protobuf wire format directly.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from kernelpack.errors import KernelpackError, need_module
from kernelpack.limits import Limits
from kernelpack.reader import Container
from kernelpack.runtime import decode_all

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

Provider = str | tuple[str, dict[str, Any]]


# --- the graph's tensors, checked from the protobuf wire format (spec section 10) ---------------
@dataclass(frozen=True)
class WeightRef:
    """An initializer of ``onnx.graph`` that the container's tensor ``name`` feeds; ``where`` is
    its place in the ModelProto (e.g. ``graph.initializer[3]``), for error messages."""

    name: str
    elem_type: int
    shape: tuple[int, ...]
    where: str = field(default="", compare=False)


#: Deepest nesting of protobuf messages checked: protobuf's own default recursion limit, so every
#: graph ONNX Runtime can parse is checked, and a nesting bomb is refused without deep recursion.
MAX_DEPTH = 100
#: Bits per element of the ONNX element types (TensorProto.DataType), for the inline bound.
ELEMENT_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64,
                14: 64, 15: 128, 16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4, 24: 8, 25: 2,
                26: 2, 27: 6, 28: 6}
#: Bytes per element of a string tensor and of an element type not in ELEMENT_BITS (the size of a
#: C++ std::string, what ONNX Runtime allocates per string element).
OTHER_ELEMENT_BYTES = 32
#: An ORT-format model (flatbuffers) carries this at bytes 4..8; ONNX Runtime then does not parse
#: the bytes as a ModelProto, so nothing checked here would hold.
ORT_FORMAT_MARK = b"ORTM"
#: TensorProto fields that hold data (a reference holds none).
DATA_FIELDS = {3: "segment", 4: "float_data", 5: "int32_data", 6: "string_data", 7: "int64_data",
               9: "raw_data", 10: "double_data", 11: "uint64_data"}
#: The ONNX messages that hold tensors, directly or further down: field number -> (field name,
#: message type, repeated). Every TensorProto position of ModelProto (onnx.proto) is below these.
HOLDERS: dict[str, dict[int, tuple[str, str, bool]]] = {
    "ModelProto": {7: ("graph", "GraphProto", False), 20: ("training_info", "TrainingInfoProto", True),
                   25: ("functions", "FunctionProto", True)},
    "GraphProto": {1: ("node", "NodeProto", True), 5: ("initializer", "TensorProto", True),
                   15: ("sparse_initializer", "SparseTensorProto", True)},
    "NodeProto": {5: ("attribute", "AttributeProto", True)},
    "AttributeProto": {5: ("t", "TensorProto", False), 6: ("g", "GraphProto", False),
                       10: ("tensors", "TensorProto", True), 11: ("graphs", "GraphProto", True),
                       22: ("sparse_tensor", "SparseTensorProto", False),
                       23: ("sparse_tensors", "SparseTensorProto", True)},
    "TrainingInfoProto": {1: ("initialization", "GraphProto", False), 2: ("algorithm", "GraphProto", False)},
    "FunctionProto": {7: ("node", "NodeProto", True), 11: ("attribute_proto", "AttributeProto", True)},
    "SparseTensorProto": {1: ("values", "TensorProto", False), 2: ("indices", "TensorProto", False)},
}
#: NodeProto.op_type of nodes that name a file ONNX Runtime would read (a precompiled EP engine).
FILE_OPS = frozenset({"EPContext"})


class _WireError(ValueError):
    pass



def _log() -> Any:
    """The logger "kernelpack.ort", made on first use (logging costs 3 ms of import, a tenth
    of ``import kernelpack`` on this path)."""
    import logging

    return logging.getLogger("kernelpack.ort")

def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _WireError("truncated or overlong varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            if value >= 1 << 64:
                raise _WireError("varint beyond 64 bits")
            return value, pos


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; value is an int or bytes view.
    Stricter than protobuf: groups (wire types 3, 4) are refused, as are field numbers protobuf
    refuses."""
    pos, end = 0, len(buf)
    while pos < end:
        key = buf[pos]  # one-byte varints (most keys and lengths) read inline: the walk is a
        if key < 0x80:  # Python loop over every field of the model, half of a small model's load
            pos += 1
        else:
            key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if not 1 <= number < 1 << 29:
            raise _WireError(f"field number {number}")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size = buf[pos] if pos < end else 0x80
            if size < 0x80:
                pos += 1
            else:
                size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise _WireError(f"unsupported wire type {wire}")
        if pos > end:
            raise _WireError("a field runs past the end of its message")
        yield number, wire, value


def _dims(wire: int, value: Any) -> list[int]:
    """TensorProto.dims, packed or not; a negative dim (two's complement) is refused."""
    dims = [value] if wire == 0 else list(_packed(value)) if wire == 2 else None
    if dims is None:
        raise _WireError(f"dims has wire type {wire}")
    if any(d >= 1 << 63 for d in dims):
        raise _WireError("negative dimension")
    return dims


def _packed(buf: memoryview) -> Iterator[int]:
    pos = 0
    while pos < len(buf):
        value, pos = _varint(buf, pos)
        yield value


def _text(wire: int, value: Any) -> str:
    if wire != 2:
        raise _WireError(f"a string field has wire type {wire}")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise _WireError("a string field is not UTF-8") from None


@dataclass
class _Tensor:
    """What a TensorProto says about where its data is (every occurrence of a field, as protobuf
    merges them: repeated fields concatenate, the last scalar wins)."""

    name: str = ""
    data_type: int = 0
    dims: list[int] = field(default_factory=list)
    locations: list[int] = field(default_factory=list)
    external: list[tuple[str, str]] = field(default_factory=list)
    data: list[str] = field(default_factory=list)


def _tensor_facts(buf: memoryview) -> _Tensor:
    tensor = _Tensor()
    for number, wire, value in _fields(buf):
        if number == 1:
            tensor.dims += _dims(wire, value)
        elif number == 2 and wire == 0:
            tensor.data_type = value
        elif number == 8:
            tensor.name = _text(wire, value)
        elif number == 13:
            if wire != 2:
                raise _WireError(f"external_data has wire type {wire}")
            entry = {n: _text(w, v) for n, w, v in _fields(value) if n in (1, 2)}
            tensor.external.append((entry.get(1, ""), entry.get(2, "")))
        elif number == 14:
            if wire != 0:
                raise _WireError(f"data_location has wire type {wire}")
            tensor.locations.append(value)
        elif number in DATA_FIELDS:
            tensor.data.append(DATA_FIELDS[number])
    return tensor


def _elements(dims: Sequence[int], cap: int) -> int:
    """The product of ``dims``, or ``cap + 1`` once it exceeds ``cap`` (no huge products)."""
    if 0 in dims:
        return 0
    count = 1
    for d in dims:
        count *= d
        if count > cap:
            return cap + 1
    return count


class _GraphCheck:
    """One walk over a serialized ModelProto: every TensorProto in it, wherever it sits, is
    inline or (only as an initializer of the main graph) a reference; see :func:`check_graph`."""

    def __init__(self, path: str | None, max_bytes: int) -> None:
        self.path, self.max_bytes = path, max_bytes
        self.inline_bytes = 0
        self.refs: list[WeightRef] = []
        self.main_names: list[str] = []

    def bad(self, message: str, where: str, tensor: str | None = None) -> KernelpackError:
        return KernelpackError(message, path=self.path, tensor=tensor or None,
                               field=".".join(p for p in (f"attachments.{GRAPH}", where) if p))

    def message(self, buf: memoryview, kind: str, where: str, depth: int, main: bool = False) -> None:
        """Check one message of type ``kind`` (not a tensor) at ``where`` and what it holds."""
        if depth > MAX_DEPTH:
            raise self.bad(f"messages nest deeper than {MAX_DEPTH} levels", where)
        holders = HOLDERS[kind]
        seen: dict[int, int] = {}
        try:
            for number, wire, value in _fields(buf):
                if kind == "NodeProto" and number == 4 and (op_type := _text(wire, value)) in FILE_OPS:
                    raise self.bad(f"an {op_type} node names a file that ONNX Runtime would read", f"{where}.op_type")
                if number not in holders:
                    continue
                name, child, repeated = holders[number]
                at = self.child(where, name, wire, seen, number, repeated)
                if child == "TensorProto":
                    self.tensor(value, at, may_refer=main and number == 5)
                elif child == "SparseTensorProto":
                    self.sparse(value, at, depth + 1, main)
                else:
                    self.message(value, child, at, depth + 1, main=kind == "ModelProto" and number == 7)
        except _WireError as exc:
            raise self.bad(f"not a valid ONNX ModelProto: {exc}", where) from None

    def child(self, where: str, name: str, wire: int, seen: dict[int, int], number: int, repeated: bool) -> str:
        """The place of a message-typed field (``graph.node[3]``), once it is known to be one
        length-delimited message. A singular one that occurs twice is refused: protobuf would
        merge the two (concatenating, say, the dims of two tensors checked one by one)."""
        index = seen[number] = seen.get(number, -1) + 1
        at = f"{where}.{name}" if where else name
        if wire != 2:
            raise self.bad(f"has wire type {wire}; a message is length-delimited (2)", at)
        if index and not repeated:
            raise self.bad("occurs twice; it is a single message, which protobuf would merge", at)
        return f"{at}[{index}]" if repeated else at

    def tensor(self, buf: memoryview, where: str, may_refer: bool = False) -> _Tensor:
        try:
            tensor = _tensor_facts(buf)
        except _WireError as exc:
            raise self.bad(f"not a valid ONNX TensorProto: {exc}", where) from None
        if may_refer:
            self.main_names.append(tensor.name)
        if tensor.external or EXTERNAL in tensor.locations:
            if not may_refer:
                raise self.bad("has external data; only an initializer of the main graph may have any, "
                               f"and only as a reference to the container (location = {LOCATION!r})",
                               f"{where}.{'external_data' if tensor.external else 'data_location'}",
                               tensor.name)
            self.refs.append(self.reference(tensor, where))
        else:
            if any(location != 0 for location in tensor.locations):
                raise self.bad(f"data_location {max(tensor.locations)} is neither DEFAULT (0) nor EXTERNAL (1)",
                               f"{where}.data_location", tensor.name)
            self.count(tensor.data_type, tensor.dims, where, tensor.name)
        return tensor

    def reference(self, tensor: _Tensor, where: str) -> WeightRef:
        """A tensor with external data as a reference, or a KernelpackError saying what is wrong."""
        def refuse(message: str, field_name: str) -> KernelpackError:
            return self.bad(message, f"{where}.{field_name}", tensor.name)

        if tensor.external != [("location", LOCATION)]:
            shown = ", ".join(f"{k[:64]!r} = {v[:128]!r}" for k, v in tensor.external) or "none"
            raise refuse(f"external data ({shown}): ONNX Runtime would read a file; a reference's only "
                         f"external_data entry is 'location' = {LOCATION!r}", "external_data")
        if any(location != EXTERNAL for location in tensor.locations) or not tensor.locations:
            raise refuse("a reference has data_location EXTERNAL (1) and no other", "data_location")
        if tensor.data:
            raise refuse("a reference holds no data", tensor.data[0])
        if tensor.data_type not in ONNX_FLOAT_TYPES:
            raise refuse(f"a reference has element type FLOAT (1), FLOAT16 (10) or DOUBLE (11), not "
                         f"{tensor.data_type}", "data_type")
        return WeightRef(tensor.name, tensor.data_type, tuple(tensor.dims), where)

    def sparse(self, buf: memoryview, where: str, depth: int, main: bool) -> None:
        """A SparseTensorProto: values and indices inline; its dense size counts (ORT densifies
        sparse initializers and Constant sparse values when it loads the graph)."""
        dims: list[int] = []
        values = _Tensor()
        seen: dict[int, int] = {}
        try:
            for number, wire, value in _fields(buf):
                if number == 3:
                    dims += _dims(wire, value)
                elif number in (1, 2):
                    name = HOLDERS["SparseTensorProto"][number][0]
                    facts = self.tensor(value, self.child(where, name, wire, seen, number, False))
                    if number == 1:
                        values = facts
        except _WireError as exc:
            raise self.bad(f"not a valid ONNX SparseTensorProto: {exc}", where) from None
        if main:
            self.main_names.append(values.name)
        self.count(values.data_type, dims, f"{where}.dims", values.name)

    def count(self, data_type: int, dims: Sequence[int], where: str, name: str) -> None:
        """Add an inline tensor's declared size (dims x element size) to the graph's total."""
        bits = ELEMENT_BITS.get(data_type, 8 * OTHER_ELEMENT_BYTES)
        self.inline_bytes += -(-_elements(dims, self.max_bytes) * bits // 8)
        if self.inline_bytes > self.max_bytes:
            raise self.bad(f"the graph's inline tensors declare more than max_decoded_bytes={self.max_bytes} "
                           "bytes (dims x element size; see kernelpack.Limits)", where, name)

    def unique_references(self) -> None:
        """No initializer shares a reference's name: each reference is fed exactly once."""
        counts = Counter(self.main_names)
        for ref in self.refs:
            if counts[ref.name] > 1:
                raise self.bad("another initializer of the main graph has this name", f"{ref.where}.name", ref.name)


def check_graph(graph: bytes, path: str | None = None,
                max_bytes: int = Limits().max_decoded_bytes) -> list[WeightRef]:
    """The references of a serialized ModelProto, in graph order, once every tensor in it is known
    safe to give ONNX Runtime (spec/FORMAT.md, section 10): inline, or a reference to the
    container. Anything that would make a runtime read a file (any other external data, an
    ``EPContext`` node), inline tensors declaring more than ``max_bytes`` in all, and a
    malformed message raise KernelpackError naming ``path`` and the field (its place in the
    ModelProto, after ``attachments.onnx.graph``). Whether the container holds what the references name is checked by
    :func:`graph_and_weights`.
    """
    if graph[4:8] == ORT_FORMAT_MARK:
        raise KernelpackError("is an ORT-format model; the graph must be an ONNX ModelProto", path=path,
                              field=f"attachments.{GRAPH}")
    check = _GraphCheck(path, max_bytes)
    check.message(memoryview(graph), "ModelProto", "", 0)
    check.unique_references()
    return check.refs


# --- decoding the weights ------------------------------------------------------------------------
def check_reference(container: Container, ref: WeightRef) -> None:
    """The container's tensor that a reference names exists, with the reference's dims, a float."""
    def bad(message: str, field_name: str) -> KernelpackError:
        return KernelpackError(message, path=container.path, tensor=ref.name, field=field_name)

    if ref.name not in container:
        raise bad("the ONNX graph reads this tensor; the container has no tensor of that name",
                  f"attachments.{GRAPH}.{ref.where}.name")
    info = container.info(ref.name)
    if info.shape != ref.shape:
        raise bad(f"decodes to shape {list(info.shape)}; the ONNX graph expects {list(ref.shape)}", "shape")
    if info.dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise bad(f"is {info.dtype}; the ONNX graph expects a float tensor", "dtype")


def weight_array(container: Container, ref: WeightRef) -> np.ndarray:
    """The container's tensor for one checked reference, decoded by numpy, in the initializer's type."""
    return np.ascontiguousarray(container.get_numpy(ref.name), dtype=ONNX_FLOAT_TYPES[ref.elem_type])


def graph_and_weights(path: str | os.PathLike, limits: Limits | None = None,
                      threads: int | None = None) -> tuple[bytes, dict[str, np.ndarray]]:
    """The attached graph, checked (:func:`check_graph`, :func:`check_reference`), and every weight
    it reads, decoded (numpy, checked against the SHA-256s) on ``threads`` threads as by
    ``kernelpack.load_numpy``. The one way kernelpack hands a container's graph on: whatever
    reaches ONNX Runtime or an ``.onnx`` file went through here."""

    with Container(path, limits, preload=True) as c:
        graph = c.read_attachment(GRAPH)
        refs = check_graph(graph, c.path, max_bytes=c.limits.max_decoded_bytes)
        for ref in refs:
            check_reference(c, ref)
        by_name = {ref.name: ref for ref in refs}  # decoded within the limits, as a whole load
        return graph, decode_all(c, lambda name: weight_array(c, by_name[name]), threads, list(by_name))


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
            _log().info("onnxruntime has no %s; skipped", name)
            continue
        if name in GPU_PROVIDERS:
            has_gpu = cuda_device_count() > 0 if has_gpu is None else has_gpu
            if not has_gpu:
                _log().info("no CUDA device; %s skipped", name)
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

    The weights are decoded once and handed to ORT in memory; the graph is checked first
    (no initializer may point at a file, the weights it names must be in the container).

    Args:
        path: the container (written by ``pack_onnx`` or ``kernelpack pack model.onnx``).
        providers: default CUDA then CPU; unusable ones are dropped (see
            :func:`usable_providers`) and ``session.get_providers()[0]`` is the one that
            runs. If ORT itself cannot start a GPU provider (e.g. missing cuDNN), it falls
            back to CPU and a ``RuntimeWarning`` says so.
        sess_options: an ``onnxruntime.SessionOptions``, used as given, plus the weights.
        limits: the reader's bounds, as for ``kernelpack.open``.
        threads: the weights' decode, as for ``kernelpack.load_numpy``.

    Returns:
        The session, ready to ``run``.

    Raises:
        KernelpackError: for a damaged or hostile file or graph, naming the field.

    Example:
        >>> import numpy as np, torch, kernelpack
        >>> from kernelpack.onnx_io import pack_onnx
        >>> torch.onnx.export(torch.nn.Linear(4, 2), torch.zeros(1, 4), "linear.onnx", dynamo=False,
        ...                   input_names=["x"])
        >>> _ = pack_onnx("linear.onnx", "linear_graph.kpk")
        >>> session = kernelpack.ort_session("linear_graph.kpk", providers=["CPUExecutionProvider"])
        >>> session.run(None, {"x": np.zeros((1, 4), np.float32)})[0].shape
        (1, 2)
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
