"""The peer methods kernelpack is benchmarked against: one artifact (bytes) per weight dict.

Every peer turns a dict of float32 arrays (all float tensors of a model: weights, biases,
norm parameters) into one byte string and back into float32 arrays of the same names and
shapes, so the suite measures every method the same way (bytes, error, decode speed).

Lossless: ``safetensors f32`` (the dense baseline: ``safetensors.numpy.save``), ``zstd
f32`` and ``zipnn`` (the float32 bytes through zstd level 19, resp. ZipNN's byte grouping
and entropy coding). Lossy: ``zstd f16`` (float16, zstd 19), ``int8/ch + zstd``
(symmetric per-output-channel int8, the usual weight-only post-training quantization) and
``nncodec qp-N`` (NNCodec, the reference codec of ISO/IEC 15938-17 NNR, at quantization
parameter N: an absolute step of about 2^(N/4)).
The lossy peers change only tensors of ndim >= 2 (conv and linear weights) materially:
1-D tensors (biases, norm parameters, < 1% of the bytes of the PP-OCR models) stay
float32 in ``zstd f16`` and ``int8/ch``, and NNCodec quantizes them with a step of 2.4e-6.

The zstd-based peers and ZipNN compress **each tensor separately**, as kernelpack's writer
does (one zstd frame per payload, level 19, content size written), so a difference in
bytes comes from the representation, not from a different framing. Their artifact is
``u64 little-endian index length | msgpack index | blobs``; the index lists, per tensor in
input order, ``[name, [[dtype, shape, offset, length], ...]]`` (one entry per stored
array: the codes and then the scales for int8). NNCodec codes the whole dict in one
bitstream (its own format); the names ride in the same kind of index, because NNCodec
refuses names holding ``_G``/``_H`` other than as a suffix (its decomposition markers).

ZipNN 0.5.4 and NNCodec 2.1.3 are source packages installed without their declared
dependencies (``pip install --no-deps zipnn==0.5.4 nncodec==2.1.3``): NNCodec pins
numpy < 2 and imports vision/training packages (torchvision, cv2, h5py, ...) at import
time that its coding path never calls; those are served as empty stub modules while
``nncodec`` is imported, and only then (see :func:`_import_nncodec`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import struct
import sys
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import msgpack
import numpy as np

Weights = dict[str, np.ndarray]

#: zstd level of every zstd-based peer: zstd's strongest usual level, which kernelpack's writer
#: offers as ``kernelpack.save(level=19)`` (its default is 3: within 1.4% of 19's bytes).
ZSTD_LEVEL = 19
#: int8 codes span [-QMAX, QMAX] (symmetric: -128 is never used, so 0 is exact and the grid is odd).
QMAX = 127
#: How the optional peer libraries are installed (the error message for a missing one).
INSTALL = {"zipnn": "pip install --no-deps zipnn==0.5.4", "nncodec": "pip install --no-deps nncodec==2.1.3"}
#: Packages NNCodec 2.1.3 imports at import time (or may, from the modules it loads) for its
#: training and evaluation tools; stubbed during its import when they are not installed.
NNCODEC_STUBBED = ("torchvision", "cv2", "torchmetrics", "ptflops", "h5py", "tensorflow", "flwr",
                   "sentencepiece", "wandb")


@dataclass(frozen=True)
class Peer:
    """A compression method other than kernelpack: whole weight dict -> one artifact -> float32 dict."""

    name: str
    lossy: bool
    encode: Callable[[Weights], bytes]
    decode: Callable[[bytes], Weights]


# --- framing: an index and per-array blobs ----------------------------------------------------
Codec = tuple[Callable[[np.ndarray], bytes], Callable[[bytes, np.dtype], np.ndarray]]


def _frame(index: Any, blobs: Sequence[bytes]) -> bytes:
    head = msgpack.packb(index, use_bin_type=True)
    return b"".join([struct.pack("<Q", len(head)), head, *blobs])


def _unframe(artifact: bytes) -> tuple[Any, memoryview]:
    (length,) = struct.unpack_from("<Q", artifact)
    body = memoryview(artifact)[8:]
    return msgpack.unpackb(body[:length], raw=False, strict_map_key=True), body[length:]


def _store(tensors: dict[str, list[np.ndarray]], compress: Callable[[np.ndarray], bytes]) -> bytes:
    """Each tensor's stored arrays compressed one by one, behind the index."""
    index, blobs, offset = [], [], 0
    for name, arrays in tensors.items():
        entries = []
        for array in arrays:
            blob = compress(np.ascontiguousarray(array))
            entries.append([array.dtype.str, list(array.shape), offset, len(blob)])
            blobs.append(blob)
            offset += len(blob)
        index.append([name, entries])
    return _frame(index, blobs)


def _restore(artifact: bytes, decompress: Callable[[bytes, np.dtype], np.ndarray]
             ) -> Iterator[tuple[str, list[np.ndarray]]]:
    index, blobs = _unframe(artifact)
    for name, entries in index:
        yield name, [decompress(blobs[o:o + n], np.dtype(d)).reshape(s) for d, s, o, n in entries]


