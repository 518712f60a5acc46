"""Codec ``rans`` (format 1.3, spec/FORMAT.md section 2.1): int8/int16/uint8/uint16 arrays coded
by interleaved rANS with a static table per array. A decoder written from the spec's text
alone (``spec_decode``, scalar Python, no numpy) reproduces the reference decoder on the
conformance vectors and on generated arrays; the encoder reproduces the committed vector
bytes; every malformed payload is a KernelpackError naming the payload field, never a crash;
the writer keeps rans only where it is smallest and only then writes 1.3; readers of 1.2
refuse it as an unknown codec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

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
RANS_VECTORS = ("rans.kpk", "rans_large.kpk")
KEY = ("tensors", "w", "data")


# --- a decoder from the spec's text ----------------------------------------------------------
def spec_decode(body: bytes, dtype: str, count: int) -> list[int]:
    """FORMAT.md 2.1, "Payload" and "Decode", step by step in Python integers (valid payloads)."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        value, shift = 0, 0
        while True:
            byte = body[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    n = body[0]
    pos, m = 1, 1 << n
    k, lanes, escapes = varint(), varint(), varint()
    freq: list[int] = []
    while len(freq) < k + 1:
        v = varint()
        freq += [v] if v else [0] * (varint() + 1)
    cum = [sum(freq[:s]) for s in range(k + 1)]
    slot_symbol = [s for s in range(k + 1) for _ in range(freq[s])]
    x = [int.from_bytes(body[pos + 4 * i:pos + 4 * i + 4], "little") for i in range(lanes)]
    pos += 4 * lanes
    size = np.dtype(dtype).itemsize
    escape_values = [int.from_bytes(body[pos + size * i:pos + size * i + size], "little") for i in range(escapes)]
    pos += size * escapes
    words = [int.from_bytes(body[i:i + 2], "little") for i in range(pos, len(body), 2)]
    values, p = [], 0
    for t in range(-(-count // lanes)):
        for lane in range(min(lanes, count - t * lanes)):
            j = x[lane] % m
            s = slot_symbol[j]
            values.append(s)
            x[lane] = freq[s] * (x[lane] // m) + j - cum[s]
            if x[lane] < 1 << 16:
                x[lane] = x[lane] * (1 << 16) + words[p]
                p += 1
    assert p == len(words) and all(state == 1 << 16 for state in x)
    escaped = iter(escape_values)
    values = [next(escaped) if s == k else s for s in values]
    if np.dtype(dtype).kind == "i":
        values = [(u >> 1) ^ -(u & 1) for u in values]
    return values


VECTOR_ARRAYS = codec_payloads([VECTORS / f for f in RANS_VECTORS], "rans")
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
    assert entropy.encode(decoded) == body


@pytest.mark.usefixtures("rans_loops")  # numpy and compiled loops
def test_the_vectors_decode_to_the_manifest_digests() -> None:
    manifest = json.loads((VECTORS / "manifest.json").read_text(encoding="utf-8"))["files"]
    for name in RANS_VECTORS:
        assert manifest[name]["version"] == [1, 3]
        with Container(VECTORS / name) as c:
            assert c.version == (1, 3) and all(c.verify().values())
            for tensor, entry in manifest[name]["tensors"].items():
                assert c.info(tensor).digest.hex() == entry["sha256"]


# --- round trips -------------------------------------------------------------------------------
@st.composite
def int_arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays of every dtype the codec takes: Laplacian codes of any scale, constants, uniform
    values over the whole range, and a few outliers at the extremes."""
    dtype = np.dtype(draw(st.sampled_from(sorted(entropy.DTYPES))))
    info = np.iinfo(dtype)
    size = draw(st.integers(1, 3000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["laplace", "constant", "uniform"]))
    if kind == "laplace":
        values = np.rint(rng.laplace(0, draw(st.floats(0.01, 3000)), size)) + (info.min < 0 and 0 or 40)
    elif kind == "constant":
        values = np.full(size, draw(st.integers(int(info.min), int(info.max))))
    else:
        values = rng.integers(int(info.min), int(info.max) + 1, size)
    values = np.clip(values, info.min, info.max).astype(dtype)
    if draw(st.booleans()):
        values[rng.integers(0, size, 3)] = [info.min, info.max, info.max - 1]
    return values


@pytest.mark.usefixtures("rans_loops")  # numpy and compiled loops
@settings(max_examples=20, deadline=None)
@given(values=int_arrays())
def test_every_array_round_trips_and_the_spec_decoder_agrees(values: np.ndarray) -> None:
    body = entropy.encode(values)
    decoded = entropy.decode(body, values.dtype, values.size)
    assert decoded.dtype == values.dtype and np.array_equal(decoded, values)
    if values.size <= 200:
        assert spec_decode(body, str(values.dtype), values.size) == values.tolist()


@pytest.mark.usefixtures("rans_loops")  # numpy and compiled loops
@pytest.mark.parametrize("dtype", sorted(entropy.DTYPES))
def test_extremes_of_every_dtype_round_trip(dtype: str) -> None:
    info = np.iinfo(dtype)
    for values in ([info.min], [info.max], [info.min, info.max], [0] * 5 + [info.max] * 3):
        array = np.array(values, dtype=dtype)
        assert np.array_equal(entropy.decode(entropy.encode(array), array.dtype, array.size), array)


def entropy_bits(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def test_a_large_array_costs_its_order_0_entropy_and_the_lane_states() -> None:
    """2^18 Laplacian int16 codes: within 1.5% of the order-0 entropy (the lane states alone
    cost 1/32 bit per code)."""
    values = np.rint(np.random.default_rng(3).laplace(0, 20, 1 << 18)).astype(np.int16)
    bits = 8 * len(entropy.encode(values)) / values.size
    assert entropy_bits(values) < bits < 1.015 * entropy_bits(values)


# --- malformed payloads ------------------------------------------------------------------------
def sample() -> tuple[np.ndarray, bytes]:
    """A payload with escapes, several lanes and a table with a zero run."""
    values = np.rint(np.random.default_rng(5).laplace(0, 2, 3000)).astype(np.int16)
    values[[3, 900]] = [-32768, -32768]
    return values, entropy.encode(values)


VALUES, BODY = sample()


def fields_end(body: bytes) -> dict[str, int]:
    """Offsets where each payload field ends in the sample."""
    reader = entropy._Reader(body)
    reader.take(1, "precision")
    k = reader.varint("symbols", 0, 1 << 16)
    lanes = reader.varint("lanes", 0, 1 << 31)
    escapes = reader.varint("escapes", 0, 1 << 31)
    head = reader.pos
    entropy._read_table(reader, k + 1, 1 << body[0])
    table = reader.pos
    return {"k": k, "lanes": lanes, "escapes": escapes, "head": head, "table": table,
            "states": table + 4 * lanes, "escape values": table + 4 * lanes + 2 * escapes}


ENDS = fields_end(BODY)


def edit(offset: int, new: bytes, old_length: int | None = None) -> Callable[[bytes], bytes]:
    def change(body: bytes) -> bytes:
        return body[:offset] + new + body[offset + (len(new) if old_length is None else old_length):]
    return change


def state(lane: int, value: int) -> Callable[[bytes], bytes]:
    return edit(ENDS["table"] + 4 * lane, value.to_bytes(4, "little"))


MALFORMED: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda b: b"", "precision: needs 1 bytes"),
    "precision 0": (edit(0, b"\x00"), "precision: 0 is not in [1, 15]"),
    "precision 16": (edit(0, b"\x10"), "precision: 16 is not in [1, 15]"),
    "symbols beyond the dtype": (edit(1, b"\x80\x80\x04", 1), "symbols: 65536 is not in [0, 65535]"),
    "varint not shortest": (edit(1, bytes([BODY[1] | 0x80, 0x80, 0x00]), 1), "not in its shortest form"),
    "varint too long": (edit(1, b"\xff" * 6, 1), "longer than 5 bytes"),
    "lanes 0": (lambda b: b[:ENDS["head"] - 2] + b"\x00" + b[ENDS["head"] - 1:], "lanes: 0 is not in [1, 3000]"),
    "escapes beyond the count": (lambda b: b[:ENDS["head"] - 1] + b"\xff\x7f" + b[ENDS["head"]:],
                                 "escapes: 16383 is not in [0, 3000]"),
    "table sum": (lambda b: b[:ENDS["head"]] + bytes([b[ENDS["head"]] ^ 1]) + b[ENDS["head"] + 1:],
                  "table: frequencies sum to"),
    "truncated in the table": (lambda b: b[:ENDS["head"] + 3], "table: needs 1 bytes"),
    "truncated in the states": (lambda b: b[:ENDS["table"] + 5], "states: needs"),
    "state below 2^16": (state(1, 0xFFFF), "states: a state below 2^16 (lane 1)"),
    "escape value below K": (edit(ENDS["states"], b"\x00\x00"), "escape values: a value below"),
    "odd words": (lambda b: b + b"\x00", "not a whole number of 16-bit words"),
    "words left over": (lambda b: b + b"\x00\x00", "words: 1 of"),
    "truncated words": (lambda b: b[:-2], "words: the stream ends"),
    "no words": (lambda b: b[:ENDS["escape values"]], "words: the stream ends"),
}


@pytest.mark.usefixtures("rans_loops")  # numpy and compiled loops
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_payload_is_refused_naming_the_payload_field(case: str) -> None:
    change, message = MALFORMED[case]
    with pytest.raises(kernelpack.KernelpackError, match="bad rans payload") as caught:
        entropy.decode(change(BODY), VALUES.dtype, VALUES.size)
    assert message in str(caught.value)


@pytest.mark.usefixtures("rans_loops")  # numpy and compiled loops
def test_a_lane_that_does_not_end_in_the_initial_state_is_refused() -> None:
    """One lane, one symbol (frequency M: decoding leaves the state as it is), started at
    2^16 + 1: every word is used, and only the final state is wrong."""
    zeros = np.zeros(10, np.int8)
    body = entropy.encode(zeros)
    start = len(body) - 4
    assert int.from_bytes(body[start:], "little") == 1 << 16
    with pytest.raises(kernelpack.KernelpackError, match="lane 0 does not end in the state 2"):
        entropy.decode(body[:start] + (65537).to_bytes(4, "little"), zeros.dtype, zeros.size)


@pytest.mark.usefixtures("rans_loops")  # numpy and compiled loops
def test_every_truncation_of_a_payload_is_refused() -> None:
    for end in range(len(BODY)):
        with pytest.raises(kernelpack.KernelpackError, match="bad rans payload"):
            entropy.decode(BODY[:end], VALUES.dtype, VALUES.size)


@pytest.mark.usefixtures("rans_loops")  # numpy and compiled loops
def test_a_wrong_escape_count_is_refused() -> None:
    """The payload declares one escape fewer: its values no longer line up with the symbols."""
    fewer = edit(ENDS["head"] - 1, bytes([ENDS["escapes"] - 1]))(BODY)
    assert ENDS["escapes"] == 2
    body = fewer[:ENDS["states"]] + fewer[ENDS["states"] + 2:]  # drop one escape value, keep the words
    with pytest.raises(kernelpack.KernelpackError, match="escapes: 1 declared, 2 decoded"):
        entropy.decode(body, VALUES.dtype, VALUES.size)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), count=st.integers(1, 5000),
       dtype=st.sampled_from(sorted(entropy.DTYPES)))
@pytest.mark.usefixtures("rans_loops")  # numpy and compiled loops
def test_any_bytes_decode_or_are_refused_never_anything_else(data: bytes, count: int, dtype: str) -> None:
    """The decode loop runs ceil(count / lanes) steps, each reading at most one word per lane,
    so any payload ends after O(count + length) work."""
    try:
        out = entropy.decode(data, np.dtype(dtype), count)
    except kernelpack.KernelpackError as exc:
        assert "bad rans payload" in str(exc)
    else:
        assert out.shape == (count,) and out.dtype == np.dtype(dtype)


# --- in a container ------------------------------------------------------------------------------
def saved(path: Path, stored: Stored, codecs: tuple[str, ...] = codecs_of(3)) -> RawFile:
    """Written at level 19, where these codes were sized (at the default level 3, zstd-shuffle
    frames of laplace_codes come out 0.2% smaller than rans)."""
    tensor = DenseTensor(stored, "float32" if stored.step is not None else stored.dtype)
    write(path, {"w": tensor}, level=19, codecs=codecs, compact=False)
    return RawFile.read(path)


def laplace_codes(dtype: str = "int16", size: int = 16384, scale: float = 6.0) -> Stored:
    values = np.rint(np.random.default_rng(7).laplace(0, scale, size)).astype(dtype)
    return Stored(values, dtype, 2.0 ** -10 if dtype in ("int8", "int16") else None)


@pytest.mark.parametrize("dtype", sorted(entropy.DTYPES))
def test_the_writer_keeps_rans_where_it_is_smallest_and_writes_1_3(dtype: str, tmp_path: Path) -> None:
    signed = laplace_codes(dtype if dtype.startswith("int") else "int16")
    stored = signed if dtype.startswith("int") else Stored(np.abs(signed.data).astype(dtype), dtype)
    raw = saved(tmp_path / "r.kpk", stored)
    assert raw.ref(*KEY)["codec"] == "rans" and raw.minor == 3
    assert raw.ref(*KEY)["length"] == len(entropy.encode(stored.data))
    with Container(tmp_path / "r.kpk") as c:
        assert np.array_equal(c.encoded("w").arrays()["data"].data, stored.data) and all(c.verify().values())


@pytest.mark.parametrize("codecs", [codecs_of(2), None], ids=["codecs_of(2)", "default"])
def test_without_rans_the_writer_writes_what_it_wrote_before(codecs: tuple[str, ...] | None, tmp_path: Path) -> None:
    """codecs_of(2), the codecs of 1.2, and the default (rans is opt-in): a 1.2 writer's file."""
    path = tmp_path / "old.kpk"
    if codecs is None:
        kernelpack.save({"w": laplace_codes().values()}, path, forms=kernelpack.Dense(step=2.0 ** -10), compact=False)
    else:
        saved(path, laplace_codes(), codecs)
    raw = RawFile.read(path)
    assert raw.minor == 2 and raw.ref(*KEY)["codec"] in ("zstd", "zstd-shuffle")


def test_rans_is_never_tried_on_other_dtypes(tmp_path: Path) -> None:
    """bfloat16 has the numpy dtype of uint16; the stored dtype decides."""
    bits = np.abs(laplace_codes("int16").data).astype(np.uint16) + 0x3F00
    assert saved(tmp_path / "b.kpk", Stored(bits, "bfloat16"), ("rans",)).ref(*KEY)["codec"] == "none"


def coded(path: Path, codec: str) -> RawFile:
    """A one-array file whose codes the writer stores with ``codec`` (rans or rans-ctx)."""
    if codec == "rans":
        return saved(path, laplace_codes())
    from test_codec_rans_ctx import channel_codes

    return saved(path, channel_codes(), CODECS)


@pytest.mark.parametrize("codec", sorted(entropy.DECODERS))
@pytest.mark.parametrize("dtype, shape", [("float16", [4096]), ("int32", [4096]), ("bfloat16", [4096]),
                                          ("int16", [0])])
def test_an_entropy_codec_on_an_array_it_does_not_take_is_refused_when_the_file_opens(
        codec: str, dtype: str, shape: list[int], tmp_path: Path) -> None:
    raw = coded(tmp_path / "r.kpk", codec)
    assert raw.ref(*KEY)["codec"] == codec
    raw.ref(*KEY).update(dtype=dtype, shape=shape)
    raw.header["tensors"]["w"]["dtype"] = "float32" if dtype == "bfloat16" else dtype
    raw.ref(*KEY).pop("step")
    raw.write(tmp_path / "r.kpk")
    with pytest.raises(kernelpack.KernelpackError, match=f"{codec} is only for non-empty arrays") as caught:
        Container(tmp_path / "r.kpk")
    assert (caught.value.tensor, caught.value.field) == ("w", "arrays.data.codec")


@pytest.mark.parametrize("codec", sorted(entropy.DECODERS))
def test_a_malformed_payload_in_a_file_names_file_tensor_and_array(codec: str, tmp_path: Path) -> None:
    raw = coded(tmp_path / "r.kpk", codec)
    raw.replace_payload(KEY, raw.payload(*KEY)[:-2])  # with its SHA-256: the stream is what is wrong
    raw.write(tmp_path / "r.kpk")
    with pytest.raises(kernelpack.KernelpackError, match=f"bad {codec} payload: words") as caught:
        kernelpack.load_numpy(tmp_path / "r.kpk")
    assert (caught.value.path, caught.value.tensor, caught.value.field) == (str(tmp_path / "r.kpk"), "w",
                                                                            "arrays.data")


def test_a_reader_of_1_2_refuses_a_1_3_file_as_an_unknown_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    """This reader with the version table of 1.2 (its version, codecs and the minors that added
    them): the committed v1.3 file is refused when it is opened, never misread."""
    monkeypatch.setattr(kernelpack.reader, "VERSION", (1, 2))
    monkeypatch.setattr(kernelpack.codecs, "CODECS", ("none", "zstd", "zstd-shuffle"))
    monkeypatch.setattr(kernelpack.codecs, "ADDED_CODECS", {2: frozenset({"zstd-shuffle"})})
    path = VECTORS / "versions" / "v1.3-rans.kpk"
    with pytest.raises(kernelpack.KernelpackError) as caught:
        kernelpack.open(path)
    assert (caught.value.tensor, caught.value.field) == ("int8", "arrays.data.codec")
    assert "in a version 1.3 file, got 'rans'" in caught.value.reason and "needs a newer reader" in caught.value.reason
