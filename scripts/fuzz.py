"""Fuzz the kernelpack reader with damaged and hostile containers.

Every input is made from valid containers (the seeds: the committed vectors and small
containers with an ONNX graph) by one mutation, or from nothing, and given to the reader
(:func:`probe`): open, decode every tensor (numpy; torch for one input in
``--torch-every``), read every attachment, verify the digests; ``load_numpy``; for a file
with ``onnx.graph``, the graph checks and weights of ``ort_session``. The reader passes an input
if that succeeds or raises ``KernelpackError``; anything else (another exception, a
crash, a hang) is a finding. An input changed without re-signing (bit flips, truncation,
splices, random bytes) must moreover never load unless it equals a seed: corruption is
never decoded silently.

Mutations (``MUTATIONS``): raw ones that break checksums (``flip``, ``bytes``, ``truncate``,
``extend``, ``splice``, ``chunk``, ``random``) and signed ones that change the header or a
payload and then fix the SHA-256s and layout, so that the reader's later checks are
reached (``header`` hostile values anywhere in the header, ``preamble`` versions and
lengths, ``payload`` new payload bytes: NaN, bad zstd frames, bombs, wrong sizes,
``forged`` random headers from the format's vocabulary, ``graph`` a protobuf field of the
attached ONNX graph changed, added, repeated or deleted). scripts/fuzz_atheris.py uses the
same mutations under libFuzzer's coverage guidance.

Each input is a pure function of (--seed, its index), so a finding is reproduced with
``--replay INDEX --out FILE``. Long runs use worker processes watched by a watchdog that
kills a worker whose input runs longer than --timeout seconds and records it as a hang.

    python scripts/fuzz.py --count 1000000 --jobs 2 --time-limit 1800   # a long run
    python scripts/fuzz.py --replay 123456 --out bad.kpk                # one input as a file
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import glob
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import random
import resource
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import msgpack  # noqa: E402
import zstandard  # noqa: E402

import kernelpack  # noqa: E402
from kernelpack import ort  # noqa: E402
from kernelpack.layout import COMPACT, MAGIC, ZSTD_MAGIC, header_block, header_map_bytes, unaligned, ungroup  # noqa: E402

#: The reader's settings under test: the defaults, and what the README suggests for a service.
LIMITS_BY_NAME = {"default": kernelpack.Limits(), "service": kernelpack.Limits(max_decoded_bytes=16 << 20)}
#: What the fuzzed reader may allocate when not told: hostile shapes are refused, not decoded for seconds.
LIMITS = LIMITS_BY_NAME["service"]


# --- seeds ----------------------------------------------------------------------------------
def seed_files() -> list[bytes]:
    """The committed containers: the conformance vectors (every form, dtype and option, zstd,
    shared banks) and the version corpus (attachments, every version rule). Committed bytes,
    so the inputs are the same on every machine."""
    vectors = os.path.join(ROOT, "spec", "vectors")
    seeds = []
    for folder in (vectors, os.path.join(vectors, "versions")):
        for path in sorted(glob.glob(os.path.join(folder, "*.kpk"))):
            with open(path, "rb") as f:
                seeds.append(f.read())
    return seeds + graph_seeds()


# --- ONNX graphs: the protobuf wire format, for the graph seeds and the graph mutation -------
#: One protobuf field: [number, wire type, value]; the value is an int (varint), bytes
#: (fixed32/64, or length-delimited that is not a message) or a list of fields (a message).
PbField = list


def pb_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def pb_bytes(fields: list[PbField]) -> bytes:
    """A message's wire bytes (varints as the shortest encoding, so parse then write is exact for
    what protobuf writers emit)."""
    out = b""
    for number, wire, value in fields:
        out += pb_varint(number << 3 | wire)
        if wire == 0:
            out += pb_varint(value)
        elif wire == 2:
            body = pb_bytes(value) if isinstance(value, list) else value
            out += pb_varint(len(body)) + body
        else:
            out += value
    return out


def pb_parse(buf: bytes, depth: int = 0) -> list[PbField]:
    """A message as fields; a length-delimited value becomes a message when it parses as one and
    writes back to the same bytes (strings mostly do not); raises ValueError if ``buf`` is not a
    message."""
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = _pb_read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _pb_read_varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _pb_read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
            value = _pb_message(value, depth) if depth < 8 else value
        else:
            raise ValueError(f"wire type {wire}")
        if pos > len(buf) or number == 0:
            raise ValueError("truncated field")
        fields.append([number, wire, value])
    return fields


def _pb_read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(buf) and shift < 64:
        byte, pos = buf[pos], pos + 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated varint")


def _pb_message(value: bytes, depth: int) -> bytes | list[PbField]:
    try:
        fields = pb_parse(value, depth + 1)
    except ValueError:
        return value
    return fields if fields and pb_bytes(fields) == value else value


def pb_message(*fields: tuple[int, Any]) -> list[PbField]:
    """Fields from (number, value): an int is a varint, bytes or str length-delimited, a list a message."""
    out = []
    for number, value in fields:
        if isinstance(value, str):
            value = value.encode()
        out.append([number, 0 if isinstance(value, int) else 2, value])
    return out


def initializer(name: str, dims: tuple[int, ...], elem_type: int = 1, location: str | None = ort.LOCATION,
                raw: bytes | None = None) -> list[PbField]:
    """An ONNX TensorProto: a reference (``location``) or inline data (``raw``)."""
    fields = pb_message(*[(1, d) for d in dims], (2, elem_type), (8, name))
    if raw is not None:
        fields += pb_message((9, raw))
    if location is not None:
        fields += pb_message((13, pb_message((1, "location"), (2, location))), (14, ort.EXTERNAL))
    return fields


def model_proto(initializers: list[list[PbField]], nodes: list[tuple[str, list[str], str]]) -> bytes:
    """A small ONNX ModelProto (ir 8, opset 13): ``nodes`` are (op, inputs, output); graph input
    'x', output the last node's."""
    def value_info(name: str) -> list[PbField]:  # float tensor of unknown shape
        return pb_message((1, name), (2, pb_message((1, pb_message((1, 1))))))

    graph = pb_message(*[(1, pb_message(*[(1, i) for i in inputs], (2, out), (4, op))) for op, inputs, out in nodes],
                       (2, "fuzz"), *[(5, t) for t in initializers], (11, value_info("x")),
                       (12, value_info(nodes[-1][2])))
    return pb_bytes(pb_message((1, 8), (7, graph), (8, pb_message((1, ""), (2, 13)))))


