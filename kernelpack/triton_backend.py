"""NVIDIA Triton's Python backend for any container that carries an ``onnx.graph``.

``kernelpack triton-config model.kpk REPOSITORY`` (:func:`write_model_dir`) writes a model
directory into a Triton model repository::

    REPOSITORY/NAME/config.pbtxt    inputs, outputs and their types from the graph (ORT's view)
    REPOSITORY/NAME/1/model.py      one line: from kernelpack.triton_backend import TritonPythonModel
    REPOSITORY/NAME/1/model.kpk     a copy of the container

Triton calls ``initialize`` once per model instance: the container named by the config's
``container`` parameter (in the version folder) is decoded with numpy and handed to an ONNX
Runtime session in memory (:func:`kernelpack.ort_session`), no dense file written, no torch
needed. A KIND_GPU instance asks for CUDA on its device (``ort_session`` falls back to CPU with
a warning if ORT cannot start it); a KIND_CPU instance runs on the CPU. ``execute`` answers
each request with every output in the config's types; a request that fails gets an error
response rather than failing the batch.

Why the Python backend: Triton's own ``onnxruntime`` backend would need a dense ``model.onnx``
on disk, and it is not in the ``nvidia-pytriton`` wheel the tests run Triton from (the wheel
has the Python backend only). The backend's Python needs ``kernelpack[onnx]``.

Tensors cross between Triton and numpy through DLPack (``np.from_dlpack(tensor)``,
``pb_utils.Tensor.from_dlpack``): the backend stub of Triton 2.51 (nvidia-pytriton 0.7.0, built
for numpy 1.x) gets numpy 2 wrong both ways: ``tensor.as_numpy()`` gave other values than the
client sent, and ``pb_utils.Tensor(name, array)`` an empty tensor (Triton answers "output
tensor shape does not match size of output"); DLPack does not depend on numpy's C structures.

``max_batch_size`` is 0 (Triton passes shapes as the client sends them); a dimension the graph
leaves free is ``-1`` in the config.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Sequence

import numpy as np

from kernelpack.errors import KernelpackError
from kernelpack.ort import ort_session
from kernelpack.serve import ELEMENT_TYPES, V2_TYPES

#: The ``model.py`` that :func:`write_model_dir` writes (Triton imports ``TritonPythonModel`` from it).
MODEL_PY = ('"""Triton Python-backend model: a kernelpack container served by ONNX Runtime '
            '(kernelpack.triton_backend)."""\n\nfrom kernelpack.triton_backend import TritonPythonModel  '
            '# noqa: F401\n')
CONTAINER = "model.kpk"
#: Triton's ``TYPE_*`` names -> numpy dtypes (the inverse of :func:`triton_type`).
NUMPY_TYPES = {"TYPE_" + v2: np.dtype(name) for name, v2 in V2_TYPES.items()}
CPU = ["CPUExecutionProvider"]


def triton_type(ort_type: str, name: str, path: str) -> str:
    """Triton's ``TYPE_*`` for an ORT tensor type, or a refusal naming the tensor."""
    dtype = ELEMENT_TYPES.get(ort_type)
    if dtype is None:
        raise KernelpackError(f"has type {ort_type}, which the Triton model does not serve "
                              f"(one of {sorted(ELEMENT_TYPES)})", path=path, tensor=name)
    return "TYPE_" + V2_TYPES[np.dtype(dtype).name]


def config_text(name: str, inputs: Sequence[Any], outputs: Sequence[Any], path: str, kind: str = "cpu",
                count: int = 1) -> str:
    """``config.pbtxt`` for ORT's ``get_inputs()``/``get_outputs()`` (protobuf text format;
    names quoted as JSON strings, whose escapes the text format reads alike)."""
    def tensors(args: Sequence[Any]) -> str:
        return ",\n".join(
            f'  {{\n    name: {json.dumps(a.name)}\n    data_type: {triton_type(a.type, a.name, path)}\n'
            f'    dims: [ {", ".join(str(n) if isinstance(n, int) else "-1" for n in a.shape)} ]\n  }}'
            for a in args)

    return (f"# Written by kernelpack triton-config from {os.path.basename(path)} (kernelpack.triton_backend).\n"
            f'name: {json.dumps(name)}\nbackend: "python"\nmax_batch_size: 0\n'
            f"input [\n{tensors(inputs)}\n]\noutput [\n{tensors(outputs)}\n]\n"
            f'parameters: {{\n  key: "container"\n  value: {{ string_value: "{CONTAINER}" }}\n}}\n'
            f"instance_group [\n  {{\n    count: {count}\n    kind: KIND_{kind.upper()}\n  }}\n]\n")


def write_model_dir(container: str, repository: str, name: str | None = None, kind: str = "cpu",
                    count: int = 1) -> str:
    """Write ``repository/name`` for ``container`` (see the module docstring); returns its path.
    The container is read (and its graph checked by ORT) before anything is written."""
    if kind not in ("cpu", "gpu") or count < 1:
        raise KernelpackError(f"kind must be cpu or gpu and count >= 1, got {kind!r}, {count}")
    name = name or os.path.splitext(os.path.basename(container))[0]
    if not name or os.sep in name or name in (".", ".."):
        raise KernelpackError(f"model name {name!r} is not a folder name")
    session = ort_session(container, CPU)
    text = config_text(name, session.get_inputs(), session.get_outputs(), container, kind, count)
    folder = os.path.join(repository, name)
    os.makedirs(os.path.join(folder, "1"), exist_ok=True)
    with open(os.path.join(folder, "config.pbtxt"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(folder, "1", "model.py"), "w", encoding="utf-8") as f:
        f.write(MODEL_PY)
    shutil.copyfile(container, os.path.join(folder, "1", CONTAINER))
    return folder


class TritonPythonModel:
    """Triton's Python-backend interface (``initialize``, ``execute``, ``finalize``)."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"],
                            config["parameters"]["container"]["string_value"])
        providers: list[Any] = CPU
        if args.get("model_instance_kind") == "GPU":
            device = int(args["model_instance_device_id"])
            providers = [("CUDAExecutionProvider", {"device_id": device}), *CPU]
        self.session = self.open(path, providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [(o["name"], NUMPY_TYPES[o["data_type"]]) for o in config["output"]]

    def open(self, path: str, providers: Sequence[Any]) -> Any:
        """The session for ``path`` (a subclass may serve another file, e.g. a dense ONNX model)."""
        return ort_session(path, providers)

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._answer(request) for request in requests]

    def _answer(self, request: Any) -> Any:
        import triton_python_backend_utils as pb_utils  # only inside Triton's Python backend

        try:
            feeds = {}
            for name in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is None:
                    raise ValueError(f"missing input {name!r}")
                feeds[name] = np.from_dlpack(tensor)
            results = self.session.run([name for name, _ in self.outputs], feeds)
            tensors = [pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(result, dtype))
                       for (name, dtype), result in zip(self.outputs, results)]
            return pb_utils.InferenceResponse(output_tensors=tensors)
        except Exception as exc:  # noqa: BLE001 - one bad request must not fail the others in the batch
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))

    def finalize(self) -> None:
        self.session = None
