"""``kernelpack serve MODEL.kpk``: an HTTP inference service that loads a container at start,
answers JSON or binary tensors, and bounds what any client, or all clients together, can make
it hold.

    kernelpack serve model.kpk [--host 127.0.0.1] [--port 8000] [--threads N] [--device auto|cpu|cuda]
                               [--name NAME] [--limit NAME=VALUE]... [--set NAME=VALUE]...

The container must carry its ONNX graph (``kernelpack pack model.onnx``, or a PyTorch model
saved with ``kernelpack.onnx_io.torch_graph``). At start the weights are decoded once (numpy)
under :data:`SERVICE_LIMITS` (``--limit`` sets any field of ``kernelpack.Limits``) and handed
to an ONNX Runtime session in memory; no dense weights are written anywhere, and torch is not
needed. ``--device cuda`` asks for ORT's CUDA provider and refuses to start without it (no
silent CPU service); ``cpu`` runs on the CPU; ``auto`` (default) takes CUDA when usable, and
the start line names the provider that runs. A container the reader refuses stops the start
with one line, ``kernelpack: error: ...``, and exit status 2. SIGTERM or SIGINT stops it
gracefully: no new connections, idle ones closed, requests under way answered (within
``transfer_timeout``), then exit status 0.

Paths (every answer is JSON; a refusal is ``{"error": "..."}`` with a 4xx/5xx status):

    GET  /health                 {"status": "ready", "providers", "load_seconds", "inputs", "outputs",
                                  "load": {"connections", "requests", "body_bytes", "running", "peak"}}
    GET  /metadata               {"name", "container": {"file", "bytes", "format_version", "header_sha256"},
                                  "providers", "inputs": [{"name", "type", "dtype", "shape"}], "outputs"}
    POST /predict                JSON {"inputs": {"x": [[...]]}} -> {"outputs": {"name": [[...]]}}
                                 or one tensor as binary (below) -> the same JSON answer
    GET  /v2/health/live, /v2/health/ready, /v2/models/NAME/ready   KServe v2: 200 {"ready": true}
    GET  /v2/models/NAME         {"name", "versions": ["1"], "platform": "onnxruntime_onnx", "inputs":
                                  [{"name", "datatype", "shape"}], "outputs"}  (-1 for a free dimension)
    POST /v2/models/NAME/infer   {"inputs": [{"name", "shape", "datatype", "data": [flat values]}]}
                                 -> {"model_name", "model_version": "1", "outputs": [{... "data"}]}

``header_sha256`` is the container's own header checksum (spec/FORMAT.md, section 2): it names
the file's exact contents, header and (through the payload digests it covers) data alike.
``NAME`` is ``--name``, by default the container's file name without ``.kpk``. KServe's binary
tensor extension is not implemented (a request using it is refused as not JSON).

**Binary bodies** (``POST /predict``, for a one-input model or with ``X-Input: NAME``): a
``Content-Type: application/x-npy`` body is one ``.npy`` file (format 1.0 or 2.0), read without
pickle: its header is parsed, an object dtype refused, and the data must be exactly the bytes
its shape and dtype declare; an ``application/octet-stream`` body is the raw C-order bytes
with ``X-Dtype`` (a numpy name, e.g. ``float32``) and ``X-Shape`` (e.g. ``1,3,48,192``). The
dtype must be the input's own (no conversion: 400 names both). JSON inputs are nested lists
(or numbers) converted to each input's element type; a body that is not that is answered 400.

**Bounds** (:class:`Settings`, ``--set NAME=VALUE``). Each connection has deadlines: the
first byte of a request within ``idle_timeout`` (else it is closed: idle keep-alive and
never-speaking sockets), the rest of the head within ``header_timeout`` and the body
within ``transfer_timeout`` (else 408 and close: slowloris), the response sent within
``transfer_timeout``. Beyond ``max_connections`` open connections a new one gets 503 and
is closed. A POST must declare ``Content-Length`` (411 otherwise, chunked bodies included)
and is refused before a byte of its body is read: 413 beyond ``max_body_bytes``; 503 when
``max_requests`` predictions are already admitted, or when its body would take the bodies
admitted and not yet answered beyond ``max_inflight_bytes``. (Parsing makes a body's JSON
into Python lists: a peak of 2.6 times its bytes for float32 values as ``json.dumps`` writes
them, 7.5 times for short numbers such as ``0.5``, measured by benchmarks/serving_load.py;
so requests in flight hold at most about 10 times ``max_inflight_bytes``, 640 MiB by
default. A binary body is used in place: about 1 times.) The body's nesting depth and number
of values are counted from its bytes (:func:`json_extent`, vectorised, no recursion) before
``json.loads`` sees it: 400 beyond ``max_json_depth`` or ``max_json_values``. The GET paths
need no slot: they answer from the event loop while predictions are full.

**Parallel inference.** ``InferenceSession.run`` is thread-safe, so admitted requests are
parsed and run on a pool of ``workers`` threads (the pool is the semaphore on concurrent
runs); each run gets ``threads // workers`` intra-op threads (``--threads``, default all
cores; ``workers`` defaults to ``min(4, threads)``), so that concurrent runs do not
oversubscribe the CPU.

**Why the standard library (asyncio) and not uvicorn/starlette.** Connections are served by
an ``asyncio`` protocol (:class:`Connection`: an idle connection costs a socket and a small
object, no thread or task; a body is read straight into its buffer), the work by a bounded
thread pool. uvicorn 0.54, the ASGI server of choice, was checked for
these bounds and misses two of them: its keep-alive timer starts only after a first
response, so a socket that never sends, or sends its head a byte at a time, is never
closed; and its ``limit_concurrency`` counts open connections, so 1000 idle sockets make
it answer ``/health`` with 503. Body size, bytes in flight and the JSON depth would be our
code under either. What remains of HTTP/1.1 here is a request line, header lines and a
``Content-Length`` body (no chunked bodies, no pipelining beyond one request at a time):
some 200 lines, and no dependency beyond the package's own (numpy; onnxruntime from the
``onnx`` extra at start).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import math
import os
import queue
import re
import resource
import signal
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from kernelpack.errors import KernelpackError, need_module
from kernelpack.layout import PREAMBLE
from kernelpack.limits import Limits
from kernelpack.ort import ort_session

#: ONNX Runtime type strings -> numpy dtypes accepted in requests.
ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                 "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
                 "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}

#: numpy dtype names -> KServe v2 / Triton data type names (Triton's config adds ``TYPE_``).
V2_TYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
            "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}

#: The reader's limits for a service's container (a file it did not make, decoded once at
#: start): a quarter GiB per array, 2 GiB for the whole load and 2**35 operations (some 15 s
#: of decoding on one core) are more than a served CNN needs and less than a hostile file asks.
SERVICE_LIMITS = Limits(max_decoded_bytes=256 << 20, max_total_bytes=2 << 30, max_work=1 << 35)

DEVICES = {"auto": None, "cpu": ["CPUExecutionProvider"],
           "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Settings:
    """What one client, and all clients together, may make the service hold (see the module
    docstring for what each refusal answers), and the CPU threads its runs share. Times in
    seconds, sizes in bytes."""

    workers: int = max(1, min(4, cores()))
    threads: int = cores()
    max_connections: int = 4096
    max_requests: int = 64
    max_body_bytes: int = 32 << 20
    max_inflight_bytes: int = 64 << 20
    max_header_bytes: int = 32 << 10
    max_json_depth: int = 32
    max_json_values: int = 1 << 23
    idle_timeout: float = 5.0
    header_timeout: float = 10.0
    transfer_timeout: float = 60.0

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"settings.{item.name} must be a positive number, got {value!r}")

    @property
    def intra_op_threads(self) -> int:
        """ORT threads per run: the threads shared by the runs that may go at once."""
        return max(1, self.threads // self.workers)


class BadRequest(ValueError):
    """A request the model cannot answer; its message goes back to the client (400)."""


class Refusal(Exception):
    """A request refused at the HTTP level: answered ``status`` and the connection closed
    (its body, if any, is not read)."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- JSON without recursion ------------------------------------------------------------
