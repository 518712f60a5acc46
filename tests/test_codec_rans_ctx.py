"""Codec ``rans-ctx`` (format 1.5, spec/FORMAT.md section 2.3): int8/int16/uint8/uint16 arrays
as hybrid-integer tokens, coded by interleaved rANS with a table per class of rows, and raw
extra bits. A decoder written from the spec's text alone (``spec_decode``, scalar Python, no
numpy) reproduces the reference decoder on the conformance vectors and on generated arrays;
the encoder reproduces the committed vector bytes; every malformed payload is a
KernelpackError naming the payload field, never a crash; the writer keeps rans-ctx only
where it is smallest and only then writes 1.5; a reader of 1.4 refuses it as an unknown codec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernelpack
from conftest import RawFile, codec_payloads
from kernelpack import entropy
from kernelpack.codecs import CODECS, codecs_of
from kernelpack.forms import DenseTensor
from kernelpack.forms._base import Stored
from kernelpack.reader import Container
from kernelpack.writer import write

VECTORS = Path(__file__).parent.parent / "spec" / "vectors"
FILES = ("rans_ctx.kpk", "rans_ctx_large.kpk")
KEY = ("tensors", "w", "data")


# --- a decoder from the spec's text ----------------------------------------------------------
def spec_decode(body: bytes, dtype: str, count: int) -> list[int]:
    """FORMAT.md 2.3, "Tokens", "Payload" and "Decode", step by step in Python integers
    (valid payloads)."""
    pos = 0

    def byte() -> int:
        nonlocal pos
        pos += 1
        return body[pos - 1]

    def varint() -> int:
        value, shift = 0, 0
        while True:
            b = byte()
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    def packed(data: bytes, start: int, width: int) -> int:
        return sum(((data[(start + i) // 8] >> ((start + i) % 8)) & 1) << i for i in range(width))

    bits = 8 * np.dtype(dtype).itemsize
    n, s, m, g = byte(), byte(), byte(), byte()
    rows, lanes = varint(), varint()
    length = count // rows
    b = (g - 1).bit_length()
    class_bytes = body[pos:pos + -(-rows * b // 8)]
    pos += len(class_bytes)
    row_class = [packed(class_bytes, r * b, b) for r in range(rows)]
    tokens = (1 << s) + (bits - s) * (1 << m)
    tables = []
    for _ in range(g):
        freq: list[int] = []
        while len(freq) < tokens:
            v = varint()
            freq += [v] if v else [0] * (varint() + 1)
        tables.append((freq, [sum(freq[:t]) for t in range(tokens)],
                       [t for t in range(tokens) for _ in range(freq[t])]))
    x = [int.from_bytes(body[pos + 4 * i:pos + 4 * i + 4], "little") for i in range(lanes)]
    pos += 4 * lanes
    extra_length = varint()
    extra = body[pos:pos + extra_length]
    pos += extra_length
    words = [int.from_bytes(body[i:i + 2], "little") for i in range(pos, len(body), 2)]
    symbols, p, mm = [], 0, 1 << n
    for t in range(-(-count // lanes)):
        for lane in range(min(lanes, count - t * lanes)):
            freq, cum, owner = tables[row_class[(t * lanes + lane) // length]]
            j = x[lane] % mm
            sym = owner[j]
            symbols.append(sym)
            x[lane] = freq[sym] * (x[lane] // mm) + j - cum[sym]
            if x[lane] < 1 << 16:
                x[lane] = x[lane] * (1 << 16) + words[p]
                p += 1
    assert p == len(words) and all(state == 1 << 16 for state in x)
    values, at = [], 0
    for t in symbols:
        if t < 1 << s:
            values.append(t)
            continue
        d = t - (1 << s)
        e, h = s + d // (1 << m), d % (1 << m)
        k = e - m
        values.append(((1 << m) + h) * (1 << k) + packed(extra, at, k))
        at += k
    assert extra_length == -(-at // 8)
    if np.dtype(dtype).kind == "i":
        values = [(u >> 1) ^ -(u & 1) for u in values]
    return values


VECTOR_ARRAYS = codec_payloads([VECTORS / f for f in FILES], "rans-ctx")
IDS = [f"{f}:{t}" for f, t, *_ in VECTOR_ARRAYS]


# --- conformance vectors ---------------------------------------------------------------------
@pytest.mark.parametrize("name, tensor, dtype, body, decoded", VECTOR_ARRAYS, ids=IDS)
def test_a_decoder_written_from_the_spec_reproduces_every_vector(name: str, tensor: str, dtype: str, body: bytes,
                                                                 decoded: np.ndarray) -> None:
    assert spec_decode(body, dtype, decoded.size) == decoded.reshape(-1).tolist()


@pytest.mark.usefixtures("rans_loops")  # numpy and compiled loops
@pytest.mark.parametrize("name, tensor, dtype, body, decoded", VECTOR_ARRAYS, ids=IDS)
def test_the_encoder_reproduces_the_committed_vector_bytes(name: str, tensor: str, dtype: str, body: bytes,
                                                           decoded: np.ndarray) -> None:
    assert entropy.encode_as("rans-ctx", decoded.reshape(-1), decoded.shape) == body


def compiled_read(body: bytes, dtype: np.dtype, count: int) -> np.ndarray | None:
    """The elements by the compiled reader alone (_rans_jit.decode_ctx), None if it refuses the
    payload: a valid payload it refuses is decoded right, but field by field, slower."""
    jit = entropy._jit()
    if jit is None:
        pytest.skip("numba is not installed: pip install kernelpack[fast]")
    out = np.empty(count, dtype=f"<u{dtype.itemsize}")
    ok = jit.decode_ctx(np.frombuffer(body, np.uint8), count, 8 * dtype.itemsize, dtype.kind == "i", out)
    return out.view(dtype) if ok else None


@pytest.mark.parametrize("name, tensor, dtype, body, decoded", VECTOR_ARRAYS, ids=IDS)
def test_the_compiled_reader_takes_every_vector_in_one_call(name: str, tensor: str, dtype: str, body: bytes,
                                                            decoded: np.ndarray) -> None:
    got = compiled_read(body, np.dtype(dtype), decoded.size)
    assert got is not None and np.array_equal(got, decoded.reshape(-1))


@pytest.mark.usefixtures("rans_loops")  # numpy and compiled loops
def test_the_vectors_decode_to_the_manifest_digests() -> None:
    manifest = json.loads((VECTORS / "manifest.json").read_text(encoding="utf-8"))["files"]
    for name in FILES:
        assert manifest[name]["version"] == [1, 5]
        with Container(VECTORS / name) as c:
            assert c.version == (1, 5) and all(c.verify().values())
            for tensor, entry in manifest[name]["tensors"].items():
                assert c.info(tensor).digest.hex() == entry["sha256"]


# --- tokens and round trips --------------------------------------------------------------------
@pytest.mark.parametrize("split, msb", [(0, 0), (2, 1), (4, 2), (4, 4), (8, 3), (12, 0)])
def test_tokens_and_extra_bits_rebuild_every_16_bit_value(split: int, msb: int) -> None:
    u = np.arange(1 << 16)
    tok, k, extra = entropy.tokens(u, split, msb)
    assert tok.max() < entropy.token_count(16, split, msb) and np.all(extra < (1 << k))
    e = split + (tok - (1 << split)) // (1 << msb)
    head = (tok - (1 << split)) % (1 << msb)
    rebuilt = np.where(tok < (1 << split), tok, (((1 << msb) + head) << np.maximum(e - msb, 0)) + extra)
    assert np.array_equal(rebuilt, u)


@st.composite
def int_arrays(draw: st.DrawFn) -> np.ndarray:
    """2-D arrays of every dtype the codec takes: rows of Laplacian codes of scales that vary
    row by row, constants, uniform values over the whole range, a few extremes."""
    dtype = np.dtype(draw(st.sampled_from(sorted(entropy.DTYPES))))
    info = np.iinfo(dtype)
    rows, columns = draw(st.integers(1, 40)), draw(st.integers(1, 80))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["channels", "constant", "uniform"]))
    if kind == "channels":
        scale = np.geomspace(draw(st.floats(0.01, 10)), draw(st.floats(0.01, 5000)), rows)[:, None]
        values = np.rint(rng.laplace(0, 1, (rows, columns)) * scale)
        values = np.abs(values) if info.min == 0 else values
    elif kind == "constant":
        values = np.full((rows, columns), draw(st.integers(int(info.min), int(info.max))))
    else:
        values = rng.integers(int(info.min), int(info.max) + 1, (rows, columns))
    values = np.clip(values, info.min, info.max).astype(dtype)
    if draw(st.booleans()):
        values.reshape(-1)[rng.integers(0, values.size, 3)] = [info.min, info.max, info.max - 1]
    return values


@pytest.mark.usefixtures("rans_loops")  # numpy and compiled loops
@settings(max_examples=25, deadline=None)
@given(values=int_arrays())
def test_every_array_round_trips_and_the_spec_decoder_agrees(values: np.ndarray) -> None:
    body = entropy.encode_as("rans-ctx", values.reshape(-1), values.shape)
    decoded = entropy.decode_ctx(body, values.dtype, values.size)
    assert decoded.dtype == values.dtype and np.array_equal(decoded, values.reshape(-1))
    if entropy._jit() is not None:  # the compiled loops: in one call
        assert np.array_equal(compiled_read(body, values.dtype, values.size), decoded)
    if values.size <= 300:
        assert spec_decode(body, str(values.dtype), values.size) == values.reshape(-1).tolist()


def entropy_bits(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def test_rows_of_different_scales_cost_less_than_their_order_0_entropy() -> None:
    """256 rows of Laplacian int16 codes whose scales span 5 to 500: the row classes code each
    row with the statistics of its scale, below the entropy of the array as one distribution,
    and below ``rans`` (one table of every value)."""
    rng = np.random.default_rng(11)
    values = np.rint(rng.laplace(0, 1, (256, 1024)) * np.geomspace(5, 500, 256)[:, None]).astype(np.int16)
    bits = 8 * len(entropy.encode_ctx(values, 256)) / values.size
    assert bits < 0.95 * entropy_bits(values)
    assert bits < 0.95 * 8 * len(entropy.encode(values)) / values.size


# --- malformed payloads ------------------------------------------------------------------------
def sample() -> tuple[np.ndarray, bytes]:
    """A payload with 4 row classes, extra bits, several lanes and tables with zero runs."""
    rng = np.random.default_rng(5)
    values = np.rint(rng.laplace(0, 1, (32, 100)) * np.geomspace(1, 300, 32)[:, None]).astype(np.int16)
    body = entropy.encode_ctx(values, 32)
    assert body[3] == 4 and body[1] < 8
    return values, body


VALUES, BODY = sample()
COUNT = VALUES.size


def fields_end(body: bytes) -> dict[str, int]:
    """Offsets where each payload field ends in the sample."""
    reader = entropy._Reader(body)
    precision, split, msb, classes = reader.take(4, "head")
    rows, lanes = reader.varint("rows", 1, COUNT), reader.varint("lanes", 1, COUNT)
    head = reader.pos
    reader.take(-(-rows * (classes - 1).bit_length() // 8), "row classes")
    classes_end = reader.pos
    size = entropy.token_count(16, split, msb)
    for _ in range(classes):
        entropy._read_table(reader, size, 1 << precision)
    tables = reader.pos
    reader.take(4 * lanes, "states")
    states = reader.pos
    extra = reader.varint("extra length", 0, 2 * COUNT)
    return {"head": head, "classes": classes, "rows": rows, "lanes": lanes, "row classes": classes_end,
            "tables": tables, "states": states, "extra start": reader.pos, "extra": reader.pos + extra,
            "extra length": extra}


ENDS = fields_end(BODY)


def edit(offset: int, new: bytes, old_length: int | None = None) -> Callable[[bytes], bytes]:
    def change(body: bytes) -> bytes:
        return body[:offset] + new + body[offset + (len(new) if old_length is None else old_length):]
    return change


def varint(value: int) -> bytes:
    return entropy._varint(value)


def with_extra(extra: bytes) -> Callable[[bytes], bytes]:
    """The sample with another extra-bits field (its length varint rewritten)."""
    def change(body: bytes) -> bytes:
        return body[:ENDS["states"]] + varint(len(extra)) + extra + body[ENDS["extra"]:]
    return change


MALFORMED: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda b: b"", "precision, split, msb, classes: needs 4 bytes"),
    "precision 0": (edit(0, b"\x00"), "precision: 0 is not in [1, 15]"),
    "split beyond 12": (edit(1, b"\x0d"), "split: 13 is not in [0, 12]"),
    "msb above split": (edit(2, bytes([BODY[1] + 1])), f"msb: {BODY[1] + 1} is not in [0, {BODY[1]}]"),
    "classes 0": (edit(3, b"\x00"), "classes: 0 is not in [1, 16]"),
    "classes 17": (edit(3, b"\x11"), "classes: 17 is not in [1, 16]"),
    "rows 0": (edit(4, b"\x00"), "rows: 0 is not in [1, 3200]"),
    "rows not dividing": (edit(4, b"\x07"), "rows: 7 rows do not divide the 3200 elements"),
    "lanes beyond the count": (edit(ENDS["head"] - 1, varint(3201), 1), "lanes: 3201 is not in [1, 3200]"),
    "a row class >= classes": (edit(3, b"\x03"), "has a class >= 3"),  # 4 classes said 3: same 2 bits
    "table sum": (lambda b: b[:ENDS["row classes"]] + bytes([b[ENDS["row classes"]] ^ 1]) + b[ENDS["row classes"] + 1:],
                  "table: frequencies sum to"),
    "truncated in the tables": (lambda b: b[:ENDS["row classes"] + 3], "table: needs 1 bytes"),
    "truncated in the states": (lambda b: b[:ENDS["tables"] + 5], "states: needs"),
    "state below 2^16": (edit(ENDS["tables"] + 4, (0xFFFF).to_bytes(4, "little")), "states: a state below 2^16 (lane 1)"),
    "extra length beyond 2 x count": (edit(ENDS["states"], varint(6401), ENDS["extra start"] - ENDS["states"]),
                                      "extra length: 6401 is not in [0, 6400]"),
    "extra too short": (lambda b: with_extra(b[ENDS["extra start"]:ENDS["extra"] - 1])(b), "extra: "),
    "extra too long": (lambda b: with_extra(b[ENDS["extra start"]:ENDS["extra"]] + b"\0")(b), "extra: "),
    "odd words": (lambda b: b + b"\x00", "not a whole number of 16-bit words"),
    "words left over": (lambda b: b + b"\x00\x00", "words: 1 of"),
    "truncated words": (lambda b: b[:-2], "words: the stream ends"),
}


@pytest.mark.usefixtures("rans_loops")  # numpy and compiled loops
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_payload_is_refused_naming_the_payload_field(case: str) -> None:
    change, message = MALFORMED[case]
    with pytest.raises(kernelpack.KernelpackError, match="bad rans-ctx payload") as caught:
        entropy.decode_ctx(change(BODY), VALUES.dtype, COUNT)
    assert message in str(caught.value)


@pytest.mark.usefixtures("rans_loops")  # numpy and compiled loops
def test_nonzero_padding_bits_are_refused() -> None:
    """The last byte of the extra bits and of the row classes end in padding that must be 0."""
    used = 8 * ENDS["extra length"] - int(np.sum(entropy.tokens(entropy.to_unsigned(VALUES.reshape(-1)),
                                                                 BODY[1], BODY[2])[1]))
    assert 0 < used < 8, "the sample's extra bits must end inside a byte"
    last = ENDS["extra"] - 1
    with pytest.raises(kernelpack.KernelpackError, match="extra: the bits after the last value are not zero"):
        entropy.decode_ctx(edit(last, bytes([BODY[last] | 0x80]))(BODY), VALUES.dtype, COUNT)
    rows = np.zeros((36, 8), np.int8)  # 2 classes of 18 rows: 36 one-bit classes, 5 bytes
    rows[18:] = 100
    body = entropy.encode_ctx(rows, 36)
    assert body[3] == 2 and body[6:11] == b"\x00\x00\xfc\xff\x0f"
    with pytest.raises(kernelpack.KernelpackError, match="row classes: the bits after the last value are not zero"):
        entropy.decode_ctx(edit(10, b"\x8f")(body), rows.dtype, rows.size)


@pytest.mark.usefixtures("rans_loops")  # numpy and compiled loops
def test_every_truncation_of_a_payload_is_refused() -> None:
    for end in range(len(BODY)):
        with pytest.raises(kernelpack.KernelpackError, match="bad rans-ctx payload"):
            entropy.decode_ctx(BODY[:end], VALUES.dtype, COUNT)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), count=st.integers(1, 5000),
       dtype=st.sampled_from(sorted(entropy.DTYPES)))
@pytest.mark.usefixtures("rans_loops")  # numpy and compiled loops
def test_any_bytes_decode_or_are_refused_never_anything_else(data: bytes, count: int, dtype: str) -> None:
    try:
        out = entropy.decode_ctx(data, np.dtype(dtype), count)
    except kernelpack.KernelpackError as exc:
        assert "bad rans-ctx payload" in str(exc)
    else:
        assert out.shape == (count,) and out.dtype == np.dtype(dtype)


@pytest.mark.usefixtures("rans_loops")  # numpy and compiled loops
@settings(max_examples=100, deadline=None)
@given(position=st.integers(0, len(BODY) - 1), mask=st.integers(1, 255))
def test_a_flipped_byte_decodes_or_is_refused_never_anything_else(position: int, mask: int) -> None:
    body = bytearray(BODY)
    body[position] ^= mask
    try:
        out = entropy.decode_ctx(bytes(body), VALUES.dtype, COUNT)
    except kernelpack.KernelpackError as exc:
        assert "bad rans-ctx payload" in str(exc)
    else:
        assert out.shape == (COUNT,)


def outcome(body: bytes, loops: str) -> str | list[int]:
    """What ``decode_ctx`` makes of ``body`` with the numpy or the compiled loops: the elements,
    or the error's message."""
    with mock.patch.object(entropy, "_jit", (lambda: None) if loops == "numpy loops" else entropy._jit):
        try:
            return entropy.decode_ctx(body, VALUES.dtype, COUNT).tolist()
        except kernelpack.KernelpackError as exc:
            return str(exc)


