"""Coverage-guided fuzzing of the kernelpack reader: atheris (libFuzzer) with the structure-aware
mutators of scripts/fuzz.py.

scripts/fuzz.py makes each input by one mutation of a committed seed; here libFuzzer keeps
every input that reaches new reader code (Python lines and branches, comparisons) in a
corpus and mutates those further, so an input can gather many changes on the way to a
deep check. Mutations: one of ``fuzz.MUTATIONS`` (header fields, preamble, payloads, the
attached ONNX graph as protobuf, raw damage) on the corpus entry, or libFuzzer's own byte
mutation (which uses the compared values it traced); crossover splices two entries.

Targets (``--target``):
  container  the input is a file, read as ``fuzz.probe`` reads it: ``kernelpack.open`` and
             ``verify``, ``load_numpy``, and for a file with ``onnx.graph`` what
             ``ort_session`` reads before ONNX Runtime sees the graph.
  graph      the input is an ONNX ModelProto, attached (re-signed) to a graph seed's container
             and read the same way: the protobuf reader of kernelpack/ort.py meets every input.

The oracle is ``fuzz.probe``'s: an input loads or raises ``KernelpackError`` naming the file.
Anything else is a finding, and so is an input over ``--hang`` seconds; findings are saved
under OUT/findings. The fuzzing runs in a child process under an address-space limit
(``--memory-mb``), so a huge allocation is a ``MemoryError`` finding, not a dead machine;
an input over ``--kill`` seconds makes libFuzzer stop the child (saved under
OUT/artifacts), and the driver starts a new one on the same corpus.

    python scripts/fuzz_atheris.py --limits service --time-limit 1200 --out fuzz-out --report r.json
    python scripts/fuzz_atheris.py --target graph --runs 20000 --out fuzz-graph
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
#: The read path: imported, with every kernelpack module they import, under instrumentation (for
#: coverage); the rest of kernelpack (writers, converters, CLI) is never imported.
READ_PATH = ["kernelpack", "kernelpack.runtime", "kernelpack.ort", "kernelpack._backend"]
#: Of all inputs, this share gets a structure-aware mutation; the rest libFuzzer's byte mutation.
STRUCTURED = 0.7
MAX_LEN = 1 << 18
COVERAGE = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)")


# --- the child: libFuzzer in this process ----------------------------------------------------
class Harness:
    """What libFuzzer calls: the test of one input, the mutators, and the record of what it saw
    (flushed to a JSON file every second: libFuzzer ends the process without Python's exit)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import fuzz  # after instrumentation: scripts/fuzz.py imports kernelpack

        self.fuzz, self.args = fuzz, args
        fuzz.warm_up(0)  # a one-time cost (numba's cache, the bombs) is not an input's hang
        self.limits = fuzz.LIMITS_BY_NAME[args.limits]
        self.seeds = fuzz.seed_files() if args.target == "container" else graphs_of(fuzz.graph_seeds())
        self.names = list(fuzz.WEIGHTS)
        self.weights = [fuzz.WEIGHTS[n] for n in self.names]
        self.folder = tempfile.mkdtemp(prefix="kp-atheris-")
        self.path = os.path.join(self.folder, "input.kpk")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.made: tuple[bytes | None, str] = (None, "")  # the mutator's last output and how it was made
        self.started = self.flushed = time.time()
        self.stats: dict[str, Any] = {"inputs": 0, "outcomes": Counter(), "exception_types": Counter(),
                                      "mutations": Counter(), "findings": [], "hangs": [],
                                      "slowest": {"seconds": 0.0}, "peak_rss_kib": 0, "rss_step": {"kib": 0}}

    # the test
    def test_one_input(self, data: bytes) -> None:
        blob = data if self.args.target == "container" else wrap_graph(self.fuzz, data)
        self.fuzz.put(self.fd, blob)
        rss = peak_rss_kib()
        start = time.perf_counter()
        try:
            outcome = self.fuzz.probe(self.path, "numpy", self.limits)
        except Exception as exc:  # noqa: BLE001 - the finding: anything but KernelpackError
            outcome = type(exc).__name__
            self.finding(blob, outcome, traceback.format_exc()[-3000:])
        seconds = time.perf_counter() - start
        self.record(blob, self.made[1] if self.made[0] == data else "corpus", outcome, seconds, peak_rss_kib() - rss)
        self.maybe_stop()

    def record(self, blob: bytes, mutation: str, outcome: str, seconds: float, rss_step: int) -> None:
        """Count the input (``mutation``: the last mutation that made it; 'corpus' for a corpus entry as read)."""
        s = self.stats
        s["inputs"] += 1
        s["outcomes"][outcome] += 1
        if not outcome.startswith("ok"):
            s["exception_types"][outcome.split(":")[0]] += 1
        s["mutations"][mutation.split(":")[0]] += 1
        if seconds > s["slowest"]["seconds"]:
            s["slowest"] = {"seconds": round(seconds, 4), "outcome": outcome, "mutation": mutation,
                            "input": describe(self.fuzz, blob), "file": self.save(blob, "slowest")}
        if seconds > self.args.hang:
            s["hangs"].append({"seconds": round(seconds, 3), "outcome": outcome, "file": self.save(blob, "hang")})
        if rss_step > s["rss_step"]["kib"]:  # the input that raised the peak most
            s["rss_step"] = {"kib": rss_step, "outcome": outcome, "input": describe(self.fuzz, blob)}

    def finding(self, blob: bytes, exception: str, trace: str) -> None:
        self.stats["findings"].append({"exception": exception, "traceback": trace,
                                       "file": self.save(blob, "finding")})

    def save(self, blob: bytes, kind: str) -> str:
        folder = os.path.join(self.args.out, "findings" if kind != "slowest" else "")
        name = f"slowest-{self.args.target}-{self.args.limits}.kpk" if kind == "slowest" else \
            f"{kind}-{hashlib.sha1(blob).hexdigest()[:16]}.kpk"
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(blob)
        return os.path.relpath(os.path.join(folder, name), self.args.out)

    def maybe_stop(self) -> None:
        now = time.time()
        done = self.stats["inputs"] >= self.args.runs > 0 or (self.args.time_limit and
                                                               now - self.started >= self.args.time_limit)
        if done or now - self.flushed >= 1:
            self.flush()
        if done:
            os._exit(0)

    def flush(self) -> None:
        self.stats["peak_rss_kib"] = peak_rss_kib()
        self.stats["seconds"] = round(time.time() - self.started, 1)
        temporary = self.args.stats + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(self.stats, f, default=str)
        os.replace(temporary, self.args.stats)
        self.flushed = time.time()

    # the mutators
    def mutate(self, data: bytes, max_size: int, seed: int) -> bytes:
        import atheris

        rng = random.Random(seed)
        made = None
        if rng.random() < STRUCTURED:
            made = self.structured(rng, data)
        if made is None or len(made[0]) > max_size:
            made = (atheris.Mutate(data, max_size), "libFuzzer: byte mutation")
        self.made = made
        return made[0]

    def structured(self, rng: random.Random, data: bytes) -> tuple[bytes, str] | None:
        """One of fuzz.py's mutations of ``data``, or of a seed where it does not apply to
        ``data`` (no longer a container, say); None where it applies to neither."""
        if self.args.target == "graph":
            body, what = self.fuzz.mutate_graph(rng, data)
            return body, f"graph: {what}"
        name = rng.choices(self.names, weights=self.weights)[0]
        for base in (data, rng.choice(self.seeds)):
            try:
                made = self.fuzz.MUTATIONS[name][0](rng, base, self.seeds)
            except Exception:  # noqa: BLE001 - a mutation that does not fit this input
                continue
            if made is not None:
                return made[0], f"{name}: {made[1]}" + ("" if base is data else " (of a seed)")
        return None

    def crossover(self, data1: bytes, data2: bytes, max_size: int, seed: int) -> bytes:
        """Two corpus entries combined: for containers a tensor of one grafted into the other
        (re-signed; a byte splice where either does not parse), for graphs the two messages
        concatenated (protobuf merges them)."""
        rng = random.Random(seed)
        if self.args.target == "graph":
            made: tuple[bytes, str] | None = (data1 + data2, "graphs merged")
        else:
            try:
                made = self.fuzz.graft(rng, data1, [data2])
            except Exception:  # noqa: BLE001 - not both containers
                made = None
            made = made or self.fuzz.splice(rng, data1, [data2])
        self.made = (made[0][:max_size], f"crossover: {made[1]}")
        return self.made[0]


def graphs_of(containers: list[bytes]) -> list[bytes]:
    """The ``onnx.graph`` attachments of containers."""
    import kernelpack
    from kernelpack.ort import GRAPH

    out = []
    with tempfile.TemporaryDirectory() as folder:
        for i, blob in enumerate(containers):
            path = os.path.join(folder, f"{i}.kpk")
            with open(path, "wb") as f:
                f.write(blob)
            with kernelpack.open(path) as c:
                out.append(c.read_attachment(GRAPH))
    return out


def wrap_graph(fuzz: Any, graph: bytes) -> bytes:
    """A container holding ``graph`` as its ``onnx.graph`` (graph seed 0's, re-signed)."""
    parts = fuzz.Parts.of(fuzz.graph_seeds()[0])
    ref = parts.header["attachments"][fuzz.ort.GRAPH]
    ref.update(shape=[len(graph)], codec="none")
    parts.replace(ref, graph)
    return parts.blob()


def describe(fuzz: Any, blob: bytes) -> str:
    """What an input is, in one line: its tensors (form, shape, fields) or why it is no container."""
    try:
        header = fuzz.Parts.of(blob).header
        tensors = [f"{name}: {t.get('form')} {t.get('shape')} {t.get('fields', {})}"
                   for name, t in list(header.get("tensors", {}).items())[:4]]
        return f"{len(blob)} bytes; " + "; ".join(fuzz._short(t) for t in tensors)[:400]
    except Exception as exc:  # noqa: BLE001 - damaged beyond parsing
        return f"{len(blob)} bytes, header does not parse ({type(exc).__name__})"


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(args: argparse.Namespace, libfuzzer_args: list[str]) -> None:
    """Fuzz in this process until --runs or --time-limit: libFuzzer with kernelpack's read path
    instrumented, under the address-space limit."""
    if args.memory_mb:
        resource.setrlimit(resource.RLIMIT_AS, (args.memory_mb << 20, args.memory_mb << 20))
    import atheris

    with atheris.instrument_imports(include=["kernelpack"]):
        for module in READ_PATH:
            __import__(module)
    sys.path.insert(0, HERE)
    harness = Harness(args)
    atheris.Setup([sys.argv[0], *libfuzzer_args], harness.test_one_input, custom_mutator=harness.mutate,
                  custom_crossover=harness.crossover)
    atheris.Fuzz()


# --- the driver: children, restarts, the report ---------------------------------------------
def seed_corpus(args: argparse.Namespace) -> str:
    """OUT/corpus, holding the seeds (a run on an existing OUT goes on from its corpus)."""
    sys.path.insert(0, HERE)
    import fuzz

    seeds = fuzz.seed_files() if args.target == "container" else graphs_of(fuzz.graph_seeds())
    corpus = os.path.join(args.out, "corpus")
    os.makedirs(corpus, exist_ok=True)
    for blob in seeds:
        with open(os.path.join(corpus, hashlib.sha1(blob).hexdigest()), "wb") as f:
            f.write(blob)
    return corpus


def drive(args: argparse.Namespace) -> dict[str, Any]:
    """Run children until the inputs or the time are spent; a child that libFuzzer stopped (an
    input over --kill seconds, a crash) is recorded and replaced, on the same corpus."""
    corpus = seed_corpus(args)
    artifacts = os.path.join(args.out, "artifacts") + os.sep
    os.makedirs(artifacts, exist_ok=True)
    started, children, total, coverage, killed = time.time(), [], merged_stats(), None, []
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    while len(children) < args.max_children:
        left_s = args.time_limit - (time.time() - started) if args.time_limit else 0
        left_runs = args.runs - total["inputs"] if args.runs else 0
        if (args.time_limit and left_s < 1) or (args.runs and left_runs <= 0):
            break
        k = len(children)
        stats_file, log_file = os.path.join(args.out, f"stats-{k}.json"), os.path.join(args.out, f"libfuzzer-{k}.log")
        before = set(os.listdir(artifacts))
        command = [sys.executable, os.path.abspath(__file__), "--child", "--stats", stats_file,
                   "--runs", str(left_runs), "--time-limit", str(round(left_s, 1)), *passed_on(args), "--",
                   corpus, f"-seed={args.seed + k}", f"-timeout={args.kill}", "-rss_limit_mb=0",
                   f"-max_len={MAX_LEN}", f"-artifact_prefix={artifacts}", "-use_value_profile=1"]
        with open(log_file, "w", encoding="utf-8") as log:
            rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        children.append(rc)
        stats = load_json(stats_file)
        merge(total, stats)
        coverage = last_coverage(log_file) or coverage
        if rc != 0:  # libFuzzer stopped the child: the input is in artifacts
            new = sorted(set(os.listdir(artifacts)) - before)
            killed.append({"exit_code": rc, "artifacts": new, "log_tail": tail(log_file)})
            total["inputs"] += 1
            kind = new[0].split("-")[0] if new else f"exit {rc}"
            total["exception_types"][kind] += 1
    return report(args, total, coverage, children, killed, time.time() - started, corpus)


def passed_on(args: argparse.Namespace) -> list[str]:
    return ["--target", args.target, "--limits", args.limits, "--hang", str(args.hang),
            "--memory-mb", str(args.memory_mb), "--out", args.out]


def merged_stats() -> dict[str, Any]:
    return {"inputs": 0, "outcomes": Counter(), "exception_types": Counter(), "mutations": Counter(),
            "findings": [], "hangs": [], "slowest": {"seconds": 0.0}, "peak_rss_kib": 0, "rss_step": {"kib": 0}}


def merge(total: dict[str, Any], stats: dict[str, Any]) -> None:
    if not stats:
        return
    total["inputs"] += stats["inputs"]
    for key in ("outcomes", "exception_types", "mutations"):
        total[key].update(stats[key])
    total["findings"] += stats["findings"]
    total["hangs"] += stats["hangs"]
    total["peak_rss_kib"] = max(total["peak_rss_kib"], stats["peak_rss_kib"])
    for key, size in (("slowest", "seconds"), ("rss_step", "kib")):
        if stats[key][size] > total[key][size]:
            total[key] = stats[key]


def load_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):  # the child died before its first flush
        return {}