_MARKS = b'"[]{},'
_NOT_MARKS = bytes(sorted(set(range(256)) - set(_MARKS)))
_STEP = np.zeros(256, np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
_OPENS_VALUE = np.zeros(256, bool)  # a comma or an opening bracket starts a value
_OPENS_VALUE[[ord(","), ord("["), ord("{")]] = True


def json_extent(data: bytes | bytearray, chunk: int = 1 << 20) -> tuple[int, int]:
    """(deepest nesting, an upper bound on the number of values) of JSON text, from its
    bytes alone: no parse, no recursion, memory a few times ``chunk``.

    Escaped backslashes and then escaped quotes are dropped (left to right, as a JSON
    reader pairs them), then everything but quotes, brackets and commas; what is left is
    scanned in chunks, brackets and commas inside strings not counted. Up to the first
    syntax error (where ``json.loads`` stops) this is the reader's own view of the text,
    so ``json.loads`` never nests deeper than the depth returned. Only UTF-8 is valid
    here: bytes below 0x80 are then characters.
    """
    marks = np.frombuffer(data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_MARKS),
                          np.uint8)
    depth = deepest = values = 0
    quoted = np.uint8(0)  # 1 inside a string at the chunk's start
    for start in range(0, len(marks), chunk):
        part = marks[start:start + chunk]
        parity = np.bitwise_xor.accumulate(part == ord('"'), dtype=np.uint8) ^ quoted
        outside = parity == 0  # (a closing quote reads as outside; it is not counted)
        levels = depth + np.cumsum(_STEP[part] * outside, dtype=np.int64)
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
        values += int(np.count_nonzero(_OPENS_VALUE[part] & outside))
        quoted = parity[-1]
    return deepest, values + 1


def parse_json(data: bytes | bytearray, settings: Settings) -> Any:
    """The body as a JSON value, refused (BadRequest) beyond the depth or value count of
    ``settings`` before ``json.loads`` runs."""
    depth, values = json_extent(data)
    if depth > settings.max_json_depth:
        raise BadRequest(f"the JSON nests {depth} deep; at most {settings.max_json_depth} is accepted")
    if values > settings.max_json_values:
        raise BadRequest(f"the JSON holds about {values} values; at most {settings.max_json_values} are accepted")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the body is not UTF-8: {exc}") from None
    except ValueError as exc:  # json.JSONDecodeError, and ints beyond Python's digit limit
        raise BadRequest(f"the body is not JSON: {exc}") from None


# --- binary tensors --------------------------------------------------------------------
def _exact_bytes(shape: tuple[int, ...], dtype: np.dtype, got: int) -> None:
    """Refuse a body whose size is not what its shape and dtype declare."""
    if any(n < 0 for n in shape):
        raise BadRequest(f"shape {list(shape)} has a negative dimension")
    wanted = math.prod(shape) * dtype.itemsize
    if wanted != got:
        raise BadRequest(f"shape {list(shape)} of {dtype.name} is {wanted} bytes; the body holds {got}")


