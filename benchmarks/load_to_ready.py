"""Load-to-ready: time from a model file to the first inference result, container vs dense.

Each measurement is a fresh Python process that imports what it needs, reads the file,
decodes or loads the weights, builds the runtime and returns the first result; it reports
the time from its first line to that result (interpreter start-up, the same for every
case, is left out) split into phases, then the median latency of further inferences
(dense-speed parity after decode). Every case runs ``--repeats`` times, interleaved, and
the medians are compared with dense baselines measured in the same run:

* ONNX models (the PP-OCR models shipped in the rapidocr-onnxruntime wheel, real weights):
  ``onnx -> ort``: onnxruntime.InferenceSession(model.onnx), the dense baseline;
  ``safetensors -> ort``: the same weights dense in a .safetensors file fed to the
  container's graph with add_external_initializers (isolates where the weights come from);
  ``kpk -> ort``: kernelpack.ort_session of the container from ``kernelpack pack`` (default
  plan, max_error 0.01) and of an exact container (max_error 0).
* A PyTorch model (the demo's digits CNN, trained for a few epochs):
  ``safetensors -> torch`` (model class + safetensors.torch.load_file), ``onnx -> ort``,
  ``kpk -> torch`` (kernelpack.load_model), ``kpk -> ort`` (its exported graph attached).

Files sit in the page cache (they were just written or read): "cold" means a fresh
process, not a cold disk. Inputs are seeded random tensors of the models' usual sizes
(timing does not depend on the values). ``--device cuda`` (when a GPU is there) runs
ORT with the CUDA provider and torch on the GPU.

    python benchmarks/load_to_ready.py                 # CPU, 5 repeats (minutes: packs first)
    python benchmarks/load_to_ready.py --device cuda   # GPU
    python benchmarks/load_to_ready.py --quick         # cls model and the CNN, 2 repeats
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

START = time.perf_counter()  # a child's clock starts here, before any heavy import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: ONNX model file -> benchmark input shape (det: a 480x480 page; rec: one 48x320 text line)
PPOCR = {"ppocr-cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (1, 3, 48, 192)),
         "ppocr-det": ("ch_PP-OCRv4_det_infer.onnx", (1, 3, 480, 480)),
         "ppocr-rec": ("ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 320))}
CNN_INPUT = (64, 1, 8, 8)
STEADY_RUNS = 20


# --- children: one measurement each ---------------------------------------------------------
def providers(device: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def child(case: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this (fresh) process; phases are seconds since START."""
    import numpy as np

    marks: dict[str, float] = {}
    mark = lambda name: marks.__setitem__(name, time.perf_counter() - START)  # noqa: E731
    x = np.random.default_rng(0).random(case["shape"], dtype=np.float32)
    run = RUNNERS[case["kind"]](case, mark)
    result = run(x)
    mark("first result")
    steady = []
    for _ in range(STEADY_RUNS):
        begin = time.perf_counter()
        run(x)
        steady.append(time.perf_counter() - begin)
    return {"marks": marks, "steady_ms": 1e3 * statistics.median(steady),
            "checksum": float(np.abs(np.asarray(result, dtype=np.float64)).sum())}


def _onnx_ort(case: dict[str, Any], mark: Any) -> Any:
    import onnxruntime as ort

    mark("imports")
    session = ort.InferenceSession(case["file"], providers=providers(case["device"]))
    mark("session")
    return lambda x: session.run(None, {session.get_inputs()[0].name: x})[0]


def _safetensors_ort(case: dict[str, Any], mark: Any) -> Any:
    import onnxruntime as ort
    from safetensors.numpy import load_file

    mark("imports")
    weights = load_file(case["file"])
    with open(case["graph"], "rb") as f:
        graph = f.read()
    mark("weights")
    options = ort.SessionOptions()  # not kernelpack.ort.with_weights: this baseline must not import kernelpack
    options.add_external_initializers(list(weights), [ort.OrtValue.ortvalue_from_numpy(a) for a in weights.values()])
    session = ort.InferenceSession(graph, options, providers=providers(case["device"]))
    mark("session")
    return lambda x: session.run(None, {session.get_inputs()[0].name: x})[0]


