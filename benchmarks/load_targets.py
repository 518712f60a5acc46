"""Issue 15's load figures, each as a ratio measured in the same run: whole-model loads of a
ResNet-50-shaped container per form against ``safetensors.numpy.load_file`` of the float32
state dict, on one thread and on two, with peak RSS; 1000 tiny tensors; and the import of
kernelpack on the ONNX Runtime path against that of onnxruntime.

Every figure comes from a fresh child process (so peak RSS is the load's own):

* **1 thread**: ``load_numpy(path, threads=1)`` with ``OPENBLAS_NUM_THREADS=1`` (and
  OMP's), so one core does all the work; the baseline child is the same safetensors load;
* **2 threads**: ``load_numpy(path, threads=2)`` with BLAS's default threads;
* **peak RSS / output**: the child's high-water RSS during its first load (VmHWM, reset
  just before it, minus the RSS then) over the bytes of the dense float32 result;
* each child times a warm-up and ``--repeats`` loads and reports their median; contenders
  run interleaved, one round after another, and each figure is the median over ``--rounds``
  rounds, so a change of the shared machine's load hits every contender;
* **1000 tiny tensors**: 1000 float32 tensors of 16 values, dense (``Dense('float32')``:
  stored as they are), load_numpy against safetensors' load_file;
* **declared work at GEMM speed**: the work the container's header declares for the whole
  load (what kernelpack.Limits bounds: float64 multiply-adds of the decode's products plus
  16 per element read and written), at the float64 GEMM rate measured in the same run on one
  thread: roughly the time the decode would take if every operation ran as fast as a large
  matrix product does;
* **import**: in one child that has imported nothing else, ``import onnxruntime`` (numpy
  included: onnxruntime needs it) then ``import kernelpack``, each timed (bytecode compiled
  beforehand, as an installed package has it).

The state dict is benchmarks/pack.py's ResNet-50 (267 tensors, 25.6M parameters, initialised
as benchmarks/decode.py's whole-model rows); each form goes on the weights it suits
(``pack.FORMS``: ``decode.MODEL_FORMS`` and int8 codes, ``Dense(rel_step=0.05)``), float16
on the rest. The saves of those containers are timed first, as benchmarks/pack.py times
them (interleaved with safetensors.numpy.save_file, median of the rounds), at the default
zstd level (19) and at the fast pack's (3).
Files sit in the page cache. ``float64 GEMM GFLOP/s`` (one thread, a 1024^3 product) is
printed as the bound of the product-heavy forms.

    python benchmarks/load_targets.py                # 3 rounds (minutes: packs the containers first)
    python benchmarks/load_targets.py --quick        # width-16 ResNet-50, 1 round
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ROOT = HERE.parent

#: Issue 15's targets: ratio to safetensors on one thread, per form label prefix.
TARGETS = {"dense fp16": 1.2, "quant": 1.5, "basis": 0.8, "series": 0.5, "linear": 0.3, "dct": 0.15}
SAVE_SECONDS_TARGET = 30.0
DENSE_SAVE_TARGET = 5.0
#: The fast pack's zstd level, timed beside the default (19: the smallest files).
FAST_LEVEL = 3
TWO_THREAD_TARGET = 1.7
RSS_TARGET = 1.5
TINY_TARGET = 2.0
IMPORT_TARGET = 0.3


# --- children ------------------------------------------------------------------------------
def status_kib(field: str) -> int:
    """A memory figure of this process in KiB from /proc/self/status (VmRSS: now; VmHWM: the
    peak since the last reset). ``ru_maxrss`` would not do: it keeps the parent's peak
    across fork and exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0: /proc/PID/clear_refs, value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(case: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process: median load seconds and the first load's peak RSS."""
    if case["kind"] == "import":
        start = time.perf_counter()
        import onnxruntime  # noqa: F401

        middle = time.perf_counter()
        import kernelpack  # noqa: F401

        return {"onnxruntime": middle - start, "kernelpack": time.perf_counter() - middle}
    if case["kind"] == "safetensors":
        from safetensors.numpy import load_file

        load = lambda: load_file(case["path"])  # noqa: E731
    else:
        import kernelpack

        load = lambda: kernelpack.load_numpy(case["path"], threads=case["threads"])  # noqa: E731
    reset_peak()
    before = status_kib("VmRSS")
    first = load()
    peak = status_kib("VmHWM") - before
    out_bytes = sum(a.nbytes for a in first.values())
    del first
    times = []
    for _ in range(case["repeats"]):
        start = time.perf_counter()
        load()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_rss": peak * 1024 / out_bytes}


def run_child(case: dict[str, Any], one_core: bool) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if one_core:
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- parent --------------------------------------------------------------------------------
def containers(folder: str, state: dict[str, Any], wanted: list[str]) -> tuple[list[tuple[str, str]], str]:
    """(label, path) of each wanted form's container (benchmarks/pack.py's FORMS) and the
    safetensors file of ``state``."""
    import kernelpack
    from kernelpack.forms import Dense
    from pack import FORMS
    from safetensors.numpy import save_file

    fallback = Dense("float16")
    paths = []
    for label, config, takes in FORMS:
        if label.split()[0] not in wanted:
            continue
        path = os.path.join(folder, f"{label.split()[0]}-{len(paths)}.kpk")
        start = time.perf_counter()
        kernelpack.save(state, path, forms=lambda name, w, c=config, t=takes: c if t(w.shape) else fallback)
        print(f"  packed {label}: {os.path.getsize(path) / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s",
              flush=True)
        paths.append((label, path))
    dense = os.path.join(folder, "state.safetensors")
    save_file(state, dense)
    return paths, dense


def tiny_files(folder: str) -> tuple[str, str]:
    import numpy as np

    import kernelpack
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    state = {f"layer{i}.weight": rng.standard_normal(16).astype(np.float32) for i in range(1000)}
    kpk, st = os.path.join(folder, "tiny.kpk"), os.path.join(folder, "tiny.safetensors")
    kernelpack.save(state, kpk, forms={"*": kernelpack.Dense("float32")})
    save_file(state, st)
    return kpk, st


def declared_work(path: str) -> int:
    """The work a whole load of ``path`` declares (spec/FORMAT.md section 5: float64
    multiply-adds of its products plus ELEMENT_WORK per element read and written)."""
    import kernelpack

    with kernelpack.open(path) as c:
        return sum(c.cost(name).work for name in c.keys())


def bounds(tiny_kpk: str) -> tuple[list[str], float]:
    """What bounds the loads, measured here: the machine's float64 GEMM, fresh memory, SHA-256,
    zstd and float16 widening throughput, and the per-tensor cost of opening a container."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import zstandard
    from threadpoolctl import threadpool_limits

    import kernelpack
    from decode import median_seconds
    from kernelpack._backend import float16_to_float32

    def best_seconds(fn: Any) -> float:
        return median_seconds(fn, 5)

    a = np.random.default_rng(0).standard_normal((1024, 1024))
    gemm = {}
    for threads in (1, 2):
        with threadpool_limits(threads, "blas"):
            gemm[threads] = 2 * 1024 ** 3 / best_seconds(lambda: a @ a) / 1e9
    with threadpool_limits(1, "blas"), ThreadPoolExecutor(2) as pool:  # as a load's pool runs them
        gemm["pool"] = 2 * 2 * 1024 ** 3 / best_seconds(lambda: list(pool.map(lambda _: a @ a, range(2)))) / 1e9
    n = 1 << 24  # 64 MB of float32, a new array each time (as a load's outputs are)
    fill = {1: 4 * n / best_seconds(lambda: np.full(n, 1.0, np.float32)) / 1e6}
    with ThreadPoolExecutor(2) as pool:
        fill[2] = 4 * n / best_seconds(lambda: list(pool.map(lambda _: np.full(n // 2, 1.0, np.float32), range(2)))) / 1e6
    half = (np.random.default_rng(1).standard_normal(n) * 0.05).astype(np.float16)
    raw = half.tobytes()
    sha = len(raw) / best_seconds(lambda: hashlib.sha256(raw).digest()) / 1e6
    frame = zstandard.ZstdCompressor(level=3).compress(raw)
    unzstd = len(raw) / best_seconds(lambda: zstandard.ZstdDecompressor().decompress(frame)) / 1e6
    cast = n / best_seconds(lambda: half.astype(np.float32)) / 1e6
    ours = n / best_seconds(lambda: float16_to_float32(half)) / 1e6
    per_tensor = best_seconds(lambda: kernelpack.open(tiny_kpk).close()) / 1000 * 1e6
    return ([f"- float64 GEMM (1024^3): {gemm[1]:.1f} GFLOP/s on one BLAS thread, {gemm[2]:.1f} on two; two "
            f"one-thread products at once on two threads: {gemm['pool']:.1f} in all ({gemm['pool'] / gemm[1]:.2f}x)",
            f"- memory fill (np.full, a new 64 MB float32 array): {fill[1]:.0f} MB/s on one thread, {fill[2]:.0f} MB/s "
            f"on two ({fill[2] / fill[1]:.2f}x)",
            f"- SHA-256 (hashlib, one thread): {sha:.0f} MB/s; zstd decompression (level-3 frame of float16 "
            f"weights): {unzstd:.0f} MB/s of output",
            f"- float16 -> float32: numpy's cast {cast:.0f} M elements/s, kernelpack's {ours:.0f} M elements/s",
            f"- opening a container (header read and checked): {per_tensor:.1f} us per tensor (1000-tensor file)"],
            gemm[1])


def median_of(rounds: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="width-16 ResNet-50, one round")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed loads per child (default 3)")
    parser.add_argument("--forms", default="dense,dct,series,basis,linear,quant",
                        help="comma-separated forms (first word of the labels; default all)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    compileall.compile_dir(str(ROOT / "kernelpack"), quiet=1)  # as installed: bytecode present
    from decode import environment

    print(environment() + "\n")
    from decode import model_weights
    from pack import contenders, resnet50
    from pack import rounds as save_rounds
    from pack import table as save_table

    state = model_weights(resnet50(16 if args.quick else 64))
    mb = sum(w.nbytes for w in state.values()) / 1e6
    with tempfile.TemporaryDirectory() as folder:
        saves = save_rounds(contenders(args.forms.split(","), FAST_LEVEL), state, folder, rounds)
        forms, dense = containers(folder, state, args.forms.split(","))
        tiny_kpk, tiny_st = tiny_files(folder)
        bounds_lines, gflops = bounds(tiny_kpk)
        works = {label: declared_work(path) for label, path in forms}
        cases: dict[str, tuple[dict[str, Any], bool]] = {
            "safetensors, 1 core": ({"kind": "safetensors", "path": dense}, True),
            "tiny kpk": ({"kind": "kpk", "path": tiny_kpk, "threads": None}, True),
            "tiny safetensors": ({"kind": "safetensors", "path": tiny_st}, True),
            "import": ({"kind": "import"}, False)}
        for label, path in forms:
            cases[f"{label}, 1"] = ({"kind": "kpk", "path": path, "threads": 1}, True)
            cases[f"{label}, 2"] = ({"kind": "kpk", "path": path, "threads": 2}, False)
        got: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
        for r in range(rounds):
            for name, (case, one_core) in cases.items():
                got[name].append(run_child(dict(case, repeats=args.repeats), one_core))
            print(f"  round {r + 1} of {rounds} done", flush=True)
    base = median_of(got["safetensors, 1 core"], "seconds")
    print(f"\nResNet-50 shapes, {mb:.1f} MB of float32; safetensors.numpy.load_file {base * 1e3:.1f} ms "
          f"({mb / base:.0f} MB/s)\n")
    print("| form | 1 thread ms | / safetensors (higher is faster) | target | declared work at GEMM speed, ms "
          "| 2 threads ms | 2 / 1 thread | target | peak RSS / output, 1 thread | 2 threads | target |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, _ in forms:
        one, two = got[f"{label}, 1"], got[f"{label}, 2"]
        s1, s2 = median_of(one, "seconds"), median_of(two, "seconds")
        target = next(v for k, v in TARGETS.items() if label.startswith(k))
        at_gemm = works[label] / (gflops / 2 * 1e9) * 1e3  # a multiply-add is two flops
        print(f"| {label} | {s1 * 1e3:.1f} | {base / s1:.3f} | {target} | {at_gemm:.0f} | {s2 * 1e3:.1f} | {s1 / s2:.2f} "
              f"| {TWO_THREAD_TARGET} | {median_of(one, 'peak_rss'):.2f} | {median_of(two, 'peak_rss'):.2f} "
              f"| {RSS_TARGET} |")
    base_save = saves["safetensors float32"][0]
    slowest = max(seconds for label, (seconds, _, _) in saves.items() if label.endswith("level default"))
    dense = {level: next(seconds for label, (seconds, _, _) in saves.items()
                         if label.startswith("dense") and label.endswith(f"level {level}")) for level in ("default", FAST_LEVEL)}
    print(f"\nsave (benchmarks/pack.py's contenders at the default level and at {FAST_LEVEL}, median of {rounds} "
          f"interleaved rounds, before the loads):\n\n{save_table(saves)}\n\nslowest single-form save at the "
          f"default level {slowest:.2f} s (target <= {SAVE_SECONDS_TARGET:.0f} s); dense float16 "
          f"{dense['default'] / base_save:.2f}x safetensors.numpy.save_file at the default level, "
          f"{dense[FAST_LEVEL] / base_save:.2f}x at level {FAST_LEVEL} (target <= {DENSE_SAVE_TARGET}x)")
    tk, ts = median_of(got["tiny kpk"], "seconds"), median_of(got["tiny safetensors"], "seconds")
    print(f"\n1000 tensors of 16 float32: kernelpack {tk * 1e3:.2f} ms, safetensors {ts * 1e3:.2f} ms: "
          f"{tk / ts:.1f}x (target <= {TINY_TARGET}x)")
    ik, io = median_of(got["import"], "kernelpack"), median_of(got["import"], "onnxruntime")
    print(f"import kernelpack after onnxruntime {ik * 1e3:.1f} ms, import onnxruntime {io * 1e3:.1f} ms: "
          f"{ik / io:.2f}x (target <= {IMPORT_TARGET}x)")
    print("\nBounds, measured in this run:\n\n" + "\n".join(bounds_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
