"""Triton Python backend model: a kernelpack container decoded once, served with ONNX Runtime.

Triton calls ``initialize`` once per model instance: the container named by the config's
``container`` parameter (in this version folder) is decoded with numpy and handed to an
ONNX Runtime session in memory, no dense file written, no torch needed. A KIND_GPU
instance asks for CUDA on its device (falling back to CPU if ORT cannot start it); a
KIND_CPU instance runs on the CPU. ``execute`` answers each request with the outputs
the config lists, in the config's types; a request that fails gets an error response
rather than failing the batch.

The Triton image needs ``pip install kernelpack[onnx]`` (numpy, onnxruntime-gpu).
"""

import json
import os

import triton_python_backend_utils as pb_utils

import kernelpack


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        container = config["parameters"]["container"]["string_value"]
        path = os.path.join(args["model_repository"], args["model_version"], container)
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU":
            device = int(args["model_instance_device_id"])
            providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        self.session = kernelpack.ort_session(path, providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        try:
            feeds = {}
            for name in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is None:
                    raise ValueError(f"missing input {name!r}")
                feeds[name] = tensor.as_numpy()
            results = self.session.run([name for name, _ in self.outputs], feeds)
            tensors = [pb_utils.Tensor(name, result.astype(dtype))
                       for (name, dtype), result in zip(self.outputs, results)]
            return pb_utils.InferenceResponse(output_tensors=tensors)
        except Exception as exc:  # one bad request must not fail the others in the batch
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))

    def finalize(self):
        self.session = None