#: .npy headers parsed before (their bytes, magic to padding -> shape, fortran order, dtype):
#: numpy's parser (``ast.literal_eval``) takes some 50 us a request, and a client sends the
#: same header again and again. Only headers numpy accepted, of dtypes without objects; at most
#: ``_NPY_CACHED`` of them of at most 1 KiB each (cleared when full: a client cannot grow it).
_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype]] = {}
_NPY_CACHED = 64


def _npy_header(body: bytearray) -> bytes | None:
    """The bytes of a .npy 1.0 / 2.0 body's header, from its preamble (None: no such preamble,
    or a header beyond 1 KiB)."""
    if body[:8] == b"\x93NUMPY\x01\x00":
        end = 10 + int.from_bytes(body[8:10], "little")
    elif body[:8] == b"\x93NUMPY\x02\x00":
        end = 12 + int.from_bytes(body[8:12], "little")
    else:
        return None
    return bytes(body[:end]) if end <= min(len(body), 1024) else None


def parse_npy(body: bytearray) -> np.ndarray:
    """One ``.npy`` file (format 1.0 or 2.0) as an array over the body's bytes: no pickle, no
    object dtype, and exactly the bytes its header declares (numpy's own header parser, whose
    header size limit applies; its answer for a header seen before is :data:`_NPY_HEADERS`)."""
    key = _npy_header(body)
    known = _NPY_HEADERS.get(key) if key is not None else None
    if known is not None:
        shape, fortran, dtype = known
        _exact_bytes(shape, dtype, len(body) - len(key))
        return np.frombuffer(body, dtype, offset=len(key)).reshape(shape, order="F" if fortran else "C")
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise BadRequest(f".npy format {version[0]}.{version[1]} is not accepted (1.0 or 2.0)")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(stream)
    except BadRequest:
        raise
    except Exception as exc:  # numpy's parser raises ValueError, SyntaxError, tokenize.TokenError, ...
        raise BadRequest(f"the body is not a .npy file: {type(exc).__name__}: {exc}") from None
    if dtype.hasobject:
        raise BadRequest("a .npy body of objects is refused (it would need pickle)")
    _exact_bytes(tuple(shape), dtype, len(body) - stream.tell())
    if key is not None and len(key) == stream.tell():
        if len(_NPY_HEADERS) >= _NPY_CACHED:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[key] = (tuple(shape), fortran, dtype)
    flat = np.frombuffer(body, dtype, offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


def parse_raw(body: bytearray, headers: Headers) -> np.ndarray:
    """An ``application/octet-stream`` body: C-order bytes of ``X-Dtype`` and ``X-Shape``."""
    dtype_name, shape_text = _one(headers, "x-dtype"), _one(headers, "x-shape")
    if dtype_name is None or shape_text is None:
        raise BadRequest("an application/octet-stream body needs X-Dtype (e.g. float32) and X-Shape "
                         "(e.g. 1,3,48,192) headers")
    if dtype_name not in V2_TYPES:
        raise BadRequest(f"X-Dtype {dtype_name!r} is not one of {sorted(V2_TYPES)}")
    if not re.fullmatch(r"\s*(\d{1,12}\s*(,\s*\d{1,12}\s*)*)?", shape_text):
        raise BadRequest(f"X-Shape {shape_text!r} is not comma-separated sizes")
    shape = tuple(int(n) for n in shape_text.split(",") if n.strip())
    dtype = np.dtype(dtype_name)
    _exact_bytes(shape, dtype, len(body))
    return np.frombuffer(body, dtype).reshape(shape)


def _one(headers: Headers, name: str) -> str | None:
    values = headers.get(name, [])
    if len(values) > 1:
        raise BadRequest(f"header {name} is given {len(values)} times")
    return values[0] if values else None


# --- the model -------------------------------------------------------------------------
def identity(path: str) -> dict[str, Any]:
    """File name, size, format version and header checksum (preamble bytes 8..11 and 16..47,
    hex): what names this exact container."""
    with open(path, "rb") as f:
        preamble = f.read(PREAMBLE)
    major, minor = struct.unpack("<HH", preamble[8:12])
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path),
            "format_version": f"{major}.{minor}", "header_sha256": preamble[16:48].hex()}