def last_coverage(log_file: str) -> dict[str, int] | None:
    """libFuzzer's last coverage line: edges (``cov``), features (``ft``), corpus entries."""
    with open(log_file, encoding="utf-8", errors="replace") as f:
        found = COVERAGE.findall(f.read())
    if not found:
        return None
    cov, ft, corp = map(int, found[-1])
    return {"edges": cov, "features": ft, "corpus": corp}


def tail(log_file: str) -> str:
    with open(log_file, encoding="utf-8", errors="replace") as f:
        return f.read()[-3000:]


def report(args: argparse.Namespace, total: dict[str, Any], coverage: dict[str, int] | None,
           children: list[int], killed: list[dict], seconds: float, corpus: str) -> dict[str, Any]:
    import kernelpack

    fields = sorted(str(f) for f in kernelpack.Limits.__dataclass_fields__)
    limits = {f: getattr(__import__("fuzz").LIMITS_BY_NAME[args.limits], f) for f in fields}
    exceptions = Counter(total["exception_types"])
    return {
        "command": " ".join(["python", "scripts/fuzz_atheris.py", *sys.argv[1:]]),
        "target": args.target, "limits": args.limits, "limits_fields": limits, "seed": args.seed,
        "inputs": total["inputs"], "seconds": round(seconds, 1),
        "inputs_per_second": round(total["inputs"] / max(seconds, 1e-9), 1),
        "coverage": coverage, "corpus_files": len(os.listdir(corpus)),
        "exception_types": dict((+exceptions).most_common()),
        "loaded": sum(n for o, n in total["outcomes"].items() if o.startswith("ok")),
        "error_fields": len([o for o in total["outcomes"] if o.startswith("KernelpackError")]),
        "outcomes": dict(Counter(total["outcomes"]).most_common(40)),
        "mutations": dict(Counter(total["mutations"]).most_common()),
        "slowest": total["slowest"], "peak_rss_mib": round(total["peak_rss_kib"] / 1024, 1),
        "largest_rss_step": total["rss_step"], "memory_limit_mb": args.memory_mb,
        "hang_seconds": args.hang, "hangs": total["hangs"][:20], "hang_count": len(total["hangs"]),
        "findings": total["findings"][:20], "finding_count": len(total["findings"]) + len(killed),
        "children": children, "stopped_by_libfuzzer": killed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=["container", "graph"], default="container")
    parser.add_argument("--limits", choices=["default", "service"], default="default",
                        help="kernelpack.Limits() or Limits(max_decoded_bytes=16 MiB)")
    parser.add_argument("--runs", type=int, default=0, help="inputs to run (0: until --time-limit)")
    parser.add_argument("--time-limit", type=float, default=0, help="seconds to run (0: until --runs)")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's seed (child k gets seed + k)")
    parser.add_argument("--hang", type=float, default=1.0, help="an input over this many seconds is a hang")
    parser.add_argument("--kill", type=int, default=30, help="libFuzzer stops an input after this many seconds")
    parser.add_argument("--memory-mb", type=int, default=8192, help="address-space limit of the child (0: none)")
    parser.add_argument("--max-children", type=int, default=20, help="give up after this many children")
    parser.add_argument("--out", default="fuzz-out", help="corpus, findings, logs")
    parser.add_argument("--report", help="write the JSON report here too")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    args, libfuzzer_args = parser.parse_known_args()
    if not (args.runs or args.time_limit):
        parser.error("give --runs or --time-limit")
    args.out = os.path.abspath(args.out)
    if args.child:
        child(args, [a for a in libfuzzer_args if a != "--"])
        return 0
    result = drive(args)
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 1 if result["finding_count"] or result["hang_count"] else 0


if __name__ == "__main__":
    sys.exit(main())