@pytest.mark.parametrize("cut", [1, 2, 5, 20, ENDS["extra length"]])
def test_both_loops_name_the_same_element_whose_raw_bits_run_past_the_end(cut: int) -> None:
    """The compiled loop finds an overrun after the pass, from the values; the numpy one as it
    converts: the same element."""
    body = with_extra(BODY[ENDS["extra start"]:ENDS["extra"] - cut])(BODY)
    message = outcome(body, "compiled loops")
    assert "raw bits of element" in str(message) and message == outcome(body, "numpy loops")


@settings(max_examples=100, deadline=None)
@given(position=st.integers(0, len(BODY) - 1), mask=st.integers(1, 255))
def test_both_loops_make_the_same_of_a_flipped_byte(position: int, mask: int) -> None:
    body = bytearray(BODY)
    body[position] ^= mask
    assert outcome(bytes(body), "compiled loops") == outcome(bytes(body), "numpy loops")


# --- in a container ------------------------------------------------------------------------------
def channel_codes(dtype: str = "int16") -> Stored:
    rng = np.random.default_rng(7)
    values = np.rint(rng.laplace(0, 1, (64, 288)) * np.geomspace(2, 200, 64)[:, None])
    info = np.iinfo(dtype)
    values = np.clip(np.abs(values) if info.min == 0 else values, info.min, info.max).astype(dtype)
    return Stored(values, dtype, 2.0 ** -10 if dtype in ("int8", "int16") else None)