class Model:
    """An ORT session built from a container, with request conversion around ``run``."""

    def __init__(self, path: str, providers: Sequence[Any] | None = None, limits: Limits = SERVICE_LIMITS,
                 intra_op_threads: int | None = None, name: str | None = None) -> None:
        start = time.perf_counter()
        self.session = ort_session(path, providers, session_options(intra_op_threads), limits)
        self.load_seconds = time.perf_counter() - start
        self.name = name or os.path.splitext(os.path.basename(path))[0]
        self.container = identity(path)  # the header the load has just checked
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def signature(self, args: Sequence[Any]) -> list[dict[str, Any]]:
        """Name, ORT type, numpy dtype (null if no JSON type) and shape (names or null for free
        dimensions, as ORT reports them) of inputs or outputs."""
        return [{"name": a.name, "type": a.type, "dtype": _dtype_name(a.type), "shape": a.shape} for a in args]

    def describe(self) -> dict[str, Any]:
        return {"status": "ready", "providers": self.session.get_providers(), "load_seconds": self.load_seconds,
                "inputs": self.signature(self.session.get_inputs()),
                "outputs": self.signature(self.session.get_outputs())}

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "container": self.container, "providers": self.session.get_providers(),
                "inputs": self.signature(self.session.get_inputs()),
                "outputs": self.signature(self.session.get_outputs())}

    def v2_metadata(self) -> dict[str, Any]:
        def io_(args: Sequence[Any]) -> list[dict[str, Any]]:
            return [{"name": a.name, "datatype": V2_TYPES.get(_dtype_name(a.type) or "", a.type),
                     "shape": [n if isinstance(n, int) else -1 for n in a.shape]} for a in args]

        return {"name": self.name, "versions": ["1"], "platform": "onnxruntime_onnx",
                "inputs": io_(self.session.get_inputs()), "outputs": io_(self.session.get_outputs())}

    def feeds(self, body: Any) -> dict[str, np.ndarray]:
        """The request's ``inputs`` as arrays of the model's input types."""
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), dict):
            raise BadRequest('the body must be {"inputs": {"<input name>": <nested list>, ...}}')
        given = body["inputs"]
        self._exactly(given)
        return {name: self._array(name, value) for name, value in given.items()}

    def v2_feeds(self, body: Any) -> dict[str, np.ndarray]:
        """A KServe v2 request's ``inputs`` (name, shape, datatype, data) as arrays."""
        items = body.get("inputs") if isinstance(body, dict) else None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise BadRequest('the body must be {"inputs": [{"name", "shape", "datatype", "data"}, ...]}')
        given = {i.get("name"): i for i in items}
        self._exactly(given)
        feeds = {}
        for name, item in given.items():
            expected = V2_TYPES.get(_dtype_name(self.inputs[name].type) or "")
            if item.get("datatype") != expected:
                raise BadRequest(f"input {name!r} has datatype {expected}, got {item.get('datatype')!r}")
            shape = item.get("shape")
            if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
                raise BadRequest(f"input {name!r}: shape must be a list of sizes, got {shape!r}")
            array = self._array(name, item.get("data")).reshape(-1)
            if array.size != math.prod(shape):
                raise BadRequest(f"input {name!r}: {array.size} values for shape {shape}")
            feeds[name] = array.reshape(shape)
        return feeds

    def binary_feeds(self, array: np.ndarray, headers: Headers) -> dict[str, np.ndarray]:
        """One binary tensor as the feed of ``X-Input`` (or of the model's only input)."""
        name = _one(headers, "x-input")
        if name is None:
            if len(self.inputs) != 1:
                raise BadRequest(f"the model has inputs {sorted(self.inputs)}: name one with X-Input "
                                 "(a binary body carries one tensor)")
            (name,) = self.inputs
        if set(self.inputs) != {name}:
            raise BadRequest(f"a binary body feeds one input; the model needs exactly {sorted(self.inputs)}")
        wanted = _dtype_name(self.inputs[name].type)
        if array.dtype.name != wanted:
            raise BadRequest(f"input {name!r} is {wanted}; the body is {array.dtype.name} (send {wanted})")
        return {name: array}

    def _exactly(self, given: Mapping[Any, Any]) -> None:
        if set(given) != set(self.inputs):
            raise BadRequest(f"inputs must be exactly {sorted(self.inputs)}, got {sorted(map(str, given))}")

    def _array(self, name: str, value: Any) -> np.ndarray:
        dtype = ELEMENT_TYPES.get(self.inputs[name].type)
        if dtype is None:
            raise BadRequest(f"input {name!r} has type {self.inputs[name].type}, which JSON cannot carry")
        try:
            return np.asarray(value, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"input {name!r} is not a rectangular array of numbers: {exc}") from None

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(None, dict(feeds))
        except Exception as exc:  # ORT reports shape and type mismatches as its own exceptions
            raise BadRequest(f"the model refused the inputs: {exc}") from None

    def predict(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        return {"outputs": {n: r.tolist() for n, r in zip(self.output_names, self.run(feeds))}}

    def v2_infer(self, feeds: Mapping[str, np.ndarray], request_id: Any = None) -> dict[str, Any]:
        outputs = [{"name": n, "datatype": V2_TYPES.get(r.dtype.name, r.dtype.name), "shape": list(r.shape),
                    "data": r.reshape(-1).tolist()} for n, r in zip(self.output_names, self.run(feeds))]
        answer = {"model_name": self.name, "model_version": "1", "outputs": outputs}
        return answer if request_id is None else {"id": request_id, **answer}


def _dtype_name(ort_type: str) -> str | None:
    dtype = ELEMENT_TYPES.get(ort_type)
    return None if dtype is None else np.dtype(dtype).name


def session_options(intra_op_threads: int | None) -> Any:
    """ORT session options with ``intra_op_threads`` per run (None: ORT's default, all cores)."""
    options = need_module("onnxruntime", "an ONNX Runtime session", "onnx").SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
    return options


# --- accounting ------------------------------------------------------------------------
class Load:
    """What the service holds now and the most it has held (``peak``): open connections,
    admitted predictions, their declared body bytes, and ``session.run`` calls under way.
    Admission reads these before a body is read; tests and ``/health`` read them too."""

    NAMES = ("connections", "requests", "body_bytes", "running")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = dict.fromkeys(self.NAMES, 0)
        self.peak = dict.fromkeys(self.NAMES, 0)

    def add(self, **amounts: int) -> None:
        """Take (> 0) or give back (< 0) amounts by name, at once."""
        with self._lock:
            now, peak = self.now, self.peak
            for name, amount in amounts.items():
                now[name] += amount
                if now[name] > peak[name]:
                    peak[name] = now[name]

    @contextlib.contextmanager
    def holding(self, name: str, amount: int = 1) -> Iterator[None]:
        self.add(**{name: amount})
        try:
            yield
        finally:
            self.add(**{name: -amount})

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self.now, "peak": dict(self.peak)}


