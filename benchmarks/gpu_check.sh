#!/usr/bin/env bash
# The GPU check in one command (issue 17), <= 5 minutes on one GPU:
#   1. the CUDA tests (pytest -m cuda);
#   2. kernelpack verify --device cuda on every conformance vector (spec/vectors, spec/vectors/versions)
#      and on the model-sized containers built in step 3: every digest must match the CPU's;
#   3. GPU decode throughput per form on model-sized containers (ResNet-50 shapes dense float16;
#      ResNet-18 3x3 convolutions in dct, series, basis, and linear on the fc): load(device="cuda")
#      time against torch.load of the same dense float32 tensors to the GPU and against the
#      host->device copy of them (pinned and pageable), measured in the same run;
#   4. load-to-ready: load(device="cuda") + first forward, and kernelpack.ort_session with the ORT
#      CUDA provider + first run, against the dense files.
# Figures go to benchmarks/GPU.md (or --out FILE).
#
#   benchmarks/gpu_check.sh            # on a machine with a CUDA GPU and torch with CUDA
#   benchmarks/gpu_check.sh --dry-run  # no GPU: shape-scaled containers, CPU decode, no timing claims,
#                                      # figures to a temporary file; checks the script's non-GPU parts
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
OUT=benchmarks/GPU.md
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; OUT=$(mktemp --suffix=.md) ;;
    --out) OUT="$2"; shift ;;
    *) echo "gpu_check: unknown argument $1 (use --dry-run, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python}

if [ "$DRY" = 0 ]; then
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: error: no CUDA device visible to torch (nvidia-smi: $(nvidia-smi -L 2>/dev/null | head -1 || true)$(command -v nvidia-smi >/dev/null || echo not installed));" \
         "this check needs one GPU and a CUDA build of torch. Use --dry-run for the non-GPU parts." >&2
    exit 3
  fi
  DEVICE=cuda
  timeout 120 "$PY" -m pytest -q -m cuda tests/ 2>&1 | tail -3 | tee /tmp/gpu_check_pytest.txt
