"""A real Triton Inference Server (the nvidia-pytriton wheel's, which the README's test command
installs with ``--no-deps``; tritonclient is in the test extra) serves the model directory ``kernelpack triton-config`` writes, over HTTP and gRPC on
loopback, answering exactly what ONNX Runtime answers on the original model, and stops cleanly."""

from __future__ import annotations

import numpy as np
import pytest
import triton_server
from ocr_inputs import CLS, cls_batch, ppocr_model

pytest.importorskip("onnxruntime")
if triton_server.distribution() is None:
    pytest.skip("tritonserver is not installed (pip install --no-deps nvidia-pytriton==0.7.0)",
                allow_module_level=True)
http_client = pytest.importorskip("tritonclient.http")
grpc_client = pytest.importorskip("tritonclient.grpc")
import onnxruntime  # noqa: E402

from kernelpack.onnx_io import pack_onnx  # noqa: E402
from kernelpack.triton_backend import write_model_dir  # noqa: E402

OUT = "save_infer_model/scale_0.tmp_1"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """tritonserver with two models: ``cls`` (the container) and ``cls_dense`` (the ONNX file)."""
    work = tmp_path_factory.mktemp("triton")
    container = str(work / "cls.kpk")
    pack_onnx(ppocr_model(CLS), container, max_error=None, level=3)
    repository = str(work / "repository")
    folder = write_model_dir(container, repository)
    triton_server.dense_model_dir(ppocr_model(CLS), folder, repository, "cls_dense")
    running = triton_server.Server(repository, "cls", str(work))
    assert triton_server.ready(running.http, "/v2/models/cls_dense/ready")
    yield running
    assert running.stop() == 0, running.log()[-2000:]
    assert "successfully unloaded 'cls' version 1" in running.log()


def original(x: np.ndarray) -> np.ndarray:
    return onnxruntime.InferenceSession(ppocr_model(CLS), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("client", [http_client, grpc_client], ids=["http", "grpc"])
@pytest.mark.parametrize("model", ["cls", "cls_dense"])
def test_triton_answers_what_the_original_model_answers(server, client, model):
    port = server.http if client is http_client else server.grpc
    with client.InferenceServerClient(f"127.0.0.1:{port}") as triton:
        ask(triton, client, model)


def ask(triton, client, model: str) -> None:
    assert triton.is_server_ready() and triton.is_model_ready(model)
    metadata = triton.get_model_metadata(model)
    inputs = metadata["inputs"] if isinstance(metadata, dict) else [
        {"name": i.name, "datatype": i.datatype, "shape": list(i.shape)} for i in metadata.inputs]
    assert inputs == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, -1, -1]}]
    for seed, n in ((1, 1), (2, 3)):
        x = cls_batch(n, seed=seed)
        given = client.InferInput("x", list(x.shape), "FP32")
        given.set_data_from_numpy(x)
        result = triton.infer(model, [given], outputs=[client.InferRequestedOutput(OUT)])
        assert np.array_equal(result.as_numpy(OUT), original(x))


def test_a_bad_request_gets_triton_s_error_and_the_server_stays_ready(server):
    with http_client.InferenceServerClient(f"127.0.0.1:{server.http}") as triton:
        given = http_client.InferInput("x", [1, 3, 48, 0], "FP32")  # no pixels: ORT refuses it in model.py
        given.set_data_from_numpy(np.zeros((1, 3, 48, 0), np.float32))
        with pytest.raises(Exception, match="the model refused|Invalid|invalid"):
            triton.infer("cls", [given])
        assert triton.is_model_ready("cls")