# --- HTTP/1.1 over an asyncio protocol -----------------------------------------------------
Headers = Mapping[str, list]
_DIGITS = re.compile(r"[0-9]{1,18}")


def reply(status: HTTPStatus, payload: Mapping[str, Any] | bytes, close: bool = False,
          extra: Sequence[str] = ()) -> bytes:
    """A complete HTTP/1.1 response with a JSON body."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
    tail = "".join(f"{line}\r\n" for line in extra) + ("Connection: close\r\n" if close else "")
    return b"%s%d\r\n%s\r\n%s" % (_STATUS_LINES[status], len(body), tail.encode("latin-1"), body)


#: Each status's first response lines, up to the Content-Length value.
_STATUS_LINES = {s: f"HTTP/1.1 {s.value} {s.phrase}\r\nContent-Type: application/json\r\nContent-Length: ".encode()
                 for s in HTTPStatus}


def parse_head(head: bytes) -> tuple[str, str, Headers]:
    """(method, target, headers by lower-case name) of a request head, or Refusal(400)."""
    request_line, *lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise Refusal(HTTPStatus.BAD_REQUEST, f"not an HTTP/1.x request line: {request_line[:80]!r}")
    headers: dict[str, list] = {"_version": [parts[2]]}
    for line in filter(None, lines):
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise Refusal(HTTPStatus.BAD_REQUEST, f"not a header line: {line[:80]!r}")
        headers.setdefault(name.lower(), []).append(value.strip())
    return parts[0], parts[1], headers


def keeps_alive(headers: Headers) -> bool:
    """HTTP/1.1 without ``Connection: close`` (HTTP/1.0 connections are closed after one)."""
    tokens = {t.strip().lower() for v in headers.get("connection", []) for t in v.split(",")}
    return headers["_version"] == ["HTTP/1.1"] and "close" not in tokens


def has_body(headers: Headers) -> bool:
    return "transfer-encoding" in headers or any(v != "0" for v in headers.get("content-length", []))


def content_length(headers: Headers) -> int:
    """The declared body size; 411 without one (chunked bodies included), 400 if malformed."""
    if "transfer-encoding" in headers:
        raise Refusal(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length "
                                                  "(Transfer-Encoding is not accepted)")
    values = headers.get("content-length")
    if not values:
        raise Refusal(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
    if len(set(values)) != 1 or not _DIGITS.fullmatch(values[0]):
        raise Refusal(HTTPStatus.BAD_REQUEST, f"Content-Length must be one decimal number, got {values}")
    return int(values[0])


class Workers:
    """``count`` threads running, in order, what :meth:`submit` queues: a thread pool without
    futures (:meth:`Service._work` sends its answer back to the loop itself, by one
    ``call_soon_threadsafe``: no concurrent future chained to an asyncio one)."""

    def __init__(self, count: int, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}_{i}", daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, work: Callable[..., None], *args: Any) -> None:
        self._queue.put((work, args))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                item[0](*item[1])
            except Exception:  # noqa: BLE001 - a worker outlives any one job (each answers its own failures)
                traceback.print_exc()

    def shutdown(self) -> None:
        """Run what is queued, then stop the threads."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()