else
  DEVICE=cpu
  echo "gpu_check: --dry-run: CUDA tests skipped, verify and decode on the CPU" > /tmp/gpu_check_pytest.txt
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
fails=0
vectors=0
for f in spec/vectors/*.kpk spec/vectors/versions/*.kpk; do
  [ -e "$f" ] || continue
  vectors=$((vectors + 1))
  # the device's verdict must be the CPU's, tensor by tensor (a file the CPU refuses is refused alike)
  cpu_rc=0; dev_rc=0
  "$PY" -m kernelpack verify -v --device cpu "$f" 2>&1 | grep -E '^(OK|MISMATCH|CORRUPT|ERROR) ' > "$WORK/cpu.txt" || cpu_rc=$?
  "$PY" -m kernelpack verify -v --device "$DEVICE" "$f" > "$WORK/dev_all.txt" 2>&1 || dev_rc=$?
  grep -E '^(OK|MISMATCH|CORRUPT|ERROR) ' "$WORK/dev_all.txt" > "$WORK/dev.txt" || true
  if grep -q '^MISMATCH' "$WORK/dev.txt" || ! cmp -s "$WORK/cpu.txt" "$WORK/dev.txt"; then
    fails=$((fails + 1)); echo "DIFFERS from the CPU: $f: $(tail -1 "$WORK/dev_all.txt")"
  fi
done
echo "verify --device $DEVICE: $vectors conformance files, $fails failed"

DRY=$DRY DEVICE=$DEVICE WORK=$WORK OUT=$OUT VECTORS=$vectors VFAILS=$fails timeout 240 "$PY" - <<'PY'
"""Steps 3 and 4: build the containers, verify them on the device, time decode and load-to-ready."""
import os, statistics, subprocess, sys, time

import numpy as np
import torch

import kernelpack
from kernelpack.forms import config_from_dict

dry, device, work = os.environ["DRY"] == "1", os.environ["DEVICE"], os.environ["WORK"]
scale = 8 if dry else 1  # --dry-run: channels / 8, the same code path


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeat=3):
    fn(); sync()  # warm-up
    runs = []
    for _ in range(repeat):
        start = time.perf_counter(); fn(); sync(); runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def he(shape, rng):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / max(1, np.prod(shape[1:])))).astype(np.float32)


def resnet50_shapes():
    shapes, c_in = {"conv1.weight": (64 // scale, 3, 7, 7)}, 64 // scale
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        w, out = width // scale, 4 * width // scale
        for b in range(blocks):
            p = f"layer{stage + 1}.{b}."
            shapes.update({p + "conv1.weight": (w, c_in, 1, 1), p + "conv2.weight": (w, w, 3, 3),
                           p + "conv3.weight": (out, w, 1, 1)})
            if b == 0:
                shapes[p + "downsample.weight"] = (out, c_in, 1, 1)
            c_in = out
    shapes["fc.weight"] = (1000, c_in)
    return shapes


def resnet18_convs():
    shapes, c_in = {}, 64 // scale
    for stage, width in enumerate((64, 128, 256, 512)):
        w = width // scale
        for b in range(2):
            for k in (1, 2):
                shapes[f"layer{stage + 1}.{b}.conv{k}.weight"] = (w, c_in if k == 1 and b == 0 else w, 3, 3)
            c_in = w
    shapes["fc.weight"] = (1000, c_in)
    return shapes


rng = np.random.default_rng(0)
cases = {"resnet50 dense fp16": (resnet50_shapes(), lambda n: config_from_dict({"form": "dense", "dtype": "float16"})),
         "resnet18 dct 10%": (resnet18_convs(), lambda n: config_from_dict({"form": "dct", "keep": 0.1})),
         "resnet18 series 2x2": (resnet18_convs(), lambda n: config_from_dict({"form": "series", "harmonics": 2})
                                 if "conv" in n else None),
         "resnet18 basis 16": (resnet18_convs(), lambda n: config_from_dict({"form": "basis", "bank": 16})
                               if "conv" in n else None),
         "resnet18 linear fc": (resnet18_convs(), lambda n: config_from_dict({"form": "linear", "alpha": 0.5})
                                if n == "fc.weight" else None)}
rows, verify_fails = [], 0
for name, (shapes, rule) in cases.items():
    tensors = {k: he(s, rng) for k, s in shapes.items()}
    kpk, pt = os.path.join(work, name.replace(" ", "_") + ".kpk"), os.path.join(work, name.replace(" ", "_") + ".pt")
    kernelpack.save(tensors, kpk, forms=lambda n, v: rule(n))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, pt)
    done = subprocess.run([sys.executable, "-m", "kernelpack", "verify", "--device", device, kpk], capture_output=True, text=True)
    verify_fails += done.returncode != 0
    dense = {k: torch.from_numpy(v) for k, v in tensors.items()}
    pinned = {k: v.pin_memory() for k, v in dense.items()} if device == "cuda" else dense
    nbytes = sum(v.nbytes for v in tensors.values())
    t_decode = timed(lambda: kernelpack.load(kpk, device=device))
    t_torch = timed(lambda: torch.load(pt, map_location=device, weights_only=True))
    t_copy = timed(lambda: [v.to(device) for v in dense.values()])
    t_pinned = timed(lambda: [v.to(device, non_blocking=True) for v in pinned.values()])
    rows.append((name, nbytes / 2**20, os.path.getsize(kpk) / 2**20, nbytes / t_decode / 2**30, t_decode / t_torch,
                 t_decode / t_copy, t_decode / t_pinned, done.returncode == 0))
    print(rows[-1], file=sys.stderr)

# Step 4: load-to-ready, in this process (imports already paid): kernelpack.load + first forward,
# and ort_session with CUDA + first run, each against its dense file.
model = torch.nn.Sequential(torch.nn.Conv2d(3, 64 // scale, 7, 2, 3), torch.nn.ReLU(),
                            *[torch.nn.Sequential(torch.nn.Conv2d(64 // scale if i == 0 else 256 // scale, 256 // scale, 3, 1, 1),
                                                  torch.nn.ReLU()) for i in range(8)],
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(256 // scale, 1000)).eval()
example = torch.randn(1, 3, 224, 224)
ready = []
try:
    from kernelpack.onnx_io import torch_graph
    graph = torch_graph(model, example, input_names=["x"])
    kpk = os.path.join(work, "ready.kpk")
    kernelpack.save(model, kpk, attachments={"onnx.graph": graph})
    pt = os.path.join(work, "ready.pt")
    torch.save(model.state_dict(), pt)
    x = example.to(device)

    def torch_kpk():
        model.load_state_dict(kernelpack.load(kpk, device=device)); model.to(device)(x)

    def torch_dense():
        model.load_state_dict(torch.load(pt, map_location=device, weights_only=True)); model.to(device)(x)

    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]

    def ort_kpk():
        s = kernelpack.ort_session(kpk, providers); s.run(None, {"x": example.numpy()}); return s.get_providers()[0]

    provider = ort_kpk()
    ready = [("torch: load(device) + forward", timed(torch_kpk), "torch.load + forward", timed(torch_dense)),
             (f"ORT {provider}: ort_session + run", timed(ort_kpk), "", float("nan"))]
except Exception as exc:  # the figures so far still get written; the reason is printed
    print(f"gpu_check: load-to-ready not measured: {type(exc).__name__}: {exc}", file=sys.stderr)

lines = [f"# GPU check ({'DRY RUN on the CPU, shapes / 8: no GPU figures' if dry else torch.cuda.get_device_name()})", "",
         f"Command: `benchmarks/gpu_check.sh{' --dry-run' if dry else ''}`; torch {torch.__version__}; "
         f"{time.strftime('%Y-%m-%d')}.", "",
         "CUDA tests: " + open("/tmp/gpu_check_pytest.txt").read().strip().splitlines()[-1], "",
         f"verify --device {device}: {os.environ['VECTORS']} conformance files, {os.environ['VFAILS']} failed; "
         f"model-sized containers: {len(rows)}, {verify_fails} failed.", "",
         "| container | dense float32 MiB | file MiB | decode GiB/s | / torch.load to device | / H2D copy (pageable) "
         "| / H2D copy (pinned) | verify |", "|---|---:|---:|---:|---:|---:|---:|---|"]
lines += [f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f} | {'ok' if r[7] else 'FAILED'} |"
          for r in rows]
lines += ["", "Ratios are times (decode / other): 1.0 is as fast as the other; target for ResNet-50 dense fp16: "
          "<= 2 x the H2D copy.", "", "| load-to-ready (warm process, median of 3) | s | dense | s |", "|---|---:|---|---:|"]
lines += [f"| {a} | {b:.3f} | {c} | {d:.3f} |" for a, b, c, d in ready]
with open(os.environ["OUT"], "w") as f:
    f.write("\n".join(lines) + "\n")
print(f"gpu_check: figures in {os.environ['OUT']}")
sys.exit(1 if verify_fails or int(os.environ["VFAILS"]) else 0)
PY
