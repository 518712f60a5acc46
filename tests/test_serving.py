"""Serving: ``kernelpack serve`` (a real process, real requests on loopback: JSON, binary
tensors, KServe v2 paths, graceful shutdown; and the same service started in-process with tight
bounds to hold it against hostile clients) and the Triton Python-backend model written by
``kernelpack triton-config`` (run here against a faithful stand-in for triton_python_backend_utils;
tests/test_triton.py runs it in a real Triton server) load a container at start and answer
exactly what the ORT session answers."""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import io
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from ocr_inputs import CLS, cls_batch, ppocr_model

import kernelpack
from kernelpack import serve
from kernelpack.cli import main as cli
from kernelpack.ort import ort_session

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from kernelpack.onnx_io import pack_onnx  # noqa: E402
from kernelpack.triton_backend import MODEL_PY, write_model_dir  # noqa: E402

CPU = ["CPUExecutionProvider"]
OUT = "save_infer_model/scale_0.tmp_1"
SERVE = [sys.executable, "-m", "kernelpack", "serve"]


@pytest.fixture(scope="module")
def container(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("serving") / "cls.kpk")
    pack_onnx(ppocr_model(CLS), path, max_error=None, level=3)
    return path


def expected(container: str, x: np.ndarray) -> np.ndarray:
    return ort_session(container, CPU).run(None, {"x": x})[0]