class Service:
    """The model served over HTTP on an asyncio loop of its own thread; see :func:`start_service`."""

    def __init__(self, model: Model, settings: Settings) -> None:
        self.model, self.settings, self.load = model, settings, Load()
        self.pool = Workers(settings.workers, "kernelpack-predict")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kernelpack-http", daemon=True)
        self.host, self.port = "", 0
        self.draining = False
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[Connection] = set()
        self.scratch = memoryview(bytearray(1 << 16))  # the loop's read buffer (Connection.get_buffer)
        v2 = f"/v2/models/{model.name}"
        self._gets: dict[str, Callable[[], Mapping[str, Any]]] = {
            "/health": lambda: {**self.model.describe(), "load": self.load.snapshot()},
            "/metadata": self.model.metadata, "/v2/health/live": lambda: {"live": True},
            "/v2/health/ready": lambda: {"ready": True}, f"{v2}/ready": lambda: {"ready": True},
            v2: self.model.v2_metadata, f"{v2}/versions/1": self.model.v2_metadata}
        self._posts = {"/predict": self._predict_answer, f"{v2}/infer": self._infer_answer,
                       f"{v2}/versions/1/infer": self._infer_answer}

    def bind(self, host: str, port: int) -> None:
        """Start the loop and listen; returns once connections are accepted."""
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(host, port), self.loop).result()

    async def _listen(self, host: str, port: int) -> None:
        self._server = await self.loop.create_server(lambda: Connection(self), host, port, backlog=1024)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]

    def shutdown(self) -> None:
        """Graceful stop: no new connections, idle ones closed, requests under way answered
        (for at most ``transfer_timeout``), then :meth:`close`."""
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._drain(), self.loop).result()
        self.close()

    async def _drain(self) -> None:
        self.draining = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            if connection.state == "idle":
                connection.transport.close()
        if self._connections:
            await asyncio.wait([c.closed for c in self._connections], timeout=self.settings.transfer_timeout)

    def close(self) -> None:
        """Stop listening, drop every connection, wait for runs under way, stop the loop."""
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=60)
        if not self.thread.is_alive():
            self.loop.close()
        self.pool.shutdown()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.transport.abort()
        if self._connections:
            await asyncio.wait([c.closed for c in self._connections], timeout=60)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _admit(self, length: int) -> None:
        """Refuse, before the body is read, what the service cannot hold."""
        s, now = self.settings, self.load.now
        if length > s.max_body_bytes:
            raise Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          f"the body declares {length} bytes; at most {s.max_body_bytes} are accepted")
        if now["requests"] >= s.max_requests:
            raise Refusal(HTTPStatus.SERVICE_UNAVAILABLE, f"{s.max_requests} predictions are under way; try again")
        if now["body_bytes"] + length > s.max_inflight_bytes:
            raise Refusal(HTTPStatus.SERVICE_UNAVAILABLE,
                          f"{now['body_bytes']} of {s.max_inflight_bytes} body bytes are in flight, "
                          f"no room for {length}; try again")

    def _work(self, connection: Connection, answer: Callable[[bytearray, Headers], Mapping[str, Any]],
              body: bytearray, headers: Headers) -> None:
        """On a worker thread: the answer, then back to the loop to send it (no future chain)."""
        status, payload = self._answer(answer, body, headers)
        try:
            self.loop.call_soon_threadsafe(connection.answered, status, payload)
        except RuntimeError:  # the loop is closed (Service.close): nobody is waiting
            pass

    def _answer(self, answer: Callable[[bytearray, Headers], Mapping[str, Any]], body: bytearray,
                headers: Headers) -> tuple[HTTPStatus, bytes]:
        """On a worker thread: parse, convert, run; every failure an answer, never a dropped
        connection (a bug is a 500 that names it)."""
        try:
            return HTTPStatus.OK, json.dumps(answer(body, headers)).encode("utf-8")
        except BadRequest as exc:
            return HTTPStatus.BAD_REQUEST, json.dumps({"error": str(exc)}).encode("utf-8")
        except Exception as exc:  # noqa: BLE001 - reported to the client, the service stays up
            return HTTPStatus.INTERNAL_SERVER_ERROR, json.dumps(
                {"error": f"internal error: {type(exc).__name__}: {exc}"}).encode("utf-8")

    def _running(self, feeds: Mapping[str, np.ndarray], run: Callable[..., Any], *extra: Any) -> Any:
        with self.load.holding("running"):
            return run(feeds, *extra)

    def _predict_answer(self, body: bytearray, headers: Headers) -> Mapping[str, Any]:
        """POST /predict: JSON, or one .npy or raw tensor (by Content-Type)."""
        kind = (_one(headers, "content-type") or "application/json").partition(";")[0].strip().lower()
        if kind == "application/x-npy":
            feeds = self.model.binary_feeds(parse_npy(body), headers)
        elif kind == "application/octet-stream":
            feeds = self.model.binary_feeds(parse_raw(body, headers), headers)
        elif kind == "application/json":
            feeds = self.model.feeds(parse_json(body, self.settings))
        else:
            raise BadRequest(f"Content-Type {kind!r} is not application/json, application/x-npy or "
                             "application/octet-stream")
        return self._running(feeds, self.model.predict)

    def _infer_answer(self, body: bytearray, headers: Headers) -> Mapping[str, Any]:
        """POST /v2/models/NAME/infer: KServe v2 JSON."""
        request = parse_json(body, self.settings)
        feeds = self.model.v2_feeds(request)
        return self._running(feeds, self.model.v2_infer, request.get("id"))