@functools.lru_cache(maxsize=None)
def graph_seeds() -> list[bytes]:
    """Containers with an ``onnx.graph`` that reads their tensors, written by this kernelpack's
    writer from fixed arrays (dense only, so the bytes do not depend on a float library): a graph
    of references only, one with an inline initializer beside them, and one whose initializer
    points outside the container (the attack of issue 11, item 1), so that the graph checks
    are reached from the start."""
    import numpy as np

    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 8, "b": np.array([0.5, -1, 2], np.float32),
               "h": np.arange(4, dtype=np.float16)}
    nodes = [("MatMul", ["x", "w"], "y"), ("Add", ["y", "b"], "z"), ("Mul", ["z", "k"], "out")]
    refs = [initializer("w", (2, 3)), initializer("b", (3,)), initializer("h", (4,), elem_type=10)]
    inline = initializer("k", (3,), location=None, raw=np.ones(3, np.float32).tobytes())
    outside = initializer("k", (3,), location=".env")
    graphs = [model_proto(refs, nodes[:2]), model_proto(refs + [inline], nodes), model_proto(refs + [outside], nodes)]
    seeds = []
    with tempfile.TemporaryDirectory() as folder:
        for i, graph in enumerate(graphs):
            path = os.path.join(folder, f"{i}.kpk")
            kernelpack.save(tensors, path, level=3, attachments={ort.GRAPH: graph},
                            forms={"h": kernelpack.Dense(), "b": kernelpack.Dense(dtype="float16")})
            with open(path, "rb") as f:
                seeds.append(f.read())
    return seeds