def _kpk_ort(case: dict[str, Any], mark: Any) -> Any:
    import onnxruntime as ort

    from kernelpack.ort import graph_and_weights, usable_providers, with_weights

    mark("imports")
    graph, weights = graph_and_weights(case["file"])  # what kernelpack.ort_session does, in phases
    mark("weights")
    options = with_weights(ort.SessionOptions(), weights)
    session = ort.InferenceSession(graph, options, providers=usable_providers(providers(case["device"])))
    mark("session")
    return lambda x: session.run(None, {session.get_inputs()[0].name: x})[0]


def _torch_model(case: dict[str, Any], mark: Any, load: Any) -> Any:
    import torch

    from kernelpack.demo import make_model

    mark("imports")
    model = make_model().eval().to(case["device"])
    load(model)
    mark("weights")

    def run(x: Any) -> Any:
        with torch.no_grad():
            return model(torch.from_numpy(x).to(case["device"])).cpu().numpy()

    return run


def _safetensors_torch(case: dict[str, Any], mark: Any) -> Any:
    def load(model: Any) -> None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(case["file"], device=case["device"]))

    return _torch_model(case, mark, load)


def _kpk_torch(case: dict[str, Any], mark: Any) -> Any:
    def load(model: Any) -> None:
        import kernelpack

        kernelpack.load_model(model, case["file"], device=case["device"])

    return _torch_model(case, mark, load)


RUNNERS = {"onnx->ort": _onnx_ort, "safetensors->ort": _safetensors_ort, "kpk->ort": _kpk_ort,
           "safetensors->torch": _safetensors_torch, "kpk->torch": _kpk_torch}


# --- the parent: files, cases, table -----------------------------------------------------------
def ppocr_files(name: str, work: str) -> dict[str, str]:
    """The PP-OCR model and its container, exact container, graph + dense safetensors (cached in work)."""
    import importlib.util

    from safetensors.numpy import save_file

    from kernelpack.onnx_io import pack_onnx
    from kernelpack.ort import graph_and_weights

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        sys.exit("needs the PP-OCR models: pip install --no-deps rapidocr-onnxruntime==1.4.4")
    onnx_file = os.path.join(list(spec.submodule_search_locations)[0], "models", PPOCR[name][0])
    files = {"onnx": onnx_file, "kpk": os.path.join(work, f"{name}.kpk"),
             "kpk exact": os.path.join(work, f"{name}.exact.kpk"),
             "safetensors": os.path.join(work, f"{name}.safetensors"), "graph": os.path.join(work, f"{name}.graph")}
    for key, max_error in (("kpk", 0.01), ("kpk exact", None)):
        if not os.path.exists(files[key]):
            begin = time.perf_counter()
            pack_onnx(onnx_file, files[key], max_error=max_error)
            print(f"packed {files[key]} in {time.perf_counter() - begin:.1f} s", flush=True)
    if not os.path.exists(files["safetensors"]):
        graph, weights = graph_and_weights(files["kpk exact"])
        save_file(weights, files["safetensors"])
        with open(files["graph"], "wb") as f:
            f.write(graph)
    return files


def cnn_files(work: str) -> dict[str, str]:
    """The demo CNN (3 epochs) as safetensors, ONNX, and a container with its graph (default plan)."""
    import torch
    from safetensors.torch import save_file

    import kernelpack
    from kernelpack import demo
    from kernelpack.onnx_io import torch_graph
    from kernelpack.ort import GRAPH

    files = {k: os.path.join(work, f"cnn.{k}") for k in ("safetensors", "onnx", "kpk")}
    if not all(map(os.path.exists, files.values())):
        x, y, _, _ = demo.digits()
        model = demo.train(x, y, epochs=3)
        save_file(model.state_dict(), files["safetensors"])
        example = torch.zeros(1, 1, 8, 8)
        export = dict(input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "n"}})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter
            torch.onnx.export(model, (example,), files["onnx"], dynamo=False, **export)
        forms = kernelpack.plan(model, max_error=0.01)
        kernelpack.save(model, files["kpk"], forms=forms, attachments={GRAPH: torch_graph(model, example, **export)})
    return files


