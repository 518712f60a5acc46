"""A minimal HTTP inference service: loads a container at start, serves predictions as JSON.

    python serving/http_service.py model.kpk [--host 127.0.0.1] [--port 8000] [--cpu]

The container must carry its ONNX graph (``kernelpack pack model.onnx``, or a PyTorch model
saved with ``kernelpack.onnx_io.torch_graph``). At start the weights are decoded once (numpy)
and handed to an ONNX Runtime session in memory (CUDA if usable, else CPU); no dense
weights are written anywhere, and torch is not needed.

    GET  /health   -> {"status": "ready", "providers": [...], "load_seconds": ...,
                       "inputs": [{"name", "type", "shape"}], "outputs": [...]}
    POST /predict  {"inputs": {"x": [[...]]}}  -> {"outputs": {"name": [[...]]}}

Inputs are nested lists (or numbers) converted to each input's element type; a body
that is not that is answered 400 with {"error": "..."}. Standard library only (http.server,
one thread per request; ORT sessions are thread-safe).
"""

from __future__ import annotations

import argparse
import json
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping, Sequence

import numpy as np

import kernelpack

#: ONNX Runtime type strings -> numpy dtypes accepted in requests.
ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                 "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
                 "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}
MAX_BODY = 64 << 20


class BadRequest(ValueError):
    """A request the model cannot answer; its message goes back to the client."""


class Model:
    """An ORT session built from a container, with request conversion around ``run``."""

    def __init__(self, path: str, providers: Sequence[str] | None = None) -> None:
        start = time.perf_counter()
        self.session = kernelpack.ort_session(path, providers)
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


def handler_for(model: Model) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``model``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path != "/health":
                return self.reply(HTTPStatus.NOT_FOUND, {"error": "GET /health or POST /predict"})
            self.reply(HTTPStatus.OK, model.describe())

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/predict":
                return self.reply(HTTPStatus.NOT_FOUND, {"error": "GET /health or POST /predict"})
            length = self.headers.get("Content-Length", "")
            length = int(length) if length.isdigit() else -1
            if not 0 <= length <= MAX_BODY:
                return self.reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > MAX_BODY
                                  else HTTPStatus.LENGTH_REQUIRED,
                                  {"error": f"send a Content-Length of at most {MAX_BODY} bytes"})
            try:
                body = json.loads(self.rfile.read(length))
                self.reply(HTTPStatus.OK, model.predict(model.feeds(body)))
            except (BadRequest, ValueError) as exc:  # json.JSONDecodeError is a ValueError
                self.reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)})

        def reply(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
            pass

    return Handler


def make_server(path: str, host: str = "127.0.0.1", port: int = 8000,
                providers: Sequence[str] | None = None) -> ThreadingHTTPServer:
    """Load the container (decode once, build the session), then bind; ``port=0`` picks a free port."""
    model = Model(path, providers)
    server = ThreadingHTTPServer((host, port), handler_for(model))
    server.daemon_threads = True
    server.model = model  # type: ignore[attr-defined]
    return server


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a kernelpack container with ONNX Runtime over HTTP.")
    parser.add_argument("container", help="a .kpk file carrying its ONNX graph")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--cpu", action="store_true", help="CPU only (default: CUDA if usable, else CPU)")
    args = parser.parse_args(argv)
    server = make_server(args.container, args.host, args.port, ["CPUExecutionProvider"] if args.cpu else None)
    host, port = server.server_address[:2]
    print(f"serving {args.container} on http://{host}:{port} with {server.model.session.get_providers()[0]}, "
          f"ready in {server.model.load_seconds:.2f} s", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