class Connection(asyncio.BufferedProtocol):
    """One client connection, a state machine driven by the loop's callbacks (no task, no
    stream buffers, no ``wait_for`` per read: next to the PP-OCR classifier's 1 ms run on a
    2-core VM, asyncio streams and a ThreadPoolExecutor future cost some 380 us of CPU a
    request, this some 140 us; benchmarks/README.md, serve_load.py). ``state``:

    ``idle``: waiting for a request's first byte (``idle_timeout``, then closed silently);
    ``head``: the rest of the head (``header_timeout``, then 408; 431 beyond
    ``max_header_bytes``); ``body``: the declared bytes, into a buffer of that size
    (``transfer_timeout``, then 408); ``running``: on a worker, reading paused;
    ``sending``: the answer written, waiting for the socket to take it all
    (``transfer_timeout``, then dropped), then ``idle`` again or closed. One request at a
    time: bytes after it (pipelining) wait in ``pending`` with reading paused."""

    def __init__(self, service: Service) -> None:
        self.service, self.settings = service, service.settings
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.closed = service.loop.create_future()  # done at connection_lost
        self.state = "idle"
        self.pending = bytearray()  # received, not yet part of a request's head or body
        self.scanned = 0  # bytes of pending searched for the head's end
        self.body, self.got = bytearray(), 0
        self.headers: Headers = {}
        self.keep = False
        self.held = 0  # body bytes (and one request) this connection holds in the Load, 0 if none
        self.counted = False
        self.answer: Callable[[bytearray, Headers], Mapping[str, Any]] | None = None
        self.then: Callable[[], None] | None = None  # what follows once the answer is sent
        self.timer: asyncio.TimerHandle | None = None
        self.expiry: tuple[float, Callable[..., None], tuple] | None = None  # see _deadline

    # --- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=0)  # pause_writing whenever an answer is not taken at once
        service = self.service
        service._connections.add(self)
        if service.load.now["connections"] >= self.settings.max_connections:
            self.state = "sending"
            self._send(reply(HTTPStatus.SERVICE_UNAVAILABLE, {
                "error": f"{self.settings.max_connections} connections are open; try again"},
                close=True, extra=["Retry-After: 1"]), self.transport.close)
            return
        service.load.add(connections=1)
        self.counted = True
        self._deadline(self.settings.idle_timeout, self.transport.close)

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the socket's next bytes go: a body straight into its buffer (no bytes object
        per read, no copy), anything else through the loop's one scratch buffer."""
        if self.state == "body":
            return memoryview(self.body)[self.got:]
        return self.service.scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self.state == "body":
            self.got += nbytes
            self._body_bytes(b"")
        else:
            self.data_received(self.service.scratch[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.state == "body":
            self._body_bytes(data)
        else:
            self.pending += data
            if self.state == "idle":
                self.state = "head"
                self._head()
                if self.state == "head":  # the rest of the head within header_timeout of its first byte
                    self._deadline(self.settings.header_timeout, self._refuse, HTTPStatus.REQUEST_TIMEOUT,
                                   f"the request head did not arrive within {self.settings.header_timeout} s")
            elif self.state == "head":
                self._head()
            elif len(self.pending) > self.settings.max_header_bytes:
                self.transport.pause_reading()  # pipelined bytes: wait for this answer first

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline(None)
        if self.timer is not None:
            self.timer.cancel()
        if self.state != "running":  # a run under way gives its hold back when it ends
            self._release()
        if self.counted:
            self.service.load.add(connections=-1)
        self.service._connections.discard(self)
        self.closed.set_result(None)

    def resume_writing(self) -> None:
        if self.then is not None:
            self._deadline(None)
            then, self.then = self.then, None
            then()

    # --- the request
    def _deadline(self, seconds: float | None, callback: Callable[..., None] | None = None, *args: Any) -> None:
        """Call ``callback(*args)`` in ``seconds`` unless another deadline replaces this one
        first (None: no deadline). Lazily: a request sets three or four deadlines, and the
        one timer of the connection moves only when the new deadline is earlier than it; a
        timer that fires early finds the deadline of the moment and waits for that."""
        if seconds is None:
            self.expiry = None
            return
        loop = self.service.loop
        self.expiry = (loop.time() + seconds, callback, args)
        if self.timer is None or self.timer.when() > self.expiry[0]:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = loop.call_at(self.expiry[0], self._expired)

    def _expired(self) -> None:
        self.timer = None
        if self.expiry is not None:
            when, callback, args = self.expiry
            if self.service.loop.time() >= when:
                self.expiry = None
                callback(*args)
            else:
                self.timer = self.service.loop.call_at(when, self._expired)

    def _next(self) -> None:
        """After an answer: close, or wait for the next request (or start on bytes already here)."""
        self._release()
        if not self.keep or self.service.draining:
            self.transport.close()
            return
        self.state = "idle"
        self._deadline(self.settings.idle_timeout, self.transport.close)
        self.transport.resume_reading()
        if self.pending:  # (from the loop, not from here: no recursion over pipelined requests)
            self.service.loop.call_soon(self._pipelined)

    def _pipelined(self) -> None:
        if self.state == "idle" and self.pending and not self.transport.is_closing():
            self.data_received(b"")

    def _head(self) -> None:
        limit = self.settings.max_header_bytes
        end = self.pending.find(b"\r\n\r\n", max(0, self.scanned - 3), limit + 4)
        if end < 0:
            self.scanned = len(self.pending)  # (a head trickled in is not scanned again from its start)
            if len(self.pending) >= limit + 4:
                self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"the request head exceeds {limit} bytes")
            return
        self.scanned = 0
        head = bytes(self.pending[:end + 4])
        del self.pending[:end + 4]
        self._deadline(None)
        try:
            self._request(head)
        except Refusal as refusal:
            self._refuse(refusal.status, str(refusal))

    def _request(self, head: bytes) -> None:
        service = self.service
        method, target, headers = parse_head(head)
        path = target.partition("?")[0]
        answer = service._posts.get(path) if method == "POST" else None
        self.keep = keeps_alive(headers) and not service.draining and (answer is not None or not has_body(headers))
        if answer is None:
            self.state = "sending"
            if method == "GET" and path in service._gets:
                self._send(reply(HTTPStatus.OK, service._gets[path](), not self.keep), self._next)
            else:
                self._send(reply(HTTPStatus.NOT_FOUND, {
                    "error": f"{method} {path[:80]} is not served: GET {', '.join(service._gets)}; "
                             f"POST {', '.join(service._posts)}"}, not self.keep), self._next)
            return
        length = content_length(headers)
        service._admit(length)  # and then hold the slot and the bytes until the answer is sent
        service.load.add(requests=1, body_bytes=length)
        self.held = length or -1  # (-1: a request of no bytes)
        if "100-continue" in (v.lower() for v in headers.get("expect", [])):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.state, self.answer, self.headers = "body", answer, headers
        self.body, self.got = bytearray(length), 0
        rest, self.pending = self.pending, bytearray()
        self._body_bytes(rest)
        if self.state == "body":  # the rest of the body within transfer_timeout from now
            self._deadline(self.settings.transfer_timeout, self._refuse, HTTPStatus.REQUEST_TIMEOUT,
                           f"the body did not arrive within {self.settings.transfer_timeout} s")

    def _body_bytes(self, data: bytes | bytearray | memoryview) -> None:
        take = min(len(data), len(self.body) - self.got)
        self.body[self.got:self.got + take] = data[:take] if take < len(data) else data
        self.got += take
        if take < len(data):
            self.pending += data[take:]
        if self.got < len(self.body):
            return
        self._deadline(None)
        self.state = "running"
        self.service.pool.submit(self.service._work, self, self.answer, self.body, self.headers)
        self.body, self.headers = bytearray(), {}

    def answered(self, status: HTTPStatus, payload: bytes) -> None:
        """On the loop, from the worker: send the answer (or let go, if the client has)."""
        if self.transport.is_closing():
            self._release()
            return
        self.state = "sending"
        self.keep = self.keep and not self.service.draining
        self._send(reply(status, payload, not self.keep), self._next)

    def _refuse(self, status: HTTPStatus, message: str) -> None:
        """Answer ``status`` and close (the body, if any, is not read)."""
        self.state, self.keep = "sending", False
        self.transport.pause_reading()
        extra = ["Retry-After: 1"] if status == HTTPStatus.SERVICE_UNAVAILABLE else []
        self._send(reply(status, {"error": message}, True, extra), self._next)

    def _send(self, data: bytes, then: Callable[[], None]) -> None:
        """Write ``data``; ``then()`` once the socket has taken it, within ``transfer_timeout``
        (else the connection is dropped)."""
        self.transport.write(data)
        if self.transport.get_write_buffer_size():
            self.then = then
            self._deadline(self.settings.transfer_timeout, self.transport.abort)
        else:
            then()

    def _release(self) -> None:
        if self.held:
            self.service.load.add(requests=-1, body_bytes=-max(self.held, 0))
            self.held = 0


def start_service(container: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
                  limits: Limits = SERVICE_LIMITS, settings: Settings | None = None,
                  providers: Sequence[Any] | None = None, name: str | None = None) -> Service:
    """Load ``container`` under ``limits`` (a refused one raises ``KernelpackError``; nothing
    is bound), then serve it on ``host:port`` (``port=0`` picks a free one: ``service.port``)
    from a background thread until ``service.shutdown()`` / ``close()`` (or a ``with`` block's end)."""
    settings = settings or Settings()
    model = Model(os.fspath(container), providers, limits, settings.intra_op_threads, name)
    service = Service(model, settings)
    try:
        service.bind(host, port)
    except BaseException:
        service.close()
        raise
    return service


# --- command line (kernelpack serve) -----------------------------------------------------
def assignments(pairs: Sequence[str], kind: type, what: str) -> dict[str, Any]:
    """``NAME=VALUE`` arguments for the fields of dataclass ``kind``, values as numbers."""
    names = {f.name for f in dataclasses.fields(kind)}
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in names:
            raise KernelpackError(f"{what} {name!r} is not one of {sorted(names)}")
        try:
            out[name] = int(value) if _DIGITS.fullmatch(value) else float(value)
        except ValueError:
            raise KernelpackError(f"{what} {name}={value!r} is not a number") from None
    return out


def allow_open_files(count: int) -> None:
    """Raise this process's open-file limit towards ``count`` (each connection is a socket)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count if hard == resource.RLIM_INFINITY else min(count, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def service_settings(threads: int | None, pairs: Sequence[str]) -> Settings:
    """Settings from ``--threads`` and ``--set``: workers default to ``min(4, threads)``."""
    given = assignments(pairs, Settings, "--set")
    if threads is not None:
        given["threads"] = threads
    given.setdefault("workers", max(1, min(Settings.workers, given.get("threads", Settings.threads))))
    try:
        return Settings(**given)
    except ValueError as exc:
        raise KernelpackError(str(exc)) from None


def serve(container: str, host: str, port: int, device: str = "auto", threads: int | None = None,
          name: str | None = None, limit: Sequence[str] = (), settings: Sequence[str] = ()) -> int:
    """``kernelpack serve``: start, print one line naming the address and provider, serve until
    SIGTERM/SIGINT, then stop gracefully (:meth:`Service.shutdown`) and return 0."""
    limits = dataclasses.replace(SERVICE_LIMITS, **assignments(limit, Limits, "--limit"))
    chosen = service_settings(threads, settings)
    allow_open_files(chosen.max_connections + 256)
    try:
        service = start_service(container, host, port, limits, chosen, DEVICES[device], name)
    except OSError as exc:  # the address is taken or cannot be bound
        raise KernelpackError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    provider = service.model.session.get_providers()[0]
    if device == "cuda" and provider != "CUDAExecutionProvider":
        service.close()
        raise KernelpackError(f"--device cuda: onnxruntime runs this model on {provider}, not CUDA "
                              "(no usable GPU, or its CUDA libraries are missing)", path=container)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving {container} as {service.model.name!r} on http://{service.host}:{service.port} with "
          f"{provider}, {chosen.workers} workers x {chosen.intra_op_threads} threads, "
          f"ready in {service.model.load_seconds:.2f} s", flush=True)
    while not stop.wait(0.5):
        pass
    service.shutdown()
    print("kernelpack serve: stopped", file=sys.stderr, flush=True)
    return 0
