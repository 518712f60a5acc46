"""Payload codecs: which a file of a minor version may use, the writer's choice among them
(``_compress``), byte planes (``zstd-shuffle``) and the checked inflation of zstd frames. The
entropy codecs ``rans`` and ``rans-ctx`` are kernelpack/entropy.py's.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Collection, Sequence

import numpy as np

from kernelpack import entropy
from kernelpack.errors import KernelpackError
from kernelpack.layout import _zstd_dictionary

CODECS = ("none", "zstd", "zstd-shuffle", "rans", "rans-ctx")
#: Codecs added by a minor version (1.2: ``zstd-shuffle``, byte planes before zstd; 1.3:
#: ``rans``, interleaved rANS with a table per array; 1.5: ``rans-ctx``, rANS of hybrid-integer
#: tokens with a table per class of rows; both kernelpack/entropy.py).
ADDED_CODECS = {2: frozenset({"zstd-shuffle"}), 3: frozenset({"rans"}), 5: frozenset({"rans-ctx"})}
#: What the writer tries unless told otherwise: not ``rans`` or ``rans-ctx``, opt-in (``codecs=CODECS``):
#: ``rans-ctx`` is 1-5% smaller than zstd-shuffle on quantised real models (benchmarks/entropy.py)
#: and, compiled, decodes at 400-1000 MB/s of codes (since b54c702) against zstd's 600-1700; but
#: numba is an extra (``kernelpack[fast]``), and without it the decode is 1-15 MB/s, so a reader
#: installed with the core dependencies alone would load a default file some 100 times slower.
#: By default it would also make files 1.5 (unreadable by 1.4 readers) for those few percent.
DEFAULT_CODECS = ("none", "zstd", "zstd-shuffle")


def codecs_of(minor: int) -> tuple[str, ...]:
    """The codecs a file of minor version ``minor`` may use: those added by then (in a file
    of a newer minor than this reader, every codec it knows)."""
    return tuple(c for c in CODECS if all(c not in added or m <= minor for m, added in ADDED_CODECS.items()))


def _shuffle(raw: bytes, dtype: np.dtype) -> bytes:
    """Byte planes (``zstd-shuffle``): byte j of every element, plane after plane. The
    planes of little-endian numbers differ (exponents and high bytes of codes repeat, low
    bytes do not), and zstd's literal coding compresses each plane far better alone.
    Signed integers are zigzag-mapped first (0, -1, 1, -2 -> 0, 1, 2, 3): otherwise their
    high plane is mostly the sign, 0x00 or 0xFF, which the low plane already tells."""
    values = np.frombuffer(raw, dtype=dtype)
    if dtype.kind == "i":  # (q << 1) ^ (q >> N-1), arithmetic shift; wraps, so it is a bijection
        values = ((values << 1) ^ (values >> (8 * dtype.itemsize - 1))).astype(dtype, copy=False)
    return values.view(np.uint8).reshape(-1, dtype.itemsize).T.tobytes()


#: Elements per block of ``_unshuffle``: a block of every plane and of the result stay in
#: the core's L2 cache.
UNSHUFFLE_BLOCK = 1 << 16


def _unshuffle(planes: bytes, dtype: np.dtype) -> np.ndarray:
    """The elements back from their byte planes: the inverse of ``_shuffle``.

    Each plane is shifted into place with unsigned integer operations (2-4x faster than a
    strided byte transpose, benchmarks/README.md), block by block and in place in the
    result: no temporary the size of the array, and 1.5-3x faster than whole-array passes."""
    unsigned = np.dtype(f"<u{dtype.itemsize}")
    plane = np.frombuffer(planes, dtype=np.uint8).reshape(dtype.itemsize, -1)
    out = np.empty(plane.shape[1], dtype=unsigned)
    eight, one = unsigned.type(8), unsigned.type(1)
    for start in range(0, len(out), UNSHUFFLE_BLOCK):
        block = out[start:start + UNSHUFFLE_BLOCK]
        np.copyto(block, plane[-1, start:start + UNSHUFFLE_BLOCK])
        for j in range(dtype.itemsize - 2, -1, -1):
            block <<= eight
            block |= plane[j, start:start + UNSHUFFLE_BLOCK]
        if dtype.kind == "i":  # un-zigzag: (u >> 1) ^ -(u & 1)
            sign = block & one
            block >>= one
            block ^= np.negative(sign, out=sign)
    return out.view(dtype)


#: The writer's zstd level (``write``, ``kernelpack.save``, ``pack_onnx``, ``kernelpack pack``).
#: 19, not 3, because smallest files are the product: on He-initialised ResNet-50 shapes
#: (benchmarks/pack.py) the two levels were within 1.4% of each other, but on the suite's real
#: models (BENCHMARKS.md, the run at 016fd31 made at level 3 against the one at fcb8bc7 at 19)
#: level 3 made every file larger: quantised codes at NNCodec's steps by 0.4-5.8%, dense
#: float16 by 0.4-3.7% (real weights repeat patterns that only long matches find). Level 19
#: takes 1.5-29 times as long (ResNet-50 dense float16: 6.7 s against 0.23 s; see
#: benchmarks/README.md); ``level=3`` (``kernelpack pack --level 3``) is there for fast packs.
DEFAULT_LEVEL = 19
#: How the writer compares codecs (``_compress``). Payloads of at most EXACT_BYTES are
#: compressed by every codec offered at the final level, and the smallest kept: cheap there,
#: and exact where a few bytes decide it (the conformance vectors' arrays: at level 3, frames of
#: 32 to 192 bytes came out in another order than at 19). A larger payload is compressed for
#: real only by the codecs whose estimate is within ESTIMATE_MARGIN of the smallest estimate:
#: the size at ESTIMATE_LEVEL of the payload, or beyond SAMPLE_BYTES of a sample of it
#: (SAMPLE_CHUNKS evenly spaced runs of whole elements, SAMPLE_BYTES in all), scaled to the
#: payload's length. Comparing at level 19 cost two level-19 compressions per payload, each
#: some 20-50 times slower than one at level 3. Measured on the 210 payloads over EXACT_BYTES of
#: benchmarks/pack.py's six ResNet-50 files (a throwaway script over the same arrays; pack.py's
#: file bytes agree): with a margin of 0, level-3 files came out the same bytes as
#: comparing every codec in full, and level-19 files up to 0.12% larger (dct's payloads); with
#: 0.005, the same bytes at both levels, 271 final compressions for the 210 payloads (every codec
#: in full: 420). A sample of 64 KiB missed by up to 2.9% at a margin of 0.
EXACT_BYTES = 64 << 10
ESTIMATE_LEVEL = 3
SAMPLE_BYTES = 256 << 10
SAMPLE_CHUNKS = 16
ESTIMATE_MARGIN = 0.005


def _compress(raw: bytes, dtype: np.dtype, level: int, codecs: Collection[str],
              name: str | None = None, shape: Sequence[int] = ()) -> tuple[str, bytes]:
    """The smallest payload of ``codecs`` and ``none``, the simpler on a tie (so zero-size
    arrays are ``none``), the zstd codecs compared by estimate beyond EXACT_BYTES (see there);
    ``zstd-shuffle`` only for elements of more than one byte; ``rans`` only for the stored
    dtypes ``name`` it takes (entropy.DTYPES: a bfloat16 array has the numpy dtype of uint16,
    so the name decides), and ``rans-ctx`` likewise (its rows: the first dimension of ``shape``)."""
    if not raw:
        return "none", raw
    import zstandard

    zstd = [c for c in ("zstd", "zstd-shuffle") if c in codecs and (c == "zstd" or dtype.itemsize > 1)]
    exact = len(raw) <= EXACT_BYTES
    piece = raw if exact or len(raw) <= SAMPLE_BYTES else _sample(raw, dtype.itemsize)
    trial_level = level if exact else min(level, ESTIMATE_LEVEL)
    trial = zstandard.ZstdCompressor(level=trial_level, write_content_size=True)
    trials = {c: trial.compress(_zstd_input(c, piece, dtype)) for c in zstd}
    entropic = [(c, entropy.encode_as(c, np.frombuffer(raw, dtype=dtype), shape))
                for c in entropy.DECODERS if c in codecs and name in entropy.DTYPES]
    if piece is raw and trial_level == level:  # the trials are the payloads
        final = trials
    else:
        estimate = {c: len(body) * len(raw) / len(piece) for c, body in trials.items()}
        close = min([len(raw), *estimate.values(), *(len(body) for _, body in entropic)]) * (1 + ESTIMATE_MARGIN)
        compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
        final = {c: compressor.compress(_zstd_input(c, raw, dtype)) for c in zstd if estimate[c] <= close}
    candidates = [("none", raw)] + list(final.items()) + entropic
    return min(candidates, key=lambda candidate: len(candidate[1]))  # min keeps the first of ties


def _zstd_input(codec: str, data: bytes, dtype: np.dtype) -> bytes:
    """What the zstd frame of ``codec`` holds: the bytes, or their byte planes."""
    return _shuffle(data, dtype) if codec == "zstd-shuffle" else data


def _sample(raw: bytes, itemsize: int) -> bytes:
    """SAMPLE_CHUNKS evenly spaced runs of whole elements of ``raw``, SAMPLE_BYTES in all (about)."""
    count, run = len(raw) // itemsize, max(1, SAMPLE_BYTES // SAMPLE_CHUNKS // itemsize)
    starts = np.linspace(0, count - run, SAMPLE_CHUNKS).astype(np.int64) * itemsize
    return b"".join(raw[start:start + run * itemsize] for start in starts.tolist())


_THREAD = threading.local()


def _decompressor() -> Any:
    """This thread's zstd decompressor: making one per payload took 3 times as long as
    decompressing a small payload, and one must not be used by two threads at once."""
    if not hasattr(_THREAD, "zstd"):
        import zstandard

        _THREAD.zstd = zstandard.ZstdDecompressor()
    return _THREAD.zstd


def _declared(data: bytes | memoryview, bad: Callable[[str], KernelpackError], what: str) -> int:
    """The content size a zstd frame declares (``zstandard.CONTENTSIZE_UNKNOWN`` if none)."""
    import zstandard

    try:
        return zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as exc:
        raise bad(f"bad {what}: {exc}") from None


def _one_frame(data: bytes | memoryview, size: int, bad: Callable[[str], KernelpackError], what: str,
               dictionary: bool = False) -> bytes:
    """``data`` inflated, when it is exactly one zstd frame of ``size`` bytes with nothing after
    it (against the header dictionary if ``dictionary``). One-shot: one allocation of ``size``,
    about twice as fast as a streaming object; zstd never produces more than
    ``max_output_size``, and bytes after the frame are an error."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor(dict_data=_zstd_dictionary()) if dictionary else _decompressor()
    try:
        out = decompressor.decompress(data, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise bad(f"bad {what}: {exc}") from None
    if len(out) != size:
        raise bad(f"{what} is not exactly one frame of its declared size")
    return out
