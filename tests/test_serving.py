"""Serving: the HTTP service (a real process, real requests on loopback) and the Triton Python
backend model (run against a faithful stand-in for triton_python_backend_utils; Triton itself is
not run) load a container at start and answer exactly what the ORT session answers."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from ocr_inputs import CLS, cls_batch, ppocr_model

from kernelpack.ort import ort_session

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from kernelpack.onnx_io import pack_onnx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVING = os.path.join(ROOT, "serving")
TRITON_MODEL = os.path.join(SERVING, "triton", "ppocr_cls")
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def container(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("serving") / "cls.kpk")
    pack_onnx(ppocr_model(CLS), path, max_error=None, level=3)
    return path


def expected(container: str, x: np.ndarray) -> np.ndarray:
    return ort_session(container, CPU).run(None, {"x": x})[0]


# --- HTTP -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(container: str):
    """``python serving/http_service.py cls.kpk --port 0 --cpu``, until the module's tests end."""
    process = subprocess.Popen([sys.executable, os.path.join(SERVING, "http_service.py"), container,
                                "--port", "0", "--cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        line = process.stdout.readline()
        found = re.match(r"serving .* on http://127\.0\.0\.1:(\d+) with CPUExecutionProvider", line)
        assert found, (line, process.stderr.read() if process.poll() is not None else "")
        yield int(found.group(1))
    finally:
        process.kill()
        process.wait(timeout=30)
        process.stdout.close()
        process.stderr.close()


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
    (json.dumps({"x": [1]}).encode(), '{"inputs"'),
    (json.dumps({"inputs": {"y": [1]}}).encode(), "exactly ['x']"),
    (json.dumps({"inputs": {"x": [[1, 2], [3]]}}).encode(), "rectangular"),
    (json.dumps({"inputs": {"x": [[1.0, 2.0]]}}).encode(), "refused the inputs"),
])
def test_bad_requests_get_400_and_a_reason(service, body, message):
    status, answer = request(service, "POST", "/predict", body)
    assert status == 400 and message in answer["error"]


def test_unknown_paths_get_404(service):
    assert request(service, "GET", "/predict")[0] == 404
    assert request(service, "POST", "/health", b"{}")[0] == 404


# --- Triton Python backend -------------------------------------------------------------------
def fake_pb_utils() -> types.ModuleType:
    """The parts of triton_python_backend_utils that model.py uses, with the real signatures:
    Tensor(name, array).as_numpy()/.name(), InferenceResponse(output_tensors, error=None),
    TritonError(message), get_input_tensor_by_name, triton_string_to_numpy."""
    module = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self._name, self._array = name, np.asarray(array)

        def name(self) -> str:
            return self._name

        def as_numpy(self) -> np.ndarray:
            return self._array

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
    """serving/triton/ppocr_cls copied into a model repository with the container, its model.py
    loaded against the stand-in pb_utils and initialized as Triton would (a CPU instance)."""
    repository = tmp_path / "ppocr_cls"
    shutil.copytree(TRITON_MODEL, repository)
    with open(repository / "config.pbtxt", encoding="utf-8") as f:
        config = pbtxt(f.read())
    shutil.copy(container, repository / "1" / config["parameters"]["container"]["string_value"])
    pb_utils = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    spec = importlib.util.spec_from_file_location("triton_ppocr_cls_model", repository / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_instance_kind": "CPU",
                      "model_instance_name": "ppocr_cls_0", "model_instance_device_id": "0",
                      "model_repository": str(repository), "model_version": "1", "model_name": "ppocr_cls"})
    return model, config, pb_utils


def test_triton_config_matches_the_model(triton_model):
    model, config, _ = triton_model
    assert config["name"] == "ppocr_cls" and config["backend"] == "python"
    onnx_types = {"TYPE_FP32": "tensor(float)"}
    for declared, actual in ((config["input"], model.session.get_inputs()),
                             (config["output"], model.session.get_outputs())):
        assert [(d["name"], onnx_types[d["data_type"]]) for d in declared] == [(a.name, a.type) for a in actual]
        for d, a in zip(declared, actual):  # the config may fix what the model leaves free (48x192)
            onnx_dims = [n if isinstance(n, int) else -1 for n in a.shape]
            assert len(d["dims"]) == len(onnx_dims)
            assert all(m == -1 or int(n) == m for n, m in zip(d["dims"], onnx_dims)), (d["dims"], a.shape)


def test_triton_model_answers_each_request_and_reports_a_bad_one(triton_model, container):
    model, _, pb_utils = triton_model
    batches = [cls_batch(2, seed=1), cls_batch(3, seed=2)]
    requests = [pb_utils.InferenceRequest("ppocr_cls", [pb_utils.Tensor("x", x)], []) for x in batches]
    requests.append(pb_utils.InferenceRequest("ppocr_cls", [pb_utils.Tensor("y", batches[0])], []))
    responses = model.execute(requests)
    assert len(responses) == 3
    for x, response in zip(batches, responses):
        assert not response.has_error()
        (tensor,) = response.output_tensors()
        assert tensor.name() == "save_infer_model/scale_0.tmp_1" and tensor.as_numpy().dtype == np.float32
        assert np.array_equal(tensor.as_numpy(), expected(container, x))
    assert responses[2].has_error() and "missing input 'x'" in responses[2].error().message()
    model.finalize()
