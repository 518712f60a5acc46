"""Real ONNX models and real inputs for the serving tests (a helper module, not a test module).

Models: the PP-OCR models that the ``rapidocr-onnxruntime`` wheel ships (located with
importlib; rapidocr itself is never imported, its dependencies are not installed).
Inputs: no image library is a test dependency, so the "text" is real handwriting,
scikit-learn's 8x8 digits, upscaled and set in lines like the crops PP-OCR reads: dark
ink on white paper, normalised as rapidocr does ((x - 0.5) / 0.5 for the
direction classifier, ImageNet mean/std for the detector). Both models respond to
these inputs as to text (the classifier calls most upright lines upright, the
detector marks the line and nothing else), so the agreement tests compare outputs that
mean something.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

CLS = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
DET = "ch_PP-OCRv4_det_infer.onnx"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def ppocr_model(name: str) -> str:
    """Path of a PP-OCR model in the installed rapidocr-onnxruntime wheel, or skip the test."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the PP-OCR models of rapidocr-onnxruntime: "
                    "pip install --no-deps rapidocr-onnxruntime==1.4.4")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", name)
    if not os.path.isfile(path):
        pytest.skip(f"rapidocr-onnxruntime is installed but has no models/{name}")
    return path


def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images / 16.0  # (1797, 8, 8), ink in [0, 1]


def text_lines(count: int, glyphs: int = 6, scale: int = 4, height: int = 48, seed: int = 0) -> np.ndarray:
    """``count`` lines of ``glyphs`` random digits, each 8x8 digit upscaled ``scale`` times and
    centred in a line ``height`` pixels high: (count, height, glyphs * 8 * scale), paper 1, ink 0."""
    digits = _digits()
    rng = np.random.default_rng(seed)
    lines = np.ones((count, height, glyphs * 8 * scale))
    top = (height - 8 * scale) // 2
    for line, picks in zip(lines, rng.integers(0, len(digits), (count, glyphs))):
        ink = np.concatenate([np.kron(digits[i], np.ones((scale, scale))) for i in picks], axis=1)
        line[top:top + 8 * scale] = 1.0 - ink
    return lines


def cls_batch(count: int, seed: int = 0) -> np.ndarray:
    """Direction-classifier input (count, 3, 48, 192): lines, the second half turned 180 degrees."""
    lines = text_lines(count, seed=seed)
    lines[count // 2:] = lines[count // 2:, ::-1, ::-1]
    return np.repeat(((lines - 0.5) / 0.5)[:, None], 3, axis=1).astype(np.float32)


def det_page(seed: int = 0) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Detector input (1, 3, 96, 256): one line of digits on a white page, and where the line is."""
    page = np.ones((96, 256))
    where = (slice(24, 72), slice(32, 224))
    page[where] = text_lines(1, seed=seed)[0]
    x = (page[None, :, :, None] - IMAGENET_MEAN) / IMAGENET_STD
    return x.transpose(0, 3, 1, 2).astype(np.float32), where
