"""``kernelpack serve`` under load, against ONNX Runtime called in-process; Triton start-to-ready.

HTTP: ``kernelpack serve`` (a separate process on loopback, ``--device cpu --threads T``)
serves the PP-OCR direction classifier packed exactly. For 1, 4 and 16 concurrent clients,
each on its own keep-alive connection, sending a prepared binary ``.npy`` body of one 48x192
line and reading the JSON answer. The client (``--client``) is ``wrk`` (C, one thread driving
all the connections, a Lua script posting the body; every answer must be 2xx) when it is on
PATH, else Python threads with ``http.client`` in this process, which cost the shared CPU
several times more per request than wrk. The baseline is the same work without HTTP: an ORT
session built from the same container with the same session options (``threads // workers``
intra-op threads), called with the same input by as many Python threads at once, at most
``workers`` of them inside ``run`` (the service's pool). Each level alternates the two sides
for ``--rounds`` rounds (serve, in-process, serve, ...: on a shared machine a swing of its load
then hits both); a wrk round lasts ``--seconds`` (rounded to whole seconds), a Python one
``--seconds`` or ``--requests`` per client, whichever ends first (bounded, self-stopping).
Reported per level, medians over the rounds: requests per second, p50 and p99 latency, the
``serve / in-process`` throughput of each round; and the client used and the load average.

Triton (``--triton``, needs nvidia-pytriton and tritonclient, tests/test_triton.py): seconds
from starting ``tritonserver`` to the model READY, for the container (``kernelpack
triton-config``) and the same model as a dense ONNX file through the same Python-backend class,
``--runs`` fresh servers each, medians.

    python benchmarks/serve_load.py [--seconds 2] [--rounds 3] [--threads 2] [--client auto|wrk|python]
    python benchmarks/serve_load.py --triton [--runs 5]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests")]
from ocr_inputs import CLS, cls_batch, ppocr_model  # noqa: E402

from kernelpack import serve  # noqa: E402

LEVELS = (1, 4, 16)


def drive(clients: int, seconds: float, requests: int, call: Callable[[int], Callable[[], None]]) -> dict:
    """``clients`` threads, each calling its ``call(i)()`` until the deadline or ``requests``
    calls; requests per second over the wall time, latency percentiles in ms."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        once = call(i)
        barrier.wait()
        deadline = time.perf_counter() + seconds
        while len(latencies[i]) < requests and time.perf_counter() < deadline:
            start = time.perf_counter()
            once()
            latencies[i].append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    every = np.sort(np.concatenate([np.asarray(x) for x in latencies]))
    return {"clients": clients, "requests": int(every.size), "rps": every.size / wall,
            "p50_ms": float(np.percentile(every, 50) * 1e3), "p99_ms": float(np.percentile(every, 99) * 1e3)}


def median_of(items: list) -> dict | float:
    """The median of numbers, or key by key of dicts of numbers."""
    if isinstance(items[0], dict):
        return {key: median_of([item[key] for item in items]) for key in items[0]}
    return statistics.median(items)


def http_caller(port: int, body: bytes) -> Callable[[int], Callable[[], None]]:
    headers = {"Content-Type": "application/x-npy", "Content-Length": str(len(body))}

    def make(_: int) -> Callable[[], None]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

        def once() -> None:
            connection.request("POST", "/predict", body, headers)
            response = connection.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(data[:200])

        return once

    return make


def wrk_drive(clients: int, seconds: float, port: int, script: str) -> dict:
    """``wrk`` with ``clients`` connections on one thread for ``seconds`` (whole, at least 1):
    requests per second and its p50 / p99 latency; any non-2xx answer or socket error fails."""
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--latency", "-s", script,
                          f"http://127.0.0.1:{port}/predict"], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def percentile(p: int) -> float:
        value, unit = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)$", out, re.M).groups()
        return float(value) * scale[unit]

    return {"clients": clients, "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": percentile(50), "p99_ms": percentile(99)}


def wrk_script(folder: str, body_file: str) -> str:
    """A wrk Lua script that POSTs ``body_file`` as ``application/x-npy``."""
    path = os.path.join(folder, "post.lua")
    with open(path, "w") as f:
        f.write(f'local f = assert(io.open({json.dumps(body_file)}, "rb"))\nwrk.method = "POST"\n'
                'wrk.body = f:read("*all")\nf:close()\nwrk.headers["Content-Type"] = "application/x-npy"\n')
    return path


