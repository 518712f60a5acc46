"""A real Triton Inference Server on loopback, from the ``nvidia-pytriton`` wheel (a test and
benchmark dependency, never a runtime one): the wheel bundles ``tritonserver``, its Python
backend and a backend stub per Python version; its own libraries go on LD_LIBRARY_PATH.
No ONNX Runtime backend is in the wheel, so models are served by the Python backend.
Used by tests/test_triton.py and benchmarks/serve_load.py --triton."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from typing import Iterator

#: model.py of the comparison: the same backend class serving a dense ONNX file with ORT.
DENSE_MODEL_PY = '''"""The dense comparison: kernelpack's Triton model class opening a plain ONNX file."""
import onnxruntime

from kernelpack.triton_backend import TritonPythonModel as _Container


class TritonPythonModel(_Container):
    def open(self, path, providers):
        return onnxruntime.InferenceSession(path, providers=providers)
'''


def distribution() -> str | None:
    """The installed ``pytriton`` package folder, or None."""
    spec = importlib.util.find_spec("pytriton")
    return None if spec is None or not spec.submodule_search_locations else list(spec.submodule_search_locations)[0]


def backends(folder: str) -> str:
    """A backend directory for Triton: the wheel's Python backend with this Python's stub."""
    dist = os.path.join(distribution(), "tritonserver")
    python = os.path.join(folder, "backends", "python")
    os.makedirs(python, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        os.symlink(os.path.join(dist, "backends", "python", name), os.path.join(python, name))
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    os.symlink(os.path.join(dist, "python_backend_stubs", version, "triton_python_backend_stub"),
               os.path.join(python, "triton_python_backend_stub"))
    return os.path.join(folder, "backends")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ready(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


class Server:
    """``tritonserver`` on loopback HTTP and gRPC ports with ``repository``; ``seconds_to_ready``
    is the time from the start of the process to ``model`` READY (polled every 10 ms)."""

    def __init__(self, repository: str, model: str, work: str, timeout: float = 120.0) -> None:
        dist = distribution()
        self.http, self.grpc = free_port(), free_port()
        env = dict(os.environ)
        libs = os.path.join(os.path.dirname(dist), "nvidia_pytriton.libs")
        # This Python's libpython before the system's: the backend stub embeds whichever
        # libpython3.x it finds, and the system's has none of this environment's packages.
        this_python = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libs, this_python, env.get("LD_LIBRARY_PATH")]))
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])  # the stub's python
        self.log_path = os.path.join(work, f"tritonserver-{self.http}.log")
        log = open(self.log_path, "wb")
        start = time.perf_counter()
        self.process = subprocess.Popen(
            [os.path.join(dist, "tritonserver", "bin", "tritonserver"), f"--model-repository={repository}",
             f"--backend-directory={backends(os.path.join(work, f'triton-{self.http}'))}",
             "--http-address=127.0.0.1", f"--http-port={self.http}", "--grpc-address=127.0.0.1",
             f"--grpc-port={self.grpc}", "--allow-metrics=false", "--exit-timeout-secs=30"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
        log.close()
        while not ready(self.http, f"/v2/models/{model}/ready"):
            if self.process.poll() is not None or time.perf_counter() - start > timeout:
                self.stop()
                raise RuntimeError(f"tritonserver did not get {model} READY:\n{self.log()[-3000:]}")
            time.sleep(0.01)
        self.seconds_to_ready = time.perf_counter() - start

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> int:
        """SIGTERM, then wait (Triton unloads its models and exits); its exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        return self.process.returncode


@contextlib.contextmanager
def serving(repository: str, model: str, work: str) -> Iterator[Server]:
    server = Server(repository, model, work)
    try:
        yield server
    finally:
        server.stop()


def dense_model_dir(onnx_path: str, container_dir: str, repository: str, name: str) -> str:
    """``name``: the container's model directory with the dense ONNX file and DENSE_MODEL_PY."""
    folder = os.path.join(repository, name)
    os.makedirs(os.path.join(folder, "1"))
    with open(os.path.join(container_dir, "config.pbtxt"), encoding="utf-8") as f:
        config = f.read()
    old_name = os.path.basename(container_dir)
    config = config.replace(f'name: "{old_name}"', f'name: "{name}"').replace('"model.kpk"', '"model.onnx"')
    with open(os.path.join(folder, "config.pbtxt"), "w", encoding="utf-8") as f:
        f.write(config)
    with open(os.path.join(folder, "1", "model.py"), "w", encoding="utf-8") as f:
        f.write(DENSE_MODEL_PY)
    shutil.copyfile(onnx_path, os.path.join(folder, "1", "model.onnx"))
    return folder