def saved(path: Path, stored: Stored, codecs: tuple[str, ...] = CODECS) -> RawFile:
    tensor = DenseTensor(stored, "float32" if stored.step is not None else stored.dtype)
    write(path, {"w": tensor}, codecs=codecs, compact=False)
    return RawFile.read(path)


@pytest.mark.parametrize("dtype", sorted(entropy.DTYPES))
def test_the_writer_keeps_rans_ctx_where_it_is_smallest_and_writes_1_5(dtype: str, tmp_path: Path) -> None:
    stored = channel_codes(dtype)
    raw = saved(tmp_path / "r.kpk", stored)
    assert raw.ref(*KEY)["codec"] == "rans-ctx" and raw.minor == 5
    assert raw.ref(*KEY)["length"] == len(entropy.encode_ctx(stored.data, 64))
    with Container(tmp_path / "r.kpk") as c:
        assert np.array_equal(c.encoded("w").arrays()["data"].data, stored.data) and all(c.verify().values())


def test_with_the_codecs_of_1_4_the_writer_writes_what_it_wrote_before(tmp_path: Path) -> None:
    raw = saved(tmp_path / "old.kpk", channel_codes(), codecs_of(4))
    assert raw.minor < 5 and raw.ref(*KEY)["codec"] in codecs_of(4)


def test_a_reader_of_1_4_refuses_a_1_5_file_as_an_unknown_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    """This reader with the version table of 1.4: the committed v1.5 file is refused when it is
    opened, never misread."""
    monkeypatch.setattr(kernelpack.reader, "VERSION", (1, 4))
    monkeypatch.setattr(kernelpack.codecs, "CODECS", codecs_of(4))
    monkeypatch.setattr(kernelpack.codecs, "ADDED_CODECS", {m: c for m, c in kernelpack.codecs.ADDED_CODECS.items() if m <= 4})
    path = VECTORS / "versions" / "v1.5-rans-ctx.kpk"
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.open(path)
    assert (caught.value.tensor, caught.value.field) == ("int8", "arrays.data.codec")
    assert "in a version 1.5 file, got 'rans-ctx'" in caught.value.reason and "needs a newer reader" in caught.value.reason
