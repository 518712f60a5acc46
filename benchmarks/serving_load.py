"""Serving under load: latency of one request alone vs 8 at once, and what parsing a body costs.

The service (``serving/http_service.py``, a separate process on loopback, CPU) serves the
PP-OCR direction classifier packed exactly from the rapidocr-onnxruntime wheel. For each
``--workers`` setting it measures:

* ``single``: the median latency of ``--requests`` requests sent one after another;
* ``concurrent``: ``--clients`` client threads (8) released together, one request each,
  ``--rounds`` times; the median latency of all those requests, and the round's throughput.

``ratio = concurrent / single``: a service that runs one request at a time approaches
``clients`` (8); one that runs them all in parallel approaches 1, or ``clients / cores``
once the cores are busy (a 2-core machine cannot do better than about 4). Bodies are
encoded before timing and responses are read, not parsed, so the client costs little.

Then, in-process: the peak Python memory of parsing one body into feeds (``tracemalloc``),
per body byte, the factor that relates ``max_inflight_bytes`` to memory: for the request's
float32 values as ``json.dumps`` writes them, and for the same shape of ``0.5`` (short
numbers: the most values, hence Python objects, per byte).

    python benchmarks/serving_load.py                  # workers 1 and cores, batch 1
    python benchmarks/serving_load.py --workers 1 2 4 --batch 4
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "serving"), os.path.join(ROOT, "tests")]
import http_service  # noqa: E402
from ocr_inputs import CLS, ppocr_model  # noqa: E402


def post(port: int, body: bytes) -> float:
    """Seconds for one POST /predict on a fresh connection, response read (not parsed)."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"the service answered {response.status}")
    finally:
        connection.close()
    return time.perf_counter() - start


def concurrent_round(port: int, body: bytes, clients: int) -> tuple[list[float], float]:
    """``clients`` requests released at once: their latencies and the round's wall time."""
    barrier, latencies = threading.Barrier(clients + 1), []
    lock = threading.Lock()

    def client() -> None:
        barrier.wait()
        seconds = post(port, body)
        with lock:
            latencies.append(seconds)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - start


def measure(container: str, workers: int, body: bytes, args: argparse.Namespace) -> dict:
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "serving", "http_service.py"), container,
                                "--port", "0", "--cpu", "--set", f"workers={workers}"],
                               stdout=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r":(\d+) with", process.stdout.readline()).group(1))
        for _ in range(3):
            post(port, body)  # warm up
        single = statistics.median(post(port, body) for _ in range(args.requests))
        latencies, walls = [], []
        for _ in range(args.rounds):
            round_latencies, wall = concurrent_round(port, body, args.clients)
            latencies += round_latencies
            walls.append(wall)
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    concurrent = statistics.median(latencies)
    return {"workers": workers, "intra_op_threads": max(1, http_service.cores() // workers),
            "single_ms": 1e3 * single, "concurrent_ms": 1e3 * concurrent, "ratio": concurrent / single,
            "requests_per_s": args.clients / statistics.median(walls)}


def parse_memory(container: str, body: bytes) -> dict:
    """Peak traced memory of body -> feeds, per body byte."""
    model = http_service.Model(container, ["CPUExecutionProvider"])
    tracemalloc.start()
    model.feeds(http_service.parse_json(body, http_service.Settings()))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"body_bytes": len(body), "parse_peak_bytes": peak, "per_body_byte": peak / len(body)}


def request_body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": {"x": x.tolist()}}).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, http_service.cores()}))
    parser.add_argument("--batch", type=int, default=1, help="lines per request (1, 3, 48, 192 each)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20, help="sequential requests for `single`")
    parser.add_argument("--rounds", type=int, default=5, help="concurrent rounds")
    args = parser.parse_args()

    from kernelpack.onnx_io import pack_onnx

    x = np.random.default_rng(0).standard_normal((args.batch, 3, 48, 192)).astype(np.float32)
    body = request_body(x)
    with tempfile.TemporaryDirectory() as folder:
        container = os.path.join(folder, "cls.kpk")
        pack_onnx(ppocr_model(CLS), container, max_error=None, level=3)
        rows = [measure(container, w, body, args) for w in args.workers]
        memory = {"float32 values": parse_memory(container, body),  # the worst case: short numbers
                  "0.5 everywhere": parse_memory(container, request_body(np.full_like(x, 0.5)))}
    print(f"{http_service.cores()} cores, body {len(body)} bytes, {args.clients} clients")
    print(f"{'workers':>7} {'intra':>5} {'single ms':>10} {f'{args.clients}-at-once ms':>13} {'ratio':>6} {'req/s':>7}")
    for r in rows:
        print(f"{r['workers']:>7} {r['intra_op_threads']:>5} {r['single_ms']:>10.1f} {r['concurrent_ms']:>13.1f} "
              f"{r['ratio']:>6.2f} {r['requests_per_s']:>7.1f}")
    for name, m in memory.items():
        print(f"parsing {name}: body {m['body_bytes']} bytes, peak {m['parse_peak_bytes']} bytes, "
              f"{m['per_body_byte']:.1f} per body byte")
    print(json.dumps({"cores": http_service.cores(), "rows": rows, "parse": memory}))


if __name__ == "__main__":
    main()