def inprocess_caller(container: str, settings: serve.Settings, x: np.ndarray) -> Callable[[int], Callable[[], None]]:
    model = serve.Model(container, ["CPUExecutionProvider"], intra_op_threads=settings.intra_op_threads)
    slots = threading.Semaphore(settings.workers)

    def make(_: int) -> Callable[[], None]:
        def once() -> None:
            with slots:
                model.session.run(None, {"x": x})

        return once

    return make


def http_table(args: argparse.Namespace) -> list[dict]:
    x = cls_batch(1, seed=0)
    stream = io.BytesIO()
    np.save(stream, x)
    body = stream.getvalue()
    with tempfile.TemporaryDirectory() as folder:
        if args.client == "wrk":
            body_file = os.path.join(folder, "x.npy")
            with open(body_file, "wb") as f:
                f.write(body)
            script = wrk_script(folder, body_file)
        container = os.path.join(folder, "cls.kpk")
        from kernelpack.onnx_io import pack_onnx

        pack_onnx(ppocr_model(CLS), container, max_error=None, level=3)
        settings = serve.service_settings(args.threads, [])
        process = subprocess.Popen([sys.executable, "-m", "kernelpack", "serve", container, "--port", "0",
                                    "--device", "cpu", "--threads", str(settings.threads)],
                                   stdout=subprocess.PIPE, text=True)
        try:
            line = process.stdout.readline()
            port = int(re.search(r":(\d+) with", line).group(1))
            print(line.strip(), file=sys.stderr)
            local = inprocess_caller(container, settings, x)
            rows = []
            for clients in LEVELS:
                rounds = []
                for _ in range(args.rounds):  # serve, then in-process, then again: a load swing hits both
                    if args.client == "wrk":
                        served = wrk_drive(clients, args.seconds, port, script)
                    else:
                        served = drive(clients, args.seconds, args.requests, http_caller(port, body))
                    direct = drive(clients, args.seconds, args.requests, local)
                    rounds.append({"serve": served, "in_process": direct, "ratio": served["rps"] / direct["rps"],
                                   "load_average": os.getloadavg()[0]})
                    print(json.dumps({"clients": clients, **rounds[-1]}), file=sys.stderr)
                rows.append({"clients": clients, "client": args.client, "rounds": rounds,
                             **{key: median_of([r[key] for r in rounds]) for key in rounds[0]}})
        finally:
            process.terminate()
            process.wait(timeout=60)
    return rows


def triton_table(args: argparse.Namespace) -> dict:
    import triton_server

    from kernelpack.onnx_io import pack_onnx
    from kernelpack.triton_backend import write_model_dir

    times: dict[str, list[float]] = {"container": [], "dense": []}
    with tempfile.TemporaryDirectory() as folder:
        container = os.path.join(folder, "cls.kpk")
        pack_onnx(ppocr_model(CLS), container, max_error=None, level=3)
        repos = {"container": os.path.join(folder, "c"), "dense": os.path.join(folder, "d")}
        model_dir = write_model_dir(container, repos["container"])
        triton_server.dense_model_dir(ppocr_model(CLS), model_dir, repos["dense"], "cls")
        for _ in range(args.runs):
            for kind, repo in repos.items():
                server = triton_server.Server(repo, "cls", folder)
                times[kind].append(server.seconds_to_ready)
                server.stop()
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"runs": args.runs, "seconds_to_ready": times, "median": medians,
            "ratio": medians["container"] / medians["dense"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per round and side (default 2)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="serve / in-process rounds per level, alternating; medians reported (default 3)")
    parser.add_argument("--requests", type=int, default=2000, help="most requests per client (default 2000)")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator: wrk if on PATH (auto, default), or Python threads")
    parser.add_argument("--triton", action="store_true", help="Triton start-to-ready instead")
    parser.add_argument("--runs", type=int, default=5, help="fresh Triton servers per model (default 5)")
    args = parser.parse_args()
    if args.triton:
        print(json.dumps(triton_table(args)))
        return
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "python"
    rows = http_table(args)
    print(f"client: {args.client}; {args.rounds} rounds of {args.seconds} s a side per level, medians; "
          "load average (median per level): " + ", ".join(f"{r['load_average']:.2f}" for r in rows))
    print("| clients | serve req/s | p50 ms | p99 ms | in-process req/s | p50 ms | p99 ms | serve / in-process |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s, d = r["serve"], r["in_process"]
        print(f"| {r['clients']} | {s['rps']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {d['rps']:.0f} | "
              f"{d['p50_ms']:.2f} | {d['p99_ms']:.2f} | {r['ratio']:.2f} |")


if __name__ == "__main__":
    main()