def _zstd_codec(level: int = ZSTD_LEVEL) -> Codec:
    import zstandard

    def compress(array: np.ndarray) -> bytes:
        return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(array.tobytes())

    def decompress(blob: bytes, dtype: np.dtype) -> np.ndarray:
        return np.frombuffer(zstandard.ZstdDecompressor().decompress(blob), dtype)

    return compress, decompress


# --- the peers -----------------------------------------------------------------------------------
def safetensors_f32() -> Peer:
    """The dense baseline: a .safetensors file of the float32 tensors."""
    from safetensors.numpy import load, save

    return Peer("safetensors f32", False, lambda w: save({k: np.ascontiguousarray(v) for k, v in w.items()}),
                lambda b: {k: v.astype(np.float32, copy=False) for k, v in load(b).items()})


def zstd_peer(dtype: str = "float32") -> Peer:
    """Tensors of ndim >= 2 cast to ``dtype`` (float32: lossless; float16: round to nearest
    even), 1-D tensors kept float32, every array zstd 19. 1-D tensors stay float32 as in the
    int8 peer and in kernelpack's ONNX plan: a BN running variance of PP-OCRv4 det reaches
    9.8e7, beyond float16's 65504, and would turn into inf."""
    compress, decompress = _zstd_codec()
    store = np.dtype(dtype)

    def encode(weights: Weights) -> bytes:
        return _store({k: [np.asarray(v, np.float32).astype(store if np.ndim(v) >= 2 else np.float32)]
                       for k, v in weights.items()}, compress)

    def decode(artifact: bytes) -> Weights:
        return {k: a.astype(np.float32) for k, (a,) in _restore(artifact, decompress)}

    return Peer(f"zstd {'f32' if store == np.float32 else 'f16'}", store != np.float32, encode, decode)


