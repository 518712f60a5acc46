"""An HTTP inference service: loads a container at start, serves predictions as JSON, and
bounds what any client, or all clients together, can make it hold.

    python serving/http_service.py model.kpk [--host 127.0.0.1] [--port 8000] [--cpu]
                                   [--limit NAME=VALUE]... [--set NAME=VALUE]...

The container must carry its ONNX graph (``kernelpack pack model.onnx``, or a PyTorch model
saved with ``kernelpack.onnx_io.torch_graph``). At start the weights are decoded once (numpy)
under :data:`SERVICE_LIMITS` (``--limit`` sets any field of ``kernelpack.Limits``) and handed
to an ONNX Runtime session in memory (CUDA if usable, else CPU); no dense weights are
written anywhere, and torch is not needed. A container the reader refuses stops the start
with one line, ``http_service: error: ...``, and exit status 2.

    GET  /health   -> {"status": "ready", "providers": [...], "load_seconds": ...,
                       "inputs": [{"name", "type", "shape"}], "outputs": [...],
                       "load": {"connections", "requests", "body_bytes", "running", "peak": {...}}}
    POST /predict  {"inputs": {"x": [[...]]}}  -> {"outputs": {"name": [[...]]}}

Inputs are nested lists (or numbers) converted to each input's element type; a body that
is not that is answered 400 with ``{"error": "..."}``, like every refusal below.

**Bounds** (:class:`Settings`, ``--set NAME=VALUE``). Each connection has deadlines: the
first byte of a request within ``idle_timeout`` (else it is closed: idle keep-alive and
never-speaking sockets), the rest of the head within ``header_timeout`` and the body
within ``transfer_timeout`` (else 408 and close: slowloris), the response sent within
``transfer_timeout``. Beyond ``max_connections`` open connections a new one gets 503 and
is closed. A ``POST /predict`` must declare ``Content-Length`` (411 otherwise, chunked
bodies included) and is refused before a byte of its body is read: 413 beyond
``max_body_bytes``; 503 when ``max_requests`` predictions are already admitted, or when
its body would take the bodies admitted and not yet answered beyond ``max_inflight_bytes``.
(Parsing makes a body's JSON into Python lists: a peak of 2.6 times its bytes for
float32 values as ``json.dumps`` writes them, 7.5 times for short numbers such as ``0.5``,
measured by benchmarks/serving_load.py; so requests in flight hold at most about 10 times
``max_inflight_bytes``, 640 MiB by default.) The body's nesting depth and number of values are counted from
its bytes (:func:`json_extent`, vectorised, no recursion) before ``json.loads`` sees it:
400 beyond ``max_json_depth`` or ``max_json_values``. ``GET /health`` needs no slot: it
answers from the event loop while predictions are full.

**Parallel inference.** ``InferenceSession.run`` is thread-safe, so admitted requests are
parsed and run on a pool of ``workers`` threads (the pool is the semaphore on concurrent
runs); each run gets ``cores // workers`` intra-op threads, so that concurrent runs do not
oversubscribe the CPU.

**Why the standard library (asyncio) and not uvicorn/starlette.** Connections are served by
``asyncio`` streams (an idle connection costs a socket and a small task, no thread), the
work by a bounded thread pool. uvicorn 0.54, the ASGI server of choice, was checked for
these bounds and misses two of them: its keep-alive timer starts only after a first
response, so a socket that never sends, or sends its head a byte at a time, is never
closed; and its ``limit_concurrency`` counts open connections, so 1000 idle sockets make
it answer ``/health`` with 503. Body size, bytes in flight and the JSON depth would be our
code under either. What remains of HTTP/1.1 here is a request line, header lines and a
``Content-Length`` body (no chunked bodies, no pipelining beyond one request at a time):
some 60 lines, with no dependency beyond the package's own. The module imports only the
standard library, numpy and kernelpack, so it can move into the package as is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

import kernelpack
from kernelpack.errors import need_module

#: ONNX Runtime type strings -> numpy dtypes accepted in requests.
ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                 "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
                 "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}

#: The reader's limits for a service's container (a file it did not make, decoded once at
#: start): a quarter GiB per array, 2 GiB for the whole load and 2**35 operations (some 15 s
#: of decoding on one core) are more than a served CNN needs and less than a hostile file asks.
SERVICE_LIMITS = kernelpack.Limits(max_decoded_bytes=256 << 20, max_total_bytes=2 << 30, max_work=1 << 35)


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Settings:
    """What one client, and all clients together, may make the service hold (see the module
    docstring for what each refusal answers). Times in seconds, sizes in bytes."""

    workers: int = max(1, min(4, cores()))
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
        """ORT threads per run: the cores shared by the runs that may go at once."""
        return max(1, cores() // self.workers)


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


# --- the model -------------------------------------------------------------------------
class Model:
    """An ORT session built from a container, with request conversion around ``run``."""

    def __init__(self, path: str, providers: Sequence[str] | None = None,
                 limits: kernelpack.Limits = SERVICE_LIMITS, intra_op_threads: int | None = None) -> None:
        start = time.perf_counter()
        self.session = kernelpack.ort_session(path, providers, session_options(intra_op_threads), limits)
        self.load_seconds = time.perf_counter() - start
        self.inputs = {i.name: i for i in self.session.get_inputs()}

    def describe(self) -> dict[str, Any]:
        def io(args: Sequence[Any]) -> list[dict[str, Any]]:
            return [{"name": a.name, "type": a.type, "shape": a.shape} for a in args]

        return {"status": "ready", "providers": self.session.get_providers(),
                "load_seconds": self.load_seconds, "inputs": io(self.session.get_inputs()),
                "outputs": io(self.session.get_outputs())}

    def feeds(self, body: Any) -> dict[str, np.ndarray]:
        """The request's ``inputs`` as arrays of the model's input types."""
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), dict):
            raise BadRequest('the body must be {"inputs": {"<input name>": <nested list>, ...}}')
        given = body["inputs"]
        if set(given) != set(self.inputs):
            raise BadRequest(f"inputs must be exactly {sorted(self.inputs)}, got {sorted(given)}")
        return {name: self._array(name, value) for name, value in given.items()}

    def _array(self, name: str, value: Any) -> np.ndarray:
        dtype = ELEMENT_TYPES.get(self.inputs[name].type)
        if dtype is None:
            raise BadRequest(f"input {name!r} has type {self.inputs[name].type}, which JSON cannot carry")
        try:
            return np.asarray(value, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"input {name!r} is not a rectangular array of numbers: {exc}") from None

    def predict(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        try:
            results = self.session.run(None, dict(feeds))
        except Exception as exc:  # ORT reports shape and type mismatches as its own exceptions
            raise BadRequest(f"the model refused the inputs: {exc}") from None
        names = [o.name for o in self.session.get_outputs()]
        return {"outputs": {n: r.tolist() for n, r in zip(names, results)}}


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

    @contextlib.contextmanager
    def holding(self, name: str, amount: int = 1) -> Iterator[None]:
        with self._lock:
            self.now[name] += amount
            self.peak[name] = max(self.peak[name], self.now[name])
        try:
            yield
        finally:
            with self._lock:
                self.now[name] -= amount

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self.now, "peak": dict(self.peak)}


# --- HTTP/1.1 over asyncio streams -------------------------------------------------------
Headers = Mapping[str, list]
_DIGITS = re.compile(r"[0-9]{1,18}")


def reply(status: HTTPStatus, payload: Mapping[str, Any] | bytes, close: bool = False,
          extra: Sequence[str] = ()) -> bytes:
    """A complete HTTP/1.1 response with a JSON body."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
    lines = [f"HTTP/1.1 {status.value} {status.phrase}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *extra] + (["Connection: close"] if close else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


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


class Service:
    """The model served over HTTP on an asyncio loop of its own thread; see :func:`start_service`."""

    def __init__(self, model: Model, settings: Settings) -> None:
        self.model, self.settings, self.load = model, settings, Load()
        self.pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="kernelpack-predict")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kernelpack-http", daemon=True)
        self.host, self.port = "", 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    def bind(self, host: str, port: int) -> None:
        """Start the loop and listen; returns once connections are accepted."""
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(host, port), self.loop).result()

    async def _listen(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._connection, host, port, backlog=1024,
                                                  limit=self.settings.max_header_bytes)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]

    def close(self) -> None:
        """Stop listening, drop every connection, wait for runs under way, stop the loop."""
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=60)
        if not self.thread.is_alive():
            self.loop.close()
        self.pool.shutdown(wait=True)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            if self.load.now["connections"] >= self.settings.max_connections:
                await self._send(writer, reply(HTTPStatus.SERVICE_UNAVAILABLE, {
                    "error": f"{self.settings.max_connections} connections are open; try again"},
                    close=True, extra=["Retry-After: 1"]))
                return
            with self.load.holding("connections"):
                while await self._exchange(reader, writer):
                    pass
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or would not take the response
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; whether the connection stays open for another."""
        try:
            head = await self._read_head(reader)
            if head is None:
                return False
            method, target, headers = parse_head(head)
            keep = keeps_alive(headers) and not (target != "/predict" and has_body(headers))
            if (method, target) == ("GET", "/health"):
                payload: Mapping[str, Any] = {**self.model.describe(), "load": self.load.snapshot()}
                await self._send(writer, reply(HTTPStatus.OK, payload, not keep))
                return keep
            if (method, target) != ("POST", "/predict"):
                await self._send(writer, reply(HTTPStatus.NOT_FOUND, {"error": "GET /health or POST /predict"},
                                               not keep))
                return keep
            return await self._predict(reader, writer, headers, keep)
        except Refusal as refusal:
            extra = ["Retry-After: 1"] if refusal.status == HTTPStatus.SERVICE_UNAVAILABLE else []
            await self._send(writer, reply(refusal.status, {"error": str(refusal)}, True, extra))
            return False

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        """The request line and headers, or None when the client stays silent or leaves."""
        try:
            first = await asyncio.wait_for(reader.read(1), self.settings.idle_timeout)
        except asyncio.TimeoutError:
            return None
        if not first:
            return None
        try:
            return first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.settings.header_timeout)
        except asyncio.TimeoutError:
            raise Refusal(HTTPStatus.REQUEST_TIMEOUT,
                          f"the request head did not arrive within {self.settings.header_timeout} s") from None
        except asyncio.LimitOverrunError:
            raise Refusal(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                          f"the request head exceeds {self.settings.max_header_bytes} bytes") from None

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

    async def _predict(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       headers: Headers, keep: bool) -> bool:
        length = content_length(headers)
        self._admit(length)  # and then hold the slot and the bytes until the answer is sent
        with self.load.holding("requests"), self.load.holding("body_bytes", length):
            if "100-continue" in (v.lower() for v in headers.get("expect", [])):
                await self._send(writer, b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await self._read_body(reader, length)
            status, answer = await self.loop.run_in_executor(self.pool, self._answer, body)
            await self._send(writer, reply(status, answer, not keep))
        return keep

    async def _read_body(self, reader: asyncio.StreamReader, length: int) -> bytearray:
        body, got = bytearray(length), 0
        deadline = self.loop.time() + self.settings.transfer_timeout
        with memoryview(body) as view:
            while got < length:
                try:
                    chunk = await asyncio.wait_for(reader.read(min(length - got, 1 << 20)),
                                                   deadline - self.loop.time())
                except asyncio.TimeoutError:
                    raise Refusal(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within "
                                                              f"{self.settings.transfer_timeout} s") from None
                if not chunk:
                    raise asyncio.IncompleteReadError(bytes(view[:got]), length)
                view[got:got + len(chunk)] = chunk
                got += len(chunk)
        return body

    def _answer(self, body: bytearray) -> tuple[HTTPStatus, bytes]:
        """On a worker thread: parse, convert, run; every failure an answer, never a dropped
        connection (a bug is a 500 that names it)."""
        try:
            feeds = self.model.feeds(parse_json(body, self.settings))
            with self.load.holding("running"):
                result = self.model.predict(feeds)
            return HTTPStatus.OK, json.dumps(result).encode("utf-8")
        except BadRequest as exc:
            return HTTPStatus.BAD_REQUEST, json.dumps({"error": str(exc)}).encode("utf-8")
        except Exception as exc:  # noqa: BLE001 - reported to the client, the service stays up
            return HTTPStatus.INTERNAL_SERVER_ERROR, json.dumps(
                {"error": f"internal error: {type(exc).__name__}: {exc}"}).encode("utf-8")

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.settings.transfer_timeout)


def start_service(container: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
                  limits: kernelpack.Limits = SERVICE_LIMITS, settings: Settings | None = None,
                  providers: Sequence[str] | None = None) -> Service:
    """Load ``container`` under ``limits`` (a refused one raises ``KernelpackError``; nothing
    is bound), then serve it on ``host:port`` (``port=0`` picks a free one: ``service.port``)
    from a background thread until ``service.close()`` (or the end of a ``with`` block)."""
    settings = settings or Settings()
    model = Model(os.fspath(container), providers, limits, settings.intra_op_threads)
    service = Service(model, settings)
    try:
        service.bind(host, port)
    except BaseException:
        service.close()
        raise
    return service


# --- command line ----------------------------------------------------------------------
def assignments(pairs: Sequence[str], kind: type, what: str) -> dict[str, Any]:
    """``NAME=VALUE`` arguments for the fields of dataclass ``kind``, values as numbers."""
    names = {f.name for f in dataclasses.fields(kind)}
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in names:
            raise ValueError(f"{what} {name!r} is not one of {sorted(names)}")
        try:
            out[name] = int(value) if _DIGITS.fullmatch(value) else float(value)
        except ValueError:
            raise ValueError(f"{what} {name}={value!r} is not a number") from None
    return out


def allow_open_files(count: int) -> None:
    """Raise this process's open-file limit towards ``count`` (each connection is a socket)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count if hard == resource.RLIM_INFINITY else min(count, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a kernelpack container with ONNX Runtime over HTTP.")
    parser.add_argument("container", help="a .kpk file carrying its ONNX graph")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--cpu", action="store_true", help="CPU only (default: CUDA if usable, else CPU)")
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                        help="a kernelpack.Limits field for the container (default: SERVICE_LIMITS)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help=f"a Settings field: workers (default {Settings.workers}), timeouts, bounds")
    args = parser.parse_args(argv)
    try:
        limits = dataclasses.replace(SERVICE_LIMITS, **assignments(args.limit, kernelpack.Limits, "--limit"))
        settings = Settings(**assignments(args.set, Settings, "--set"))
        allow_open_files(settings.max_connections + 256)
        service = start_service(args.container, args.host, args.port, limits, settings,
                                ["CPUExecutionProvider"] if args.cpu else None)
    except (kernelpack.KernelpackError, OSError, ValueError) as exc:
        print(f"http_service: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"serving {args.container} on http://{service.host}:{service.port} with "
          f"{service.model.session.get_providers()[0]}, ready in {service.model.load_seconds:.2f} s", flush=True)
    try:
        service.thread.join()
    except KeyboardInterrupt:
        service.close()


if __name__ == "__main__":
    main()