def cases(models: list[str], device: str, work: str) -> list[dict[str, Any]]:
    out = []
    for name in models:
        if name == "digits-cnn":
            f = cnn_files(work)
            rows = [("safetensors->torch", f["safetensors"]), ("onnx->ort", f["onnx"]),
                    ("kpk->torch", f["kpk"]), ("kpk->ort", f["kpk"])]
            shape = CNN_INPUT
        else:
            f = ppocr_files(name, work)
            rows = [("onnx->ort", f["onnx"]), ("safetensors->ort", f["safetensors"]),
                    ("kpk->ort", f["kpk"]), ("kpk->ort exact", f["kpk exact"])]
            shape = PPOCR[name][1]
        for label, path in rows:
            out.append({"model": name, "label": label, "kind": label.split(" ")[0], "file": path,
                        "graph": f.get("graph"), "shape": shape, "device": device})
    return out


def measure(case: dict[str, Any]) -> dict[str, Any]:
    """One case in a fresh process. OMP_WAIT_POLICY=PASSIVE: on few cores torch's spinning OpenMP
    threads otherwise make small torch ops wait a time slice (benchmarks/README.md, decode.py)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(case)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        sys.exit(f"{case['model']} {case['label']} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(all_cases: list[dict[str, Any]], results: dict[int, list[dict[str, Any]]]) -> None:
    """One table per model: median phases, file size, ratios to the dense baselines of that model."""
    for model in dict.fromkeys(c["model"] for c in all_cases):
        rows = [(i, c) for i, c in enumerate(all_cases) if c["model"] == model]
        first = {i: statistics.median(r["marks"]["first result"] for r in results[i]) for i, _ in rows}
        steady = {i: statistics.median(r["steady_ms"] for r in results[i]) for i, _ in rows}
        base = {c["label"]: i for i, c in rows if c["label"] in ("onnx->ort", "safetensors->torch")}
        print(f"\n{model} ({'x'.join(map(str, rows[0][1]['shape']))} input, {rows[0][1]['device']})")
        print(f"{'case':18} {'file KB':>8} {'imports':>8} {'weights':>8} {'session':>8} {'first s':>8} "
              + " ".join(f"{'/ ' + b:>20}" for b in base) + f" {'steady ms':>10} {'/ same runtime':>15}")
        for i, c in rows:
            marks = {k: statistics.median(r["marks"].get(k, float("nan")) for r in results[i])
                     for k in ("imports", "weights", "session")}
            ratios = " ".join(f"{first[i] / first[j]:>20.2f}" for j in base.values())
            same = base["safetensors->torch" if c["kind"].endswith("torch") else "onnx->ort"]
            print(f"{c['label']:18} {os.path.getsize(c['file']) / 1024:>8.0f} {marks['imports']:>8.3f} "
                  f"{marks['weights']:>8.3f} {marks['session']:>8.3f} {first[i]:>8.3f} {ratios} "
                  f"{steady[i]:>10.2f} {steady[i] / steady[same]:>15.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="ppocr-cls and digits-cnn, 2 repeats")
    parser.add_argument("--models", nargs="+", choices=[*PPOCR, "digits-cnn"], default=[*PPOCR, "digits-cnn"])
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "kernelpack-load-to-ready"),
                        help="where containers and dense copies are written (kept between runs)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    models, repeats = (["ppocr-cls", "digits-cnn"], 2) if args.quick else (args.models, args.repeats)
    # as an installed package is: bytecode compiled (a child may run with PYTHONDONTWRITEBYTECODE)
    compileall.compile_dir(os.path.join(ROOT, "kernelpack"), quiet=1)
    os.makedirs(args.work, exist_ok=True)
    all_cases = cases(models, args.device, args.work)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.2f}; {repeats} repeats, interleaved")
    results: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(all_cases))}
    for _ in range(repeats):
        for i, case in enumerate(all_cases):
            results[i].append(measure(case))
    for i, case in enumerate(all_cases):  # every case answered the same (first-result checksum)
        sums = {round(r["checksum"], 1) for r in results[i]}
        assert len(sums) == 1, (case, sums)
    report(all_cases, results)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