def int8_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: scale_c = max|w_c| / 127 (float32) over axis 0,
    codes = round-half-even(w / scale) in [-127, 127]; an all-zero channel has scale 0, codes 0.
    Then |w - codes * scale| <= scale / 2 per element, up to float32 rounding."""
    w = np.asarray(w, dtype=np.float32)
    scale = (np.abs(w).reshape(len(w), -1).max(axis=1) / np.float32(QMAX)).astype(np.float32)
    s = scale.reshape((-1,) + (1,) * (w.ndim - 1))
    q = np.divide(w, s, out=np.zeros_like(w), where=s > 0)
    return np.clip(np.rint(q), -QMAX, QMAX).astype(np.int8), scale


def int8_zstd() -> Peer:
    """Weight-only int8: tensors of ndim >= 2 (conv and linear weights) as per-output-channel
    int8 codes + float32 scales (:func:`int8_channel`); 1-D tensors (biases, norm parameters)
    stay float32, as weight-only int8 schemes keep them. Every stored array zstd 19."""
    compress, decompress = _zstd_codec()

    def encode(weights: Weights) -> bytes:
        return _store({k: list(int8_channel(v)) if np.ndim(v) >= 2 else [np.asarray(v, np.float32)]
                       for k, v in weights.items()}, compress)

    def decode(artifact: bytes) -> Weights:
        out = {}
        for name, arrays in _restore(artifact, decompress):
            if len(arrays) == 1:
                out[name] = arrays[0].astype(np.float32)
            else:
                codes, scale = arrays
                out[name] = codes.astype(np.float32) * scale.reshape((-1,) + (1,) * (codes.ndim - 1))
        return out

    return Peer("int8/ch + zstd", True, encode, decode)


def zipnn_f32() -> Peer:
    """ZipNN 0.5.4 on each tensor's float32 bytes (``input_format='byte'``,
    ``bytearray_dtype='float32'``, its documented byte-array mode; defaults otherwise: sign bit
    moved next to the mantissa, the four bytes of every float grouped into four streams,
    each entropy-coded (method 'AUTO'), chunks of 256 KiB).
    ``compress`` overwrites the buffer it is given, so it gets a fresh bytearray."""
    zipnn = _require("zipnn")

    def codec() -> Any:
        return zipnn.ZipNN(input_format="byte", bytearray_dtype="float32")

    def compress(array: np.ndarray) -> bytes:
        return bytes(codec().compress(bytearray(array.astype(np.float32).tobytes())))

    def decompress(blob: bytes, dtype: np.dtype) -> np.ndarray:
        return np.frombuffer(bytes(codec().decompress(bytes(blob))), dtype)

    def encode(weights: Weights) -> bytes:
        return _store({k: [np.asarray(v, np.float32)] for k, v in weights.items()}, compress)

    def decode(artifact: bytes) -> Weights:
        return {k: a.copy() for k, (a,) in _restore(artifact, decompress)}

    return Peer("zipnn", False, encode, decode)


def nncodec_step(qp: int, qp_density: int = 2) -> float:
    """NNCodec's quantization step for ``qp`` (``get_stepsize_from_qp``): (k + qp mod k) *
    2**(qp // k - qp_density), k = 2**qp_density; about 2**(qp / 4) at the default density 2."""
    k = 1 << qp_density
    return (k + (qp & (k - 1))) * 2.0 ** ((qp >> qp_density) - qp_density)


def nncodec_peer(qp: int) -> Peer:
    """NNCodec 2.1.3 (``nnc.compress``, its defaults: uniform quantization with dependent
    quantization (trellis), DeepCABAC) at ``qp``: tensors of ndim >= 2 get the absolute step
    :func:`nncodec_step(qp)` (-38: 1.5e-3, -32: 3.9e-3, -26: 1.2e-2); NNCodec types every
    1-D tensor 'unspecified' (not a weight) and quantizes it with ``nonweight_qp`` = -75
    (step 2.4e-6), i.e. biases and norm parameters are kept almost exactly. Where a tensor's
    integer levels would overflow int32 at that step, NNCodec raises the tensor's qp (its
    "QP ... clipped" line): the step becomes about max|w| / 2^32 (PP-OCRv4 det's BN variance
    of 9.8e7: 0.03). Dependent quantization picks between two interleaved grids by a trellis,
    so an element may move up to about two steps. No bitstream file is written; NNCodec's
    prints are silenced."""
    nnc = _import_nncodec()

    def encode(weights: Weights) -> bytes:
        names = list(weights)
        params = {f"t{i}": np.ascontiguousarray(weights[n], dtype=np.float32) for i, n in enumerate(names)}
        with contextlib.redirect_stdout(io.StringIO()):
            bitstream = nnc.compress(params, bitstream_path=None, qp=qp, return_bitstream=True, verbose=False)
        return _frame([[n, list(np.shape(weights[n]))] for n in names], [bytes(bitstream)])

    def decode(artifact: bytes) -> Weights:
        index, bitstream = _unframe(artifact)
        with contextlib.redirect_stdout(io.StringIO()):
            params = nnc.decompress(bytearray(bitstream), verbose=False)
        return {n: np.asarray(params[f"t{i}"], dtype=np.float32).reshape(s) for i, (n, s) in enumerate(index)}

    return Peer(f"nncodec qp{qp}", True, encode, decode)


def peers(nncodec_qps: Sequence[int] = (-38, -32, -26)) -> list[Peer]:
    """Every peer, lossless first. Raises ImportError naming the pip command(s) if ZipNN or
    NNCodec is missing (or NNCodec is wanted and missing: ``nncodec_qps=()`` drops it)."""
    wanted = ["zipnn"] + (["nncodec"] if nncodec_qps else [])
    missing = [INSTALL[m] for m in wanted if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError("the benchmark peers need: " + " && ".join(missing))
    return [safetensors_f32(), zstd_peer("float32"), zipnn_f32(), zstd_peer("float16"), int8_zstd(),
            *(nncodec_peer(qp) for qp in nncodec_qps)]


def versions() -> dict[str, str]:
    """Installed version of every library a peer uses ("not installed" if absent)."""
    out = {}
    for name in ("numpy", "safetensors", "zstandard", "msgpack", "zipnn", "nncodec"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# --- optional libraries ----------------------------------------------------------------------------
def _require(module: str) -> Any:
    """Import an optional peer library; its import-time deprecation warnings (ZipNN decorates
    with ``torch.jit.script``) are not the benchmark's business."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"the '{module}' benchmark peer needs: {INSTALL[module]}") from None


class _Stub(types.ModuleType):
    """An empty module whose every attribute is another stub (usable as a base class, callable)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(f"{self.__name__}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (object,)


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves :class:`_Stub` modules for the given top-level package names."""

    def __init__(self, roots: Sequence[str]) -> None:
        self.roots = frozenset(roots)

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name.partition(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _Stub(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []


@contextlib.contextmanager
def stubbed(roots: Sequence[str]) -> Iterator[list[str]]:
    """Within the block, importing one of ``roots`` that is not installed gives a stub module.
    Afterwards the finder is gone and the stubs leave ``sys.modules`` (the modules imported
    meanwhile keep their references), so later imports of those names fail as usual.
    Yields the roots actually stubbed."""
    missing = [r for r in roots if r not in sys.modules and importlib.util.find_spec(r) is None]
    finder = _StubFinder(missing)
    sys.meta_path.insert(0, finder)
    try:
        yield missing
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n, m in sys.modules.items() if isinstance(m, _Stub)]:
            del sys.modules[name]


@functools.cache
def _import_nncodec() -> Any:
    """``nncodec.nnc``, imported with its unused import-time dependencies stubbed."""
    if importlib.util.find_spec("nncodec") is None:
        raise ImportError(f"the 'nncodec' benchmark peer needs: {INSTALL['nncodec']}")
    with stubbed(NNCODEC_STUBBED), contextlib.redirect_stdout(io.StringIO()):
        return importlib.import_module("nncodec.nnc")