# --- HTTP: the command line, real process --------------------------------------------------
def start(container: str, *extra: str) -> tuple[subprocess.Popen, int]:
    """``kernelpack serve CONTAINER --port 0 --device cpu`` and the port its start line names."""
    process = subprocess.Popen([*SERVE, container, "--port", "0", "--device", "cpu", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    found = re.match(r"serving .* as 'cls' on http://127\.0\.0\.1:(\d+) with CPUExecutionProvider", line)
    if not found:
        process.kill()
        raise AssertionError((line, process.communicate(timeout=30)))
    return process, int(found.group(1))


@pytest.fixture(scope="module")
def service(container: str):
    """``kernelpack serve cls.kpk --port 0 --device cpu``, until the module's tests end."""
    process, port = start(container)
    try:
        yield port
    finally:
        process.kill()
        process.communicate(timeout=30)


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def predict(port: int, x: np.ndarray) -> tuple[int, Any]:
    return request(port, "POST", "/predict", json.dumps({"inputs": {"x": x.tolist()}}).encode(),
                   {"Content-Type": "application/json"})


def test_health_says_ready_with_the_provider_and_the_model_signature(service):
    status, health = request(service, "GET", "/health")
    assert status == 200 and health["status"] == "ready" and health["providers"] == CPU
    assert [(i["name"], i["type"]) for i in health["inputs"]] == [("x", "tensor(float)")]
    assert health["outputs"][0]["name"] == "save_infer_model/scale_0.tmp_1"
    assert health["load"]["connections"] >= 1 and health["load"]["requests"] == 0


def test_predictions_are_the_sessions_outputs_exactly_also_concurrently(service, container):
    batches = [cls_batch(4, seed=s) for s in range(4)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda x: predict(service, x), batches))
    for x, (status, answer) in zip(batches, answers):
        assert status == 200
        out = np.asarray(answer["outputs"]["save_infer_model/scale_0.tmp_1"], dtype=np.float32)
        assert np.array_equal(out, expected(container, x))


@pytest.mark.parametrize("body, message", [
    (b"{not json", "Expecting"),
    (b'{"inputs": {"x": [1]}}\xff', "not UTF-8"),
    (json.dumps({"x": [1]}).encode(), '{"inputs"'),
    (json.dumps({"inputs": {"y": [1]}}).encode(), "exactly ['x']"),
    (json.dumps({"inputs": {"x": [[1, 2], [3]]}}).encode(), "rectangular"),
    (json.dumps({"inputs": {"x": [[1.0, 2.0]]}}).encode(), "refused the inputs"),
    (b'{"inputs": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}", "nests 100002 deep"),
    (b'{"inputs": {"x": ' + b"[" * 100_000, "nests 100002 deep"),  # and unfinished
    (b'{"inputs": {"x]]]]]]": ' + b"[" * 1000 + b"]" * 1000 + b"}}", "nests 1002 deep"),  # brackets in a key
    (b'{"inputs": {"x\\"]]]]": ' + b"[" * 1000 + b"]" * 1000 + b"}}", "nests 1002 deep"),  # and an escaped quote
], ids=["not-json", "not-utf8", "no-inputs", "wrong-name", "ragged", "wrong-shape", "deep", "deep-unfinished",
        "deep-brackets-in-key", "deep-escaped-quote-in-key"])
def test_bad_requests_get_400_and_a_reason_and_the_service_stays_up(service, body, message):
    status, answer = request(service, "POST", "/predict", body)
    assert status == 400 and message in answer["error"]
    assert request(service, "GET", "/health")[0] == 200


def test_unknown_paths_get_404(service):
    assert request(service, "GET", "/predict")[0] == 404
    assert request(service, "POST", "/health", b"{}")[0] == 404


def test_a_container_the_reader_refuses_stops_the_start_with_one_line(container, tmp_path):
    not_a_container = tmp_path / "noise.kpk"
    not_a_container.write_bytes(os.urandom(4096))
    for argv in ([container, "--limit", "max_decoded_bytes=1000"], [container, "--limit", "max_work=1000"],
                 [str(not_a_container)]):
        done = subprocess.run([*SERVE, *argv, "--port", "0", "--device", "cpu"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2 and done.stdout == "", done
        assert re.fullmatch(r"kernelpack: error: file '[^']+'.*\n", done.stderr), done.stderr
    with pytest.raises(kernelpack.KernelpackError, match="max_decoded_bytes"):
        serve.start_service(container, limits=kernelpack.Limits(max_decoded_bytes=1000))


def test_metadata_names_the_signature_and_the_containers_header_checksum(service, container):
    status, meta = request(service, "GET", "/metadata")
    with open(container, "rb") as f:
        raw = f.read()
    (length,) = struct.unpack("<I", raw[12:16])
    assert status == 200 and meta["name"] == "cls" and meta["providers"] == CPU
    assert meta["container"] == {"file": "cls.kpk", "bytes": len(raw), "format_version": "%d.%d" % struct.unpack(
        "<HH", raw[8:12]), "header_sha256": hashlib.sha256(raw[:16] + raw[48:48 + length]).hexdigest()}
    assert meta["inputs"] == [{"name": "x", "type": "tensor(float)", "dtype": "float32", "shape": [None, 3, "?", "?"]}]
    assert [(o["name"], o["dtype"], o["shape"]) for o in meta["outputs"]] == [(OUT, "float32", [None, 2])]


def npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=True)
    return stream.getvalue()


RAW = {"Content-Type": "application/octet-stream", "X-Dtype": "float32", "X-Shape": "2,3,48,192"}


@pytest.mark.parametrize("body, headers", [
    (lambda x: npy(x), {"Content-Type": "application/x-npy"}),
    (lambda x: npy(np.asfortranarray(x)), {"Content-Type": "application/x-npy", "X-Input": "x"}),
    (lambda x: x.tobytes(), RAW),
], ids=["npy", "npy-fortran-order", "raw"])
def test_binary_tensor_bodies_get_the_sessions_outputs_exactly(service, container, body, headers):
    x = cls_batch(2, seed=3)
    status, answer = request(service, "POST", "/predict", body(x), headers)
    assert status == 200, answer
    assert np.array_equal(np.float32(answer["outputs"][OUT]), expected(container, x))


@pytest.mark.parametrize("body, headers, message", [
    (npy(cls_batch(1).astype(np.float64)), {"Content-Type": "application/x-npy"}, "is float32; the body is float64"),
    (npy(np.array([{"a": 1}], dtype=object)), {"Content-Type": "application/x-npy"}, "would need pickle"),
    (npy(cls_batch(1))[:-4], {"Content-Type": "application/x-npy"}, "the body holds"),
    (b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'" + b" " * 16, {"Content-Type": "application/x-npy"}, "not a .npy"),
    (npy(cls_batch(1)), {"Content-Type": "application/x-npy", "X-Input": "y"}, "exactly ['x']"),
    (cls_batch(1).tobytes(), {**RAW, "X-Shape": "1,3,48,191"}, "the body holds"),
    (cls_batch(1).tobytes(), {**RAW, "X-Shape": "1;3"}, "comma-separated"),
    (cls_batch(1).tobytes(), {**RAW, "X-Dtype": "complex64"}, "is not one of"),
    (cls_batch(1).tobytes(), {"Content-Type": "application/octet-stream"}, "needs X-Dtype"),
    (b"x", {"Content-Type": "text/plain"}, "is not application/json"),
], ids=["wrong-dtype", "object", "short", "bad-header", "wrong-name", "wrong-size", "bad-shape", "bad-dtype",
        "no-headers", "content-type"])
def test_bad_binary_bodies_get_400_and_a_reason(service, body, headers, message):
    status, answer = request(service, "POST", "/predict", body, headers)
    assert status == 400 and message in answer["error"], answer


def test_kserve_v2_paths_answer_health_metadata_and_inference(service, container):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/cls/ready"):
        assert request(service, "GET", path)[0] == 200
    status, meta = request(service, "GET", "/v2/models/cls")
    assert status == 200 and meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, -1, -1]}]
    assert meta["outputs"] == [{"name": OUT, "datatype": "FP32", "shape": [-1, 2]}]
    x = cls_batch(3, seed=4)
    body = {"id": "r1", "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                    "data": x.ravel().tolist()}]}
    status, answer = request(service, "POST", "/v2/models/cls/infer", json.dumps(body).encode())
    assert status == 200 and answer["id"] == "r1" and answer["model_name"] == "cls"
    (out,) = answer["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == (OUT, "FP32", [3, 2])
    assert np.array_equal(np.float32(out["data"]).reshape(3, 2), expected(container, x))
    body["inputs"][0]["datatype"] = "FP64"
    status, answer = request(service, "POST", "/v2/models/cls/infer", json.dumps(body).encode())
    assert status == 400 and "has datatype FP32" in answer["error"]
    assert request(service, "GET", "/v2/models/other")[0] == 404


def test_sigterm_answers_the_request_under_way_closes_idle_connections_and_exits_0(container):
    process, port = start(container)
    try:
        x = cls_batch(1, seed=5)
        body = npy(x)
        with connect(port) as idle, connect(port) as busy:
            busy.sendall(f"POST /predict HTTP/1.1\r\nContent-Type: application/x-npy\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
            time.sleep(0.5)  # the request is admitted and its body under way
            process.send_signal(signal.SIGTERM)
            assert until_closed(idle) == b""  # the idle connection is closed at once
            busy.sendall(body[100:])
            response = until_closed(busy)
        assert status_of(response) == 200 and b"Connection: close" in response
        answer = json.loads(response.split(b"\r\n\r\n", 1)[1])
        assert np.array_equal(np.float32(answer["outputs"][OUT]), expected(container, x))
        assert process.wait(timeout=WAIT) == 0
        with pytest.raises(OSError):
            connect(port).close()
    finally:
        process.kill()
        process.communicate(timeout=30)


# --- HTTP: hostile clients, against the service in-process with tight bounds -----------------
TIGHT = serve.Settings(workers=4, max_body_bytes=4 << 20, max_inflight_bytes=6 << 20,
                              max_json_values=200_000, idle_timeout=2.0, header_timeout=2.0,
                              transfer_timeout=3.0)
WAIT = 60.0  # seconds: the most any step below waits before the test fails


@pytest.fixture(scope="module")
def tight(container: str) -> Iterator[serve.Service]:
    with serve.start_service(container, settings=TIGHT, providers=CPU) as running:
        yield running


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT)


def until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def eventually(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "the service did not get there in time"
        time.sleep(0.02)


def head(length: int | None, extra: str = "") -> bytes:
    declared = f"Content-Length: {length}\r\n" if length is not None else ""
    return f"POST /predict HTTP/1.1\r\nHost: x\r\n{declared}{extra}\r\n".encode()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_a_body_beyond_the_cap_gets_413_before_it_is_sent(tight):
    with connect(tight.port) as sock:
        sock.sendall(head(TIGHT.max_body_bytes + 1))  # and not a byte of the body
        response = until_closed(sock)
    assert status_of(response) == 413 and b"at most 4194304" in response


@pytest.mark.parametrize("extra", ["", "Transfer-Encoding: chunked\r\n"], ids=["none", "chunked"])
def test_a_body_without_content_length_gets_411(tight, extra):
    with connect(tight.port) as sock:
        sock.sendall(head(None, extra) + b"5\r\n{}\r\n0\r\n\r\n")
        assert status_of(until_closed(sock)) == 411


def test_expect_100_continue_gets_the_go_ahead_then_the_answer(tight, container):
    x = cls_batch(1)
    body = json.dumps({"inputs": {"x": x.tolist()}}).encode()
    with connect(tight.port) as sock:
        sock.sendall(head(len(body), "Expect: 100-continue\r\nConnection: close\r\n"))
        assert sock.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        response = until_closed(sock)
    out = json.loads(response.split(b"\r\n\r\n", 1)[1])["outputs"]["save_infer_model/scale_0.tmp_1"]
    assert status_of(response) == 200 and np.array_equal(np.float32(out), expected(container, x))


def test_bodies_beyond_the_bytes_in_flight_get_503_and_the_account_stays_under_the_cap(tight):
    first, second = 4 << 20, 3 << 20  # each under max_body_bytes, together over max_inflight_bytes
    with connect(tight.port) as holder:
        holder.sendall(head(first) + b"[" * 1000)  # admitted; the rest of its body never comes
        eventually(lambda: tight.load.now["body_bytes"] == first)
        with connect(tight.port) as late:
            late.sendall(head(second))
            response = until_closed(late)
        assert status_of(response) == 503 and b"no room for 3145728" in response
        assert tight.load.now["body_bytes"] == first
        assert status_of(until_closed(holder)) == 408  # the held body times out
    eventually(lambda: tight.load.now["body_bytes"] == 0)
    assert tight.load.peak["body_bytes"] <= TIGHT.max_inflight_bytes


def test_too_many_values_get_400(tight):
    body = b'{"inputs": {"x": [' + b"0," * 300_000 + b'0]}}'
    status, answer = request(tight.port, "POST", "/predict", body)
    assert status == 400 and "at most 200000" in answer["error"]


def test_hundreds_of_idle_connections_leave_health_answering_and_are_closed_after_the_timeout(tight):
    idle = [connect(tight.port) for _ in range(320)]
    try:
        eventually(lambda: tight.load.now["connections"] >= len(idle))
        status, health = request(tight.port, "GET", "/health")
        assert status == 200 and health["load"]["connections"] >= len(idle) + 1
        for sock in idle:  # the server hangs up on each, silently
            assert until_closed(sock) == b""
        eventually(lambda: tight.load.now["connections"] == 0)
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.parametrize("start, trickle", [
    (b"GET /health HTTP/1.1\r\nX-Slow: ", b"a"),            # the head, a byte at a time
    (head(1000) + b'{"inputs": ', b" "),                     # the body, a byte at a time
], ids=["head", "body"])
def test_a_client_trickling_a_request_is_dropped_after_the_timeout(tight, start, trickle):
    with connect(tight.port) as sock:
        sock.sendall(start)
        deadline = time.monotonic() + WAIT
        while not select.select([sock], [], [], 0.2)[0]:  # one byte every 0.2 s, well within any per-read timeout
            assert time.monotonic() < deadline
            sock.sendall(trickle)
        assert status_of(until_closed(sock)) == 408


class Gate:
    """An ORT session whose ``run`` waits until ``parties`` runs are inside it at once: if the
    service serialised them, the barrier would break (after WAIT) and the requests fail."""

    def __init__(self, session: Any, parties: int) -> None:
        self._session, self._barrier = session, threading.Barrier(parties, timeout=WAIT)

    def run(self, *args: Any) -> Any:
        self._barrier.wait()
        return self._session.run(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def test_predictions_run_in_parallel_up_to_the_workers(tight, container):
    session = tight.model.session
    tight.model.session = Gate(session, TIGHT.workers)
    try:
        batches = [cls_batch(1, seed=s) for s in range(TIGHT.workers)]
        with ThreadPoolExecutor(len(batches)) as pool:
            answers = list(pool.map(lambda x: predict(tight.port, x), batches))
    finally:
        tight.model.session = session
    for x, (status, answer) in zip(batches, answers):
        assert status == 200, answer
        out = np.asarray(answer["outputs"]["save_infer_model/scale_0.tmp_1"], dtype=np.float32)
        assert np.array_equal(out, expected(container, x))
    assert tight.load.peak["running"] == TIGHT.workers


def test_connections_and_predictions_beyond_their_bounds_get_503(container):
    settings = serve.Settings(max_connections=2, max_requests=1, idle_timeout=30.0,
                                     transfer_timeout=30.0)
    with serve.start_service(container, settings=settings, providers=CPU) as running, \
            connect(running.port) as holder:
        holder.sendall(head(100))  # admitted, its body pending
        eventually(lambda: running.load.now["requests"] == 1)
        with connect(running.port) as second:
            second.sendall(head(2))
            response = until_closed(second)
        assert status_of(response) == 503 and b"1 predictions are under way" in response
        eventually(lambda: running.load.now["connections"] == 1)
        with connect(running.port):  # idle
            eventually(lambda: running.load.now["connections"] == 2)
            with connect(running.port) as refused:
                response = until_closed(refused)
            assert status_of(response) == 503 and b"2 connections are open" in response

# --- Triton Python backend -------------------------------------------------------------------
def fake_pb_utils() -> types.ModuleType:
    """The parts of triton_python_backend_utils that model.py uses, with the real signatures:
    Tensor(name, array).name(), DLPack both ways (Tensor.from_dlpack, __dlpack__), InferenceResponse(output_tensors, error=None),
    TritonError(message), get_input_tensor_by_name, triton_string_to_numpy."""
    module = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self._name, self._array = name, np.asarray(array)

        def name(self) -> str:
            return self._name

        def as_numpy(self) -> np.ndarray:
            return self._array

        def __dlpack__(self, **kwargs: Any) -> Any:
            return self._array.__dlpack__(**kwargs)

        def __dlpack_device__(self) -> Any:
            return self._array.__dlpack_device__()

        @classmethod
        def from_dlpack(cls, name: str, capsule: Any) -> Tensor:
            return cls(name, np.from_dlpack(capsule))

    class InferenceRequest:
        def __init__(self, model_name: str, inputs: list, requested_output_names: list) -> None:
            self._inputs = list(inputs)

        def inputs(self) -> list:
            return self._inputs

    class TritonError:
        def __init__(self, message: str) -> None:
            self._message = message

        def message(self) -> str:
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors: list, error: Any = None) -> None:
            self._outputs, self._error = output_tensors, error

        def output_tensors(self) -> list:
            return self._outputs

        def has_error(self) -> bool:
            return self._error is not None

        def error(self) -> Any:
            return self._error

    def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
        return next((t for t in request.inputs() if t.name() == name), None)

    types_ = {"TYPE_BOOL": np.bool_, "TYPE_UINT8": np.uint8, "TYPE_INT8": np.int8, "TYPE_INT32": np.int32,
              "TYPE_INT64": np.int64, "TYPE_FP16": np.float16, "TYPE_FP32": np.float32,
              "TYPE_FP64": np.float64}
    module.__dict__.update(Tensor=Tensor, InferenceRequest=InferenceRequest, TritonError=TritonError,
                           InferenceResponse=InferenceResponse, get_input_tensor_by_name=get_input_tensor_by_name,
                           triton_string_to_numpy=lambda name: types_[name])
    return module


def pbtxt(text: str) -> dict[str, Any]:
    """A model config in protobuf text format as the dict Triton hands to ``initialize`` (as JSON):
    repeated fields as lists, the ``parameters`` map as a dict by key."""
    tokens = re.findall(r'"[^"]*"|[{}\[\]:,]|[^\s{}\[\]:,"#]+', re.sub(r"#[^\n]*", "", text))
    position = 0

    def value() -> Any:
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "{":
            return message("}")
        if token == "[":
            items = []
            while tokens[position] != "]":
                items.append(value())
                position += tokens[position] == ","
            position += 1
            return items
        return token.strip('"')

    def message(end: str | None) -> dict[str, Any]:
        nonlocal position
        fields: dict[str, list] = {}
        while position < len(tokens) and tokens[position] != end:
            name = tokens[position]
            position += 1 + (tokens[position + 1] == ":")
            item = value()
            fields.setdefault(name, []).extend(item if isinstance(item, list) else [item])
        position += 1
        repeated = {"input", "output", "instance_group", "dims"}
        out = {k: v if k in repeated else v[0] for k, v in fields.items() if k != "parameters"}
        if "parameters" in fields:
            out["parameters"] = {p["key"]: p["value"] for p in fields["parameters"]}
        return out

    return message(None)


@pytest.fixture
def triton_model(container, tmp_path, monkeypatch) -> tuple[Any, dict, types.ModuleType]:
    """``kernelpack triton-config cls.kpk REPO``, its model.py loaded against the stand-in
    pb_utils and initialized as Triton would (a CPU instance)."""
    assert cli(["triton-config", container, str(tmp_path)]) == 0
    folder = tmp_path / "cls"
    with open(folder / "config.pbtxt", encoding="utf-8") as f:
        config = pbtxt(f.read())
    pb_utils = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    assert (folder / "1" / "model.py").read_text() == MODEL_PY
    spec = importlib.util.spec_from_file_location("triton_cls_model", folder / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_instance_kind": "CPU",
                      "model_instance_name": "cls_0", "model_instance_device_id": "0",
                      "model_repository": str(folder), "model_version": "1", "model_name": "cls"})
    return model, config, pb_utils


def test_triton_config_is_the_graphs_signature(triton_model, container):
    model, config, _ = triton_model
    assert config["name"] == "cls" and config["backend"] == "python" and config["max_batch_size"] == "0"
    assert config["parameters"]["container"]["string_value"] == "model.kpk"
    assert config["instance_group"] == [{"count": "1", "kind": "KIND_CPU"}]
    onnx_types = {"TYPE_FP32": "tensor(float)"}
    session = ort_session(container, CPU)
    for declared, actual in ((config["input"], session.get_inputs()), (config["output"], session.get_outputs())):
        assert [(d["name"], onnx_types[d["data_type"]]) for d in declared] == [(a.name, a.type) for a in actual]
        assert [[int(n) for n in d["dims"]] for d in declared] == [
            [n if isinstance(n, int) else -1 for n in a.shape] for a in actual]


def test_triton_config_refuses_a_container_without_a_graph(tmp_path):
    kernelpack.save({"w": np.ones((4, 4), np.float32)}, str(tmp_path / "w.kpk"))
    with pytest.raises(kernelpack.KernelpackError, match="onnx.graph"):
        write_model_dir(str(tmp_path / "w.kpk"), str(tmp_path / "repo"))
    assert not (tmp_path / "repo").exists()


def test_triton_model_answers_each_request_and_reports_a_bad_one(triton_model, container):
    model, _, pb_utils = triton_model
    batches = [cls_batch(2, seed=1), cls_batch(3, seed=2)]
    requests = [pb_utils.InferenceRequest("cls", [pb_utils.Tensor("x", x)], []) for x in batches]
    requests.append(pb_utils.InferenceRequest("cls", [pb_utils.Tensor("y", batches[0])], []))
    responses = model.execute(requests)
    assert len(responses) == 3
    for x, response in zip(batches, responses):
        assert not response.has_error()
        (tensor,) = response.output_tensors()
        assert tensor.name() == OUT and tensor.as_numpy().dtype == np.float32
        assert np.array_equal(tensor.as_numpy(), expected(container, x))
    assert responses[2].has_error() and "missing input 'x'" in responses[2].error().message()
    model.finalize()