# --- taking a container apart and putting it together ---------------------------------------
@dataclass
class Parts:
    """A container as version, header object and data area (payload offsets are relative to it)."""

    major: int
    minor: int
    header: Any
    data: bytes
    compressed: bool = False  # the header stored as a zstd frame (since 1.4)

    @classmethod
    def of(cls, seed: bytes) -> "Parts":
        major, minor, length = struct.unpack_from("<HHI", seed, 8)
        head = seed[48:48 + length]
        compressed = head[:4] == ZSTD_MAGIC
        header = msgpack.unpackb(header_map_bytes(head, minor), raw=False)
        data = seed[-(-(48 + length) // 64) * 64:]
        if isinstance(header, dict):
            ungroup(header, data)  # so an edit of one payload re-signs only that payload
        return cls(major, minor, header, data, compressed)

    def blob(self) -> bytes:
        """Laid out again with a correct header length and SHA-256, the header stored as it was."""
        head = msgpack.packb(self.header, use_bin_type=True)
        if self.compressed:
            head = zstandard.ZstdCompressor(write_content_size=True).compress(head)
        return header_block(head, self.minor, self.major) + self.data

    def graft(self, other: "Parts", name: str) -> None:
        """Add tensor ``name`` of ``other`` (a deep copy, with its payloads and, for a basis, its
        bank) to this container, re-packing the data area."""
        entry = copy.deepcopy(other.header["tensors"][name])
        grafted = list(entry["arrays"].values())
        bank = entry.get("fields", {}).get("bank")
        if isinstance(bank, str) and bank in other.header.get("banks", {}):
            self.header.setdefault("banks", {})[bank] = copy.deepcopy(other.header["banks"][bank])
            grafted.append(self.header["banks"][bank])
        self.header["tensors"][name] = entry
        start = len(self.data) + (-len(self.data) % 64)
        self.data += b"\0" * (start - len(self.data)) + other.data
        for ref in grafted:
            ref["offset"] += start
        self.relayout()

    def relayout(self, bodies: dict[int, bytes] | None = None) -> None:
        """Pack every payload (or its replacement in ``bodies``, by ``id`` of its ref) in order,
        fixing offsets, lengths and SHA-256s."""
        bodies = bodies or {}
        refs = self.refs()
        kept = [bodies.get(id(r), self.data[r["offset"]:r["offset"] + r["length"]]) for r in refs]
        data = b""
        for r, b in zip(refs, kept):
            if not (self.minor >= COMPACT and unaligned(r.get("codec"), len(b))):
                data += b"\0" * (-len(data) % 64)
            r.update(offset=len(data), length=len(b), sha256=hashlib.sha256(b).digest())
            data += b
        self.data = data

    def refs(self) -> list[dict]:
        """Every array-ref (banks, attachments, tensors' arrays), in data-area order."""
        groups = [self.header.get("banks", {}), self.header.get("attachments", {})]
        groups += [entry["arrays"] for entry in self.header["tensors"].values()]
        return sorted((r for g in groups for r in g.values()), key=lambda r: (r["offset"], r["length"]))

    def replace(self, ref: dict, body: bytes) -> None:
        """Put ``body`` in place of one payload, fix its length and SHA-256 and re-pack the data area."""
        self.relayout({id(ref): body})


def nodes(tree: Any, path: tuple = ()) -> list[tuple]:
    """Paths to every node of a header object."""
    found = [path]
    if isinstance(tree, dict):
        for k, v in tree.items():
            found += nodes(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            found += nodes(v, path + (i,))
    return found


def get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


VOCABULARY = ["metadata", "banks", "tensors", "attachments", "form", "shape", "dtype", "digest", "fields",
              "arrays", "groups", "offset", "length", "codec", "sha256", "axes", "boundary", "family", "harmonics",
              "points", "bank", "data", "coefficients", "index", "a", "b", "primaries", "A", "A1", "A2", "order",
              "dense", "dct", "series", "basis", "linear", "none", "zstd", "float16", "bfloat16", "float32",
              "float64", "int8", "uint8", "int16", "uint16", "int32", "int64", "bool", "cgl", "uniform",
              "cosine", "chebyshev"]
HOSTILE: list[Any] = [
    -1, 0, 1, 2, 7, 63, 64, 65, 255, 65535, 65536, 65537, 2**31 - 1, 2**31, 2**31 + 1, 2**32, 2**53 + 1,
    2**63 - 1, 2**64 - 1, -2**63, True, False, None, 0.0, -0.0, 0.5, 1.0, 1e300, float("nan"), float("inf"),
    "", "x", "..", "../../etc/passwd", "a\x00b", "a\u202eb", "\u00e9", "x" * 2000, b"", b"\0" * 32, b"\xff" * 31,
    [], [0], [1] * 9, [2**31, 2**31], [65536, 32768], [65536, 65536], [1, 0], [-1], [0.5], [True], ["cgl"],
    [[]], {}, {"a": 1}, {"": None}, deep(33), deep(500), msgpack.ExtType(5, b"ext"), msgpack.Timestamp(1, 0),
    *VOCABULARY,
]


def hostile(rng: random.Random, old: Any) -> Any:
    """A value to put where ``old`` was: from the list, or ``old`` nudged."""
    if isinstance(old, bool) or rng.random() < 0.6:
        return rng.choice(HOSTILE)
    if isinstance(old, int):
        return old + rng.choice([-65, -64, -1, 1, 63, 64, 2**16, 2**31, -old - 1, old])
    if isinstance(old, float):
        return rng.choice([-old, old * 2, old + 1e-9, 1.0000001, -1.0000001])
    if isinstance(old, str) and old:
        i = rng.randrange(len(old))
        return old[:i] + chr(rng.choice([0, 0x41, 0x2E, 0x2F, 0x7F, 0x85, 0x202E, 0xFFFF])) + old[i + 1:]
    if isinstance(old, bytes):
        return old[:-1] if old and rng.random() < 0.5 else old + b"\0"
    if isinstance(old, list):
        return old[:-1] if old and rng.random() < 0.5 else old + [rng.choice(HOSTILE)]
    return rng.choice(HOSTILE)


def random_header(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack object drawn from the format's vocabulary and hostile values."""
    roll = rng.random()
    if depth < 5 and roll < 0.35:
        return {rng.choice(VOCABULARY): random_header(rng, depth + 1) for _ in range(rng.randrange(6))}
    if depth < 5 and roll < 0.5:
        return [random_header(rng, depth + 1) for _ in range(rng.randrange(5))]
    return rng.choice(HOSTILE)


# --- mutations: (rng, a seed, all seeds) -> (input bytes, what was done) ---------------------
def flip(rng: random.Random, blob: bytes, seeds: list[bytes]) -> tuple[bytes, str]:
    out = bytearray(blob)
    bits = [rng.randrange(8 * len(out)) for _ in range(rng.choice([1, 1, 1, 2, 3, 8]))]
    for b in bits:
        out[b // 8] ^= 1 << (b % 8)
    return bytes(out), f"flip bits {bits}"


def set_bytes(rng: random.Random, blob: bytes, seeds: list[bytes]) -> tuple[bytes, str]:
    out = bytearray(blob)
    at = [rng.randrange(len(out)) for _ in range(rng.randint(1, 4))]
    for i in at:
        out[i] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    return bytes(out), f"set bytes at {at}"


def truncate(rng: random.Random, blob: bytes, seeds: list[bytes]) -> tuple[bytes, str]:
    n = rng.choice([rng.randrange(len(blob)), len(blob) - 1, 48, 47, 64])
    return blob[:n], f"truncate to {n}"


def extend(rng: random.Random, blob: bytes, seeds: list[bytes]) -> tuple[bytes, str]:
    n = rng.choice([1, 63, 64, 4096])
    tail = bytes(n) if rng.random() < 0.5 else rng.randbytes(n)
    return blob + tail, f"append {n} bytes"


def splice(rng: random.Random, blob: bytes, seeds: list[bytes]) -> tuple[bytes, str]:
    other = rng.choice(seeds)
    i, j = sorted(rng.randrange(len(blob) + 1) for _ in range(2))
    k = rng.randrange(len(other) + 1)
    piece = other[k:k + (j - i) + rng.choice([0, 0, -8, 8])]
    return blob[:i] + piece + blob[j:], f"splice {len(piece)} bytes of another seed at {i}..{j}"


def chunk(rng: random.Random, blob: bytes, seeds: list[bytes]) -> tuple[bytes, str]:
    i = rng.randrange(len(blob) + 1)
    if rng.random() < 0.5:
        n = rng.randint(1, 128)
        return blob[:i] + blob[i + n:], f"delete {n} bytes at {i}"
    n = rng.randint(1, 128)
    return blob[:i] + rng.randbytes(n) + blob[i:], f"insert {n} random bytes at {i}"


def random_bytes(rng: random.Random, blob: bytes, seeds: list[bytes]) -> tuple[bytes, str]:
    n = rng.randrange(600)
    body = rng.randbytes(n)
    if rng.random() < 0.5:
        fixed = MAGIC + struct.pack("<HHI", 1, rng.randrange(3), rng.randrange(n + 8))
        return fixed + body, f"magic and {n} random bytes"
    return body, f"{n} random bytes"


def header_value(rng: random.Random, blob: bytes, seeds: list[bytes]) -> tuple[bytes, str] | None:
    parts = Parts.of(blob)
    paths = nodes(parts.header)
    path = rng.choice(paths[1:] or paths)
    action = rng.random()
    if not path:
        parts.header = random_header(rng)
        what = "header replaced"
    elif action < 0.15 and isinstance(get(parts.header, path[:-1]), dict):
        del get(parts.header, path[:-1])[path[-1]]
        what = f"delete {list(path)}"
    elif action < 0.3 and isinstance(get(parts.header, path), dict):
        key = rng.choice(VOCABULARY + ["future", "x" * 70, ""])
        get(parts.header, path)[key] = rng.choice(HOSTILE)
        what = f"add key {key!r} at {list(path)}"
    else:
        old = get(parts.header, path)
        get(parts.header, path[:-1])[path[-1]] = new = hostile(rng, old)
        what = f"set {list(path)} from {_short(old)} to {_short(new)}"
    if rng.random() < 0.2:
        parts.minor = rng.choice([0, 1, 2, 0xFFFF])
        what += f", minor {parts.minor}"
    try:
        return parts.blob(), what
    except (ValueError, OverflowError, TypeError):  # msgpack cannot write it (e.g. too deep)
        return None


def preamble(rng: random.Random, blob: bytes, seeds: list[bytes]) -> tuple[bytes, str]:
    parts = Parts.of(blob)
    head = msgpack.packb(parts.header, use_bin_type=True)
    major, minor = rng.choice([(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 0xFFFF), (0, 1), (2, 0), (0xFFFF, 0)])
    length = rng.choice([len(head), len(head) + 1, len(head) - 1, 0, 2**32 - 1, (64 << 20) + 1])
    fixed = MAGIC + struct.pack("<HHI", major, minor, length)
    start = fixed + hashlib.sha256(fixed + head).digest() + head
    return start + b"\0" * (-len(start) % 64) + parts.data, f"version {major}.{minor}, header length {length}"


def payload(rng: random.Random, blob: bytes, seeds: list[bytes]) -> tuple[bytes, str] | None:
    parts = Parts.of(blob)
    refs = parts.refs()
    if not refs:
        return None
    ref = rng.choice(refs)
    old = parts.data[ref["offset"]:ref["offset"] + ref["length"]]
    size = ref["length"]
    choice = rng.randrange(8)
    if choice == 0:
        body, what = bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.1 else b for b in old), "flip bits"
    elif choice == 1:  # special numbers where floats are (NaN, inf, huge index)
        body = bytearray(old)
        for i in range(0, len(body) - 1, 2):
            if rng.random() < 0.2:
                body[i:i + 2] = rng.choice([b"\x00\x7e", b"\x00\x7c", b"\x00\xfc", b"\x80\x7f", b"\xff\xff"])
        body, what = bytes(body), "special values"
    elif choice == 2:
        body, what = zstandard.ZstdCompressor().compress(rng.randbytes(rng.choice([size, size + 1, 16]))), "zstd frame"
        ref["codec"] = rng.choice(["zstd", "zstd", "none"])
    elif choice == 3:
        body = bomb(rng.choice([1 << 20, 1 << 26]), rng.random() < 0.5)
        ref["codec"], what = "zstd", "zstd bomb"
    elif choice == 4:
        body, what = old + zstandard.ZstdCompressor().compress(b"x"), "two frames"
        ref["codec"] = "zstd"
    elif choice == 5:
        body, what = old[:rng.randrange(len(old) + 1)], "shorter payload"
    elif choice == 6:
        body, what = old + rng.randbytes(rng.randint(1, 64)), "longer payload"
    else:
        body, what = rng.randbytes(len(old)), "random payload"
    parts.replace(ref, body)
    return parts.blob(), f"payload {what} ({len(body)} bytes, codec {ref.get('codec')})"


@functools.lru_cache(maxsize=None)
def bomb(size: int, declared: bool) -> bytes:
    """A small zstd frame of ``size`` zero bytes, declaring its size or not."""
    return zstandard.ZstdCompressor(write_content_size=declared).compress(bytes(size))


def forged(rng: random.Random, blob: bytes, seeds: list[bytes]) -> tuple[bytes, str]:
    """A random header, correctly signed, over a seed's data area."""
    parts = Parts.of(blob)
    parts.header = random_header(rng)
    if isinstance(parts.header, dict) and rng.random() < 0.7:
        parts.header.setdefault("tensors", {})
    try:
        return parts.blob(), f"forged header {_short(parts.header)}"
    except (ValueError, OverflowError, TypeError):
        return parts.data, "forged header that msgpack cannot write"


#: Values the graph mutation puts in a graph: strings where names and locations are, varints
#: where element types, dims and data locations are, and fields a hostile graph adds to a
#: TensorProto (data location, external data entries, inline data, dims, type, name).
GRAPH_STRINGS = [ort.LOCATION.encode(), b".env", b"/etc/passwd", b"../../etc/passwd", b"file:///etc/passwd",
                 b"kernelpack/../.env", b"location", b"offset", b"length", b"checksum", b"basepath", b"",
                 b"\xff\xfe", b"a\x00b", b"x" * 300, b"w", b"b", b"h", b"k", b"missing"]
GRAPH_INTS = [0, 1, 2, 3, 7, 9, 10, 11, 13, 14, 16, 255, 65536, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]


def _entry(key: str, value: str) -> list[PbField]:
    return pb_message((1, key), (2, value))


GRAPH_FIELDS: list[tuple[int, Any]] = [
    (14, 1), (14, 0), (14, 2), (13, _entry("location", ".env")), (13, _entry("location", ort.LOCATION)),
    (13, _entry("offset", "0")), (13, _entry("length", "99999999999")), (13, _entry("location", "/etc/passwd")),
    (9, bytes(12)), (4, bytes(8)), (1, 65536), (1, 0), (2, 1), (2, 10), (8, "w"), (8, "k"), (5, pb_message((1, 1))),
]


def mutate_graph(rng: random.Random, graph: bytes) -> tuple[bytes, str]:
    """One structure-aware change to a serialized protobuf message (an ONNX graph): a field's
    value, a field deleted, repeated, renumbered or added, anywhere in the message tree; raw
    damage if ``graph`` does not parse."""
    try:
        tree = pb_parse(graph)
    except ValueError:
        tree = []
    messages = _pb_messages(tree)
    if not tree or rng.random() < 0.05:
        i = rng.randrange(len(graph) + 1)
        return graph[:i] + rng.randbytes(rng.choice([0, 1, 4])), f"raw damage at {i}"
    fields = rng.choice(messages)
    action = rng.random()
    if not fields or action < 0.25:
        number, value = rng.choice(GRAPH_FIELDS)
        fields.insert(rng.randrange(len(fields) + 1), pb_message((number, value))[0])
        what = f"add field {number}"
    else:
        at = rng.randrange(len(fields))
        number, wire, value = fields[at]
        if action < 0.4:
            del fields[at]
            what = f"delete field {number}"
        elif action < 0.5:
            fields.insert(at, list(fields[at]))
            what = f"repeat field {number}"
        elif action < 0.6:
            fields[at][0] = rng.choice([1, 2, 4, 5, 7, 8, 9, 13, 14, rng.randrange(1, 40)])
            what = f"renumber field {number} to {fields[at][0]}"
        elif wire == 0:
            fields[at][2] = rng.choice(GRAPH_INTS + [value + 1, max(value - 1, 0)])
            what = f"set varint {number} from {value} to {fields[at][2]}"
        elif wire == 2 and not isinstance(value, list):
            fields[at][2] = rng.choice(GRAPH_STRINGS + [value[:-1], value + b"\x00"])
            what = f"set bytes {number} from {_short(bytes(value))} to {_short(fields[at][2])}"
        else:
            fields[at][2] = rng.randbytes(len(pb_bytes([fields[at]])) % 16) if wire == 2 else rng.randbytes(len(value))
            what = f"set field {number} to random bytes"
    return pb_bytes(tree), what


def _pb_messages(tree: list[PbField]) -> list[list[PbField]]:
    """Every message of a parsed message tree, itself first."""
    found = [tree]
    for _, _, value in tree:
        if isinstance(value, list):
            found += _pb_messages(value)
    return found


def graph(rng: random.Random, blob: bytes, seeds: list[bytes]) -> tuple[bytes, str] | None:
    """A change to the attached ONNX graph, re-signed (so the graph checks are reached)."""
    parts = Parts.of(blob)
    ref = parts.header.get("attachments", {}).get(ort.GRAPH)
    if not isinstance(ref, dict):
        return None
    body = parts.data[ref["offset"]:ref["offset"] + ref["length"]]
    if ref.get("codec") != "none":
        body = zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 20)
    body, what = mutate_graph(rng, body)
    ref.update(shape=[len(body)], codec="none")
    parts.replace(ref, body)
    return parts.blob(), f"{what} ({len(body)} bytes)"


def graft(rng: random.Random, blob: bytes, seeds: list[bytes]) -> tuple[bytes, str] | None:
    """A tensor of another container (with its payloads and bank) added, re-signed: files whose
    tensors together reach what one tensor does not (the total memory and work, shared banks)."""
    parts, other = Parts.of(blob), Parts.of(rng.choice(seeds))
    names = list(other.header.get("tensors", {}))
    if not names:
        return None
    name = rng.choice(names)
    parts.graft(other, name)
    return parts.blob(), f"tensor {name!r} grafted ({other.header['tensors'][name].get('form')})"


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, (list, dict)) or len(repr(value)) < 200 else type(value).__name__
    return text[:60]


Mutation = Callable[[random.Random, bytes, list[bytes]], "tuple[bytes, str] | None"]
#: name -> (mutation, signed: the input fixes its checksums, so it may load)
MUTATIONS: dict[str, tuple[Mutation, bool]] = {
    "flip": (flip, False), "bytes": (set_bytes, False), "truncate": (truncate, False),
    "extend": (extend, False), "splice": (splice, False), "chunk": (chunk, False),
    "random": (random_bytes, False), "header": (header_value, True), "preamble": (preamble, True),
    "payload": (payload, True), "forged": (forged, True), "graph": (graph, True),
    "graft": (graft, True),
}
WEIGHTS = {"flip": 3, "bytes": 1, "truncate": 1, "extend": 1, "splice": 1, "chunk": 1, "random": 1,
           "header": 8, "preamble": 1, "payload": 4, "forged": 2, "graph": 3, "graft": 2}


def make_input(seeds: list[bytes], seed: int, index: int) -> tuple[bytes, str, bool]:
    """Input ``index`` of the run ``seed``: (bytes, 'mutation: what was done', signed)."""
    rng = random.Random(f"{seed}:{index}")
    names = list(WEIGHTS)
    while True:
        name = rng.choices(names, weights=[WEIGHTS[n] for n in names])[0]
        mutate, signed = MUTATIONS[name]
        made = mutate(rng, rng.choice(seeds), seeds)
        if made is not None:
            return made[0], f"{name}: {made[1]}", signed


# --- the reader under test --------------------------------------------------------------------
def probe(path: str, backend: str, limits: kernelpack.Limits = LIMITS) -> str:
    """Read a whole file as a service would: open and verify (every payload checked, every
    tensor decoded with ``backend``), ``load_numpy`` (the preloaded, threaded path) and, for a
    file with an ONNX graph, what ``ort_session`` does before ONNX Runtime sees the graph.
    'ok', 'ok, digest mismatch' or the first KernelpackError's field. Every step runs even
    after an earlier one refused the file: each path meets every input."""
    outcomes = [_step(path, lambda: _verify(path, backend, limits)),
                _step(path, lambda: _load_numpy(path, limits))]
    if outcomes[0].startswith("ok") and _has_graph(path, limits):
        outcomes.append(_step(path, lambda: read_graph(path, limits)))
    refused = [o for o in outcomes if not o.startswith("ok")]
    return refused[0] if refused else outcomes[0]


def _verify(path: str, backend: str, limits: kernelpack.Limits) -> str:
    with kernelpack.open(path, limits=limits) as c:
        results = c.verify(backend)
    return "ok" if all(results.values()) else "ok, digest mismatch"


def _load_numpy(path: str, limits: kernelpack.Limits) -> str:
    kernelpack.load_numpy(path, limits=limits)
    return "ok"


def _has_graph(path: str, limits: kernelpack.Limits) -> bool:
    with kernelpack.open(path, limits=limits) as c:
        return ort.GRAPH in c.attachments()


def read_graph(path: str, limits: kernelpack.Limits) -> str:
    """What ``ort_session`` reads before it starts ONNX Runtime: the graph, its references to the
    container's tensors, and those tensors decoded."""
    ort.graph_and_weights(path, limits)
    return "ok"


def _step(path: str, read: Callable[[], str]) -> str:
    """One read: its outcome, or the KernelpackError's field (which must name the file)."""
    try:
        return read()
    except kernelpack.KernelpackError as exc:
        if exc.path != path:
            raise AssertionError(f"an error that does not name the file: {exc}") from None
        return f"KernelpackError: {exc.field}"


@dataclass
class Stats:
    """What a run saw; merged across workers."""

    inputs: int = 0
    outcomes: Counter = field(default_factory=Counter)  # 'ok' / 'KernelpackError: field' / exception type
    mutations: Counter = field(default_factory=Counter)
    findings: list[dict] = field(default_factory=list)  # crashes, silent loads, hangs
    slowest: dict = field(default_factory=lambda: {"seconds": 0.0})

    def merge(self, other: "Stats") -> None:
        self.inputs += other.inputs
        self.outcomes.update(other.outcomes)
        self.mutations.update(other.mutations)
        self.findings += other.findings
        if other.slowest["seconds"] > self.slowest["seconds"]:
            self.slowest = other.slowest

    def exception_types(self) -> Counter:
        return Counter(o.split(":")[0] for o in self.outcomes.elements() if not o.startswith("ok"))


def put(fd: int, blob: bytes) -> None:
    """Make the file ``fd`` hold ``blob`` (rewriting one file in place: creating or emptying a
    file per input costs milliseconds on some file systems)."""
    os.pwrite(fd, blob, 0)
    os.ftruncate(fd, len(blob))


def run_one(seeds: list[bytes], seed_set: set[bytes], seed: int, index: int, target: tuple[int, str],
            torch_every: int, stats: Stats) -> None:
    """Make input ``index``, give it to the reader (file ``target``: descriptor, path), record what happened."""
    blob, what, signed = make_input(seeds, seed, index)
    fd, path = target
    put(fd, blob)
    backend = "torch" if torch_every and index % torch_every == 0 else "numpy"
    start = time.perf_counter()
    try:
        outcome = probe(path, backend)
    except BaseException as exc:  # a finding: anything but KernelpackError
        outcome = type(exc).__name__
        stats.findings.append({"index": index, "mutation": what, "exception": outcome,
                               "traceback": traceback.format_exc()[-2000:]})
        if isinstance(exc, KeyboardInterrupt):
            raise
    seconds = time.perf_counter() - start
    if outcome.startswith("ok") and not signed and blob not in seed_set:
        stats.findings.append({"index": index, "mutation": what, "exception": "corruption loaded silently"})
    stats.inputs += 1
    stats.outcomes[outcome] += 1
    stats.mutations[what.split(":")[0]] += 1
    if seconds > stats.slowest["seconds"]:
        stats.slowest = {"seconds": seconds, "index": index, "mutation": what, "backend": backend}


def run_range(seeds: list[bytes], seed: int, indices: range, torch_every: int = 0) -> Stats:
    """Inputs ``indices`` in this process (the CI test's run, and each worker's)."""
    warm_up(torch_every)
    stats = Stats()
    seed_set = set(seeds)
    with scratch() as target:
        for index in indices:
            run_one(seeds, seed_set, seed, index, target, torch_every, stats)
    return stats


@contextlib.contextmanager
def scratch() -> Iterator[tuple[int, str]]:
    """One file for the inputs, as (descriptor, path)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "input.kpk")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            yield fd, path
        finally:
            os.close(fd)


# --- workers and the watchdog -------------------------------------------------------------------
FLUSH = 500  # a worker reports every FLUSH inputs; what a killed worker had not reported is run again


def worker(seeds: list[bytes], seed: int, indices: range, skip: frozenset[int], torch_every: int,
           memory_mb: int, stall: tuple[int, float], current: Any, stop: Any, reports: Any) -> None:
    """Run inputs ``indices`` but ``skip``; ``current`` holds (index, start time) of the one
    running; ``reports`` is this worker's pipe. ``stall`` (index, seconds) sleeps before one
    input, to check the watchdog."""
    if memory_mb:  # a reader that tried to allocate beyond this would raise MemoryError: a finding
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    warm_up(torch_every)
    seed_set = set(seeds)
    stats, last = Stats(), -1
    with scratch() as target:
        for index in indices:
            if stop.is_set():
                break
            if index in skip:
                continue
            current[0], current[1] = index, time.time()
            if index == stall[0]:
                time.sleep(stall[1])
            run_one(seeds, seed_set, seed, index, target, torch_every, stats)
            last = index
            if stats.inputs == FLUSH:
                reports.send((last, stats, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
                stats = Stats()
    current[0] = -1
    reports.send((last, stats, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def warm_up(torch_every: int) -> None:
    """Do once what the first input would otherwise time: import torch, compress the bombs,
    load the compiled rans loops (numba's import and cache: about 0.8 s)."""
    import numpy as np

    from kernelpack import entropy

    values = np.random.default_rng(0).laplace(0, 20, (50, 100)).round()  # several lanes and row classes
    for codec in entropy.DECODERS:
        for dtype in sorted(entropy.DTYPES):  # numba compiles (or reads) one loop per dtype
            codes = values.clip(np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
            for array in (codes[:1, :3], codes):
                entropy.DECODERS[codec](entropy.encode_as(codec, array, array.shape), np.dtype(dtype), array.size)
    if torch_every:
        from kernelpack._backend import get_ops

        get_ops("torch")
    for size in (1 << 20, 1 << 26):
        for declared in (True, False):
            bomb(size, declared)


@dataclass
class Lane:
    """Every ``step``-th index from ``next_index`` (the first not yet reported), and its worker."""

    next_index: int
    step: int
    skip: set[int] = field(default_factory=set)  # inputs that hung or killed a worker
    process: Any = None
    current: Any = None
    reports: Any = None  # the receiving end of the worker's pipe (one per worker: killing a
    # worker while it writes can only break its own pipe)


def fuzz(seeds: list[bytes], seed: int, count: int, jobs: int, timeout: float, time_limit: float,
         torch_every: int, memory_mb: int, stall: int = -1) -> tuple[Stats, int, float]:
    """Run ``count`` inputs over ``jobs`` workers under the watchdog; (stats, peak RSS KiB, seconds).

    A worker whose input runs longer than ``timeout`` is killed, the input recorded as a
    hang, and a new worker goes on from the first input the old one had not reported.
    """
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    total, peak = Stats(), 0
    lanes = [Lane(j, jobs) for j in range(jobs)]
    started = time.time()

    def launch(lane: Lane) -> None:
        lane.current = ctx.Array("d", [-1.0, 0.0], lock=False)
        lane.reports, sender = ctx.Pipe(duplex=False)
        lane.process = ctx.Process(target=worker, daemon=True, args=(
            seeds, seed, range(lane.next_index, count, lane.step), frozenset(lane.skip), torch_every,
            memory_mb, (stall, 2 * timeout + 1), lane.current, stop, sender))
        lane.process.start()
        sender.close()

    def drain(lane: Lane) -> None:
        nonlocal peak
        try:
            while lane.reports.poll():
                last, stats, rss = lane.reports.recv()
                total.merge(stats)
                peak = max(peak, rss)
                if last >= 0:
                    lane.next_index = max(lane.next_index, last + lane.step)
        except (EOFError, OSError, pickle.UnpicklingError):  # the worker died, perhaps mid-report
            pass

    def lost(lane: Lane, index: int, finding: str) -> None:
        """The worker of ``lane`` died on input ``index``: record it and start another after it."""
        lane.process.join()
        drain(lane)
        _, what, _ = make_input(seeds, seed, index)
        total.findings.append({"index": index, "mutation": what, "exception": finding})
        total.inputs += 1
        total.outcomes[finding.split(" ")[0]] += 1
        total.mutations[what.split(":")[0]] += 1
        lane.skip.add(index)
        launch(lane)

    for lane in lanes:
        launch(lane)
    while any(lane.process is not None for lane in lanes):
        time.sleep(0.05)
        if time_limit and time.time() - started > time_limit:
            stop.set()
        for lane in lanes:
            if lane.process is None:
                continue
            drain(lane)
            index, since = int(lane.current[0]), lane.current[1]
            if index >= 0 and time.time() - since > timeout:
                lane.process.kill()
                lost(lane, index, f"hang over {timeout} s")
            elif not lane.process.is_alive():
                if lane.process.exitcode != 0 and index >= 0:  # e.g. killed by the system
                    lost(lane, index, f"worker died with exit code {lane.process.exitcode}")
                else:
                    lane.process.join()
                    drain(lane)
                    lane.process = None
    peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return total, peak, time.time() - started


def report(stats: Stats, peak_kib: int, seconds: float, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "command": "python scripts/fuzz.py " + " ".join(sys.argv[1:]),
        "inputs": stats.inputs, "seconds": round(seconds, 1),
        "inputs_per_second": round(stats.inputs / max(seconds, 1e-9)),
        "seed": args.seed, "jobs": args.jobs, "max_decoded_bytes": LIMITS.max_decoded_bytes,
        "exception_types": dict(stats.exception_types().most_common()),
        "outcomes": dict(stats.outcomes.most_common()),
        "mutations": dict(stats.mutations.most_common()),
        "slowest": stats.slowest, "peak_rss_mib": round(peak_kib / 1024, 1),
        "findings": stats.findings[:50], "finding_count": len(stats.findings),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="inputs to run (default 1,000,000)")
    parser.add_argument("--seed", type=int, default=0, help="run seed: input i is a function of (seed, i)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--time-limit", type=float, default=0, help="stop after this many seconds (0: none)")
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds after which an input is a hang")
    parser.add_argument("--torch-every", type=int, default=10, help="decode every Nth input with torch (0: never)")
    parser.add_argument("--memory-mb", type=int, default=8192, help="address-space limit per worker (0: none)")
    parser.add_argument("--report", help="write the JSON report here too")
    parser.add_argument("--stall", type=int, default=-1, help="sleep past the timeout at this input "
                        "(checks the watchdog)")
    parser.add_argument("--replay", type=int, help="write input REPLAY to --out and read it once")
    parser.add_argument("--out", default="input.kpk", help="file for --replay")
    args = parser.parse_args()
    seeds = seed_files()
    if args.replay is not None:
        blob, what, signed = make_input(seeds, args.seed, args.replay)
        with open(args.out, "wb") as f:
            f.write(blob)
        print(f"input {args.replay}: {what} (signed: {signed}) -> {args.out}")
        print(probe(args.out, "numpy"))
        return 0
    stats, peak, seconds = fuzz(seeds, args.seed, args.count, args.jobs, args.timeout, args.time_limit,
                                args.torch_every, args.memory_mb, args.stall)
    result = report(stats, peak, seconds, args)
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 1 if stats.findings else 0


if __name__ == "__main__":
    sys.exit(main())
