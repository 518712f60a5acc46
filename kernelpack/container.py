"""The .kpk container: byte layout, atomic writer, validating reader (spec/FORMAT.md).

Layout::

    0   8   magic b"\\x89KPK\\r\\n\\x1a\\n"
    8   2   format major (uint16 LE)      10  2   format minor (uint16 LE)
    12  4   header length H (uint32 LE)   16  32  SHA-256 of bytes 0..16 and the header
    48  H   header (msgpack map)
        ... zero bytes up to a multiple of 64: the data area starts there
        payloads, each at a 64-aligned offset right after the previous one, zero gaps

The reader checks the whole header (every field, limits, layout) before it reads
or allocates any payload; every payload is checked against its SHA-256 before it
is decompressed; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import msgpack
import numpy as np

from kernelpack._backend import NUMPY_DTYPES, NumpyOps, Ops, get_ops
from kernelpack.errors import KernelpackError
from kernelpack.forms import FORMS, Encoded
from kernelpack.forms._base import ArraySpec, Stored, need, need_int, need_name, need_shape, need_step, shown
from kernelpack.forms.basis import MAX_BANK

MAGIC = b"\x89KPK\r\n\x1a\n"
VERSION = (1, 2)
PREAMBLE = 48
ALIGN = 64
MAX_HEADER = 64 << 20
CODECS = ("none", "zstd")
TOP_KEYS = frozenset({"metadata", "banks", "tensors"})
#: Top-level keys added by a minor version: a file of an older minor version may not use them.
ADDED_KEYS = {1: frozenset({"attachments"})}
TENSOR_KEYS = frozenset({"form", "shape", "dtype", "digest", "fields", "arrays"})
ARRAY_KEYS = frozenset({"dtype", "shape", "offset", "length", "codec", "sha256"})
#: Array-ref keys added by a minor version (1.2: ``step``, quantised numbers).
ADDED_ARRAY_KEYS = {2: frozenset({"step"})}
#: Maps and arrays in a header, in all, and how deep they may nest (spec/FORMAT.md, "Limits").
MAX_CONTAINERS = 1 << 20
MAX_DEPTH = 32


@dataclass(frozen=True)
class Limits:
    """What a file may make a reader allocate (spec/FORMAT.md, section 5, "Memory").

    ``max_decoded_bytes`` bounds every array a decode holds at once, counted at 8 bytes
    per element (float64, the decode's working precision and the widest dtype): the
    decoded tensor, each stored array as read and as inflated, each table and
    intermediate; a decode's peak memory is at most about 7 times it. ``max_header_bytes``
    bounds the header (parsing takes up to about 8 times its size). A file beyond them is
    refused before anything is allocated. A service opening untrusted files sets them to
    what it can afford; a caller with bigger tensors raises them.
    """

    max_decoded_bytes: int = 1 << 30
    max_header_bytes: int = MAX_HEADER

    def __post_init__(self) -> None:
        for name in ("max_decoded_bytes", "max_header_bytes"):
            need_int(getattr(self, name), f"limits.{name}", 0, 1 << 62)


class _HeaderBuilder:
    """msgpack hooks that build the header's maps and arrays and refuse, as they go, what
    could exhaust or crash a reader: more than MAX_CONTAINERS maps and arrays (an empty
    one costs some 70 bytes of memory for 1 byte of header), nesting deeper than MAX_DEPTH
    (code that walks a value recursively would overflow), a repeated key (readers would
    disagree on which one counts) and extension types (the spec forbids them)."""

    def __init__(self) -> None:
        self.count = 0
        self.depth: dict[int, int] = {}  # id -> depth > 1 of a container whose parent is not built yet

    def built(self, value: Any, children: Any) -> Any:
        self.count += 1
        if self.count > MAX_CONTAINERS:
            raise ValueError(f"more than {MAX_CONTAINERS} maps and arrays")
        kinds = set(map(type, children))  # at C speed: most children are scalars
        if msgpack.Timestamp in kinds:
            raise ValueError("extension types are not allowed")
        depth = 1
        if dict in kinds or list in kinds:
            depth += max(self.depth.pop(id(c), 1) for c in children if type(c) is dict or type(c) is list)
        if depth > MAX_DEPTH:
            raise ValueError(f"maps and arrays nest deeper than {MAX_DEPTH}")
        if depth > 1:
            self.depth[id(value)] = depth
        return value

    def map(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        value = dict(pairs)
        if len(value) != len(pairs):
            raise ValueError("a map repeats a key")
        return self.built(value, value.values())  # keys are str or bytes (strict_map_key)

    def list(self, items: list[Any]) -> list[Any]:
        return self.built(items, items)

    @staticmethod
    def ext(code: int, data: bytes) -> Any:
        raise ValueError("extension types are not allowed")


def parse_header(head: bytes) -> Any:
    """The header's msgpack object, within the structure limits; ValueError if it is not one."""
    builder = _HeaderBuilder()
    return msgpack.unpackb(head, raw=False, strict_map_key=True, use_list=True,
                           object_pairs_hook=builder.map, list_hook=builder.list, ext_hook=builder.ext)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def digest(array: np.ndarray, dtype: str) -> bytes:
    """SHA-256 of a decoded tensor: its little-endian C-order bytes in ``dtype``.

    A bfloat16 tensor decoded by numpy arrives widened to float32; its digest is
    taken over the bfloat16 bits (the upper halves), which the widening kept.
    """
    if dtype == "bfloat16" and array.dtype == np.float32:
        array = (np.asarray(array, order="C").view(np.uint32) >> 16).astype(np.uint16)
    return hashlib.sha256(np.asarray(array, dtype=NUMPY_DTYPES[dtype], order="C").tobytes()).digest()


# --- writing --------------------------------------------------------------------------
def _payload(stored: Stored, level: int) -> tuple[bytes, dict[str, Any]]:
    import zstandard

    raw = np.asarray(stored.data, dtype=NUMPY_DTYPES[stored.dtype], order="C").tobytes()
    packed = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw) if raw else b""
    codec, body = ("zstd", packed) if len(packed) < len(raw) else ("none", raw)
    ref = {"dtype": stored.dtype, "shape": list(stored.spec.shape), "codec": codec,
           "length": len(body), "sha256": hashlib.sha256(body).digest()}
    if stored.step is not None:
        ref["step"] = float(stored.step)  # msgpack float 64
    return body, ref


def write(path: str | os.PathLike, tensors: Mapping[str, Encoded],
          metadata: Mapping[str, str] | None = None, level: int = 19,
          attachments: Mapping[str, bytes] | None = None) -> None:
    """Write a container atomically: a temporary file in the same folder, fsync, rename.

    A writer killed at any moment leaves the previous file (or none), never a part.
    ``attachments`` are named opaque byte strings (e.g. the model's ONNX graph); the
    file is written in the lowest format version that can hold what it holds, so a
    file without attachments stays readable by 1.0 readers.
    """
    path = os.fspath(path)
    meta = dict(metadata or {})
    for key, value in meta.items():
        need(isinstance(key, str) and isinstance(value, str), "metadata", "must map str to str")
    banks: dict[str, Stored] = {}
    for name, tensor in tensors.items():
        for bank_name, bank in tensor.banks().items():
            old = banks.setdefault(bank_name, bank)
            if old is not bank and not (old.spec == bank.spec and np.array_equal(old.data, bank.data)):
                raise KernelpackError(f"two different banks are both named {bank_name!r}",
                                      path=path, tensor=name, field="bank")
    for name, tensor in tensors.items():
        try:
            _check_writable(name, tensor, banks)
        except KernelpackError as exc:
            raise exc.located(path=path, tensor=name) from None
    bodies: list[bytes] = []
    ref_keys: set[str] = set()  # every array-ref key used (the version depends on them)
    end = 0  # bytes of the data area so far

    def place(stored: Stored) -> dict[str, Any]:
        nonlocal end
        body, ref = _payload(stored, level)
        ref_keys.update(ref)
        ref["offset"] = _align(end)
        bodies.extend([b"\0" * (ref["offset"] - end), body])
        end = ref["offset"] + len(body)
        return ref

    header: dict[str, Any] = {"metadata": meta, "banks": {}, "tensors": {}}
    for bank_name in sorted(banks):
        header["banks"][bank_name] = place(banks[bank_name])
    if attachments:
        header["attachments"] = {}
        for att_name in sorted(attachments):
            need_name(att_name, "attachments")
            need(isinstance(attachments[att_name], (bytes, bytearray, memoryview)),
                 f"attachments.{att_name}", "must be bytes")
            blob = np.frombuffer(bytes(attachments[att_name]), dtype=np.uint8)
            header["attachments"][att_name] = place(Stored(blob, "uint8"))
    ops = NumpyOps()
    for name, tensor in tensors.items():
        header["tensors"][name] = {
            "form": tensor.form, "shape": list(tensor.shape), "dtype": tensor.dtype,
            "digest": digest(tensor.decode(ops), tensor.dtype), "fields": tensor.fields(),
            "arrays": {k: place(v) for k, v in tensor.arrays().items()},
        }
    head = msgpack.packb(header, use_bin_type=True)
    if len(head) > MAX_HEADER:
        raise KernelpackError(f"header of {len(head)} bytes exceeds the limit {MAX_HEADER}", path=path)
    try:
        parse_header(head)  # what the reader would refuse: too many maps and arrays
    except ValueError as exc:
        raise KernelpackError(f"header refused: {exc}", path=path, field="header") from None
    minor = max([m for m, keys in ADDED_KEYS.items() if keys & header.keys()]
                + [m for m, keys in ADDED_ARRAY_KEYS.items() if keys & ref_keys], default=0)
    _atomic_write(path, [header_block(head, minor), *bodies])


def header_block(head: bytes, minor: int, major: int = VERSION[0]) -> bytes:
    """Everything before the payloads: preamble (with the header's SHA-256), header, zero padding."""
    fixed = MAGIC + struct.pack("<HHI", major, minor, len(head))
    start = fixed + hashlib.sha256(fixed + head).digest() + head
    return start + b"\0" * (_align(len(start)) - len(start))


def _check_writable(name: str, tensor: Encoded, banks: Mapping[str, Stored]) -> None:
    """Refuse what the reader would refuse (e.g. a float16 coefficient that overflowed)."""
    need_name(name, "name")
    for bank_name in tensor.banks():
        need_name(bank_name, "bank")
    arrays = tensor.arrays()
    cls = type(tensor)
    cls.check(tuple(tensor.shape), tensor.dtype, tensor.fields(), {k: v.spec for k, v in arrays.items()},
              {k: v.spec for k, v in banks.items()})  # checks every step too (need_dtype)
    cls.build(tuple(tensor.shape), tensor.dtype, tensor.fields(), arrays, banks)


def _file_mode(path: str) -> int:
    """Keep an existing file's permissions; a new file gets 0o666 less the umask, as open() would."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_UMASK


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: os.umask is process-wide and not thread-safe


def _atomic_write(path: str, chunks: list[bytes]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _file_mode(path))  # mkstemp makes 0o600
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- reading --------------------------------------------------------------------------
@dataclass(frozen=True)
class ArrayRef:
    """A stored array's header entry: what it is and where its payload lies."""

    spec: ArraySpec
    offset: int
    length: int
    codec: str
    sha256: bytes


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's header entry, validated."""

    name: str
    form: str
    shape: tuple[int, ...]
    dtype: str
    digest: bytes
    fields: Mapping[str, Any]
    arrays: Mapping[str, ArrayRef]

    @property
    def stored_bytes(self) -> int:
        """Bytes of this tensor's payloads in the file (banks not included)."""
        return sum(ref.length for ref in self.arrays.values())

    @property
    def dense_bytes(self) -> int:
        """Bytes of the tensor as dense float32 (the reference for compression ratios)."""
        return int(np.prod(self.shape, dtype=np.int64)) * 4


def _key(key: Any) -> str:
    """An unknown header key as part of a field name (hostile keys can be long, or bytes)."""
    return key if isinstance(key, str) and len(key) <= 64 else shown(key)


def _parse_ref(value: Any, field: str, file_size: int, minor: int) -> ArrayRef:
    """An array ref of a file of minor version ``minor``; unknown keys (a key added after
    ``minor`` included) are ignored only in a file of a newer minor version than this reader."""
    need(isinstance(value, dict), field, "must be a map")
    known = ARRAY_KEYS.union(*(keys for m, keys in ADDED_ARRAY_KEYS.items() if m <= minor))
    unknown = sorted(set(value) - known, key=str)
    need(minor > VERSION[1] or not unknown, f"{field}.{_key(unknown[0]) if unknown else ''}",
         f"is not a field of a stored array in a version {VERSION[0]}.{minor} file")
    dtype = value.get("dtype")
    need(isinstance(dtype, str) and dtype in NUMPY_DTYPES, f"{field}.dtype", f"unknown dtype {shown(dtype)}")
    step = need_step(value["step"], dtype, f"{field}.step") if "step" in known and "step" in value else None
    spec = ArraySpec(dtype, need_shape(value.get("shape"), f"{field}.shape"), step)
    offset = need_int(value.get("offset"), f"{field}.offset", 0, file_size)
    length = need_int(value.get("length"), f"{field}.length", 0, file_size)
    codec = value.get("codec")
    need(codec in CODECS, f"{field}.codec", f"must be one of {CODECS}, got {shown(codec)}")
    if codec == "none":
        need(length == spec.nbytes, f"{field}.length",
             f"uncompressed payload must be {spec.nbytes} bytes for its dtype and shape, got {length}")
    sha = value.get("sha256")
    need(isinstance(sha, bytes) and len(sha) == 32, f"{field}.sha256", "must be 32 bytes")
    return ArrayRef(spec, offset, length, codec, sha)


class Container:
    """An open container: validated header, lazy access to single tensors.

    Use as ``with kernelpack.open(path) as c: c.get_tensor(name)``. Reading is
    thread-safe (positional reads on one descriptor). Opening checks every byte outside
    the payloads (header, layout, zero padding); each payload is checked when read.
    """

    def __init__(self, path: str | os.PathLike, limits: Limits | None = None) -> None:
        self.path = os.fspath(path)
        self.limits = limits if limits is not None else Limits()
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise KernelpackError(f"cannot open: {exc.strerror}", path=self.path) from None
        try:
            info = os.fstat(self._fd)
            if not stat.S_ISREG(info.st_mode):
                raise KernelpackError("not a regular file", path=self.path)
            self._size = info.st_size
            self._read_header()
        except BaseException:
            self.close()
            raise

    # context manager and lifetime
    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    # header
    def _pread(self, length: int, offset: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise KernelpackError(f"cannot read: {exc.strerror}", path=self.path) from None
        if len(data) != length:
            raise KernelpackError(f"truncated: {length} bytes expected at offset {offset}", path=self.path,
                                  field="size")
        return data

    def _read_header(self) -> None:
        if self._size < PREAMBLE:
            raise KernelpackError(f"truncated: {self._size} bytes, shorter than the "
                                  f"{PREAMBLE}-byte preamble", path=self.path, field="preamble")
        fixed = self._pread(PREAMBLE, 0)
        if fixed[:8] != MAGIC:
            raise KernelpackError("not a kernelpack container (bad magic)", path=self.path, field="magic")
        major, minor, length = struct.unpack("<HHI", fixed[8:16])
        if major != VERSION[0]:
            raise KernelpackError(
                f"format version {major}.{minor} needs a kernelpack reader for format {major}.x; "
                f"this reader reads {VERSION[0]}.0 to {VERSION[0]}.{VERSION[1]}",
                path=self.path, field="version")
        self.version = (major, minor)
        limit = min(MAX_HEADER, self.limits.max_header_bytes)
        if length > limit or PREAMBLE + length > self._size:
            raise KernelpackError(f"header length {length} exceeds the file ({self._size} bytes) or the "
                                  f"limit {limit}", path=self.path, field="header_length")
        head = self._pread(length, PREAMBLE)
        if hashlib.sha256(fixed[:16] + head).digest() != fixed[16:48]:
            raise KernelpackError("header checksum mismatch: the file is corrupted",
                                  path=self.path, field="header_sha256")
        try:
            header = parse_header(head)
        except Exception as exc:  # msgpack raises many types; report one
            raise KernelpackError(f"header is not valid msgpack within the limits: {exc}", path=self.path,
                                  field="header") from None
        self._header_end = PREAMBLE + length
        self._data_start = _align(self._header_end)
        try:
            self._parse(header)
        except KernelpackError as exc:
            raise exc.located(path=self.path) from None
        self.check_padding()

    @property
    def _newer(self) -> bool:
        """The file has a newer minor version than this reader: its unknown keys are ignored."""
        return self.version[1] > VERSION[1]

    def _known(self, keys: Any, allowed: frozenset[str], field: str) -> None:
        """Unknown keys are errors, unless the file has a newer minor version (then ignored)."""
        unknown = sorted(set(keys) - allowed, key=str)
        if unknown and not self._newer:
            raise KernelpackError(f"unknown field in a version {self.version[0]}.{self.version[1]} file",
                                  field=f"{field}{_key(unknown[0])}")

    def _parse(self, header: Any) -> None:
        need(isinstance(header, dict), "header", "must be a map")
        added = (keys for m, keys in ADDED_KEYS.items() if m <= self.version[1])
        self._known(header, TOP_KEYS.union(*added), "")
        meta = header.get("metadata", {})
        need(isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in meta.items()), "metadata", "must map str to str")
        self.metadata: dict[str, str] = meta
        banks, tensors = header.get("banks", {}), header.get("tensors")
        need(isinstance(banks, dict), "banks", "must be a map")
        need(isinstance(tensors, dict), "tensors", "must be a map")
        self._banks: dict[str, ArrayRef] = {}
        for name, value in banks.items():
            need_name(name, "banks")
            self._banks[name] = _parse_ref(value, f"banks.{name}", self._size, self.version[1])
            bank_shape = self._banks[name].spec.shape
            need(len(bank_shape) >= 2 and 1 <= bank_shape[0] <= MAX_BANK, f"banks.{name}.shape",
                 f"must be [n, *filter_shape] with 1 <= n <= {MAX_BANK}")
        attachments = header.get("attachments", {})
        need(isinstance(attachments, dict), "attachments", "must be a map")
        self._attachments: dict[str, ArrayRef] = {}
        for name, value in attachments.items():
            need_name(name, "attachments")
            ref = _parse_ref(value, f"attachments.{name}", self._size, self.version[1])
            need(ref.spec.dtype == "uint8" and len(ref.spec.shape) == 1, f"attachments.{name}",
                 "must be a uint8 array of rank 1 (bytes)")
            self._attachments[name] = ref
        self._tensors: dict[str, TensorInfo] = {}
        for name, entry in tensors.items():
            try:
                need_name(name, "name")
                self._tensors[name] = self._parse_tensor(name, entry)
            except KernelpackError as exc:
                raise exc.located(tensor=name) from None
        self._check_layout()
        self._bank_cache: dict[str, Stored] = {}

    def _parse_tensor(self, name: str, entry: Any) -> TensorInfo:
        need(isinstance(entry, dict), "", "entry must be a map")
        self._known(entry, TENSOR_KEYS, "")
        form = entry.get("form")
        need(isinstance(form, str), "form", "must be a string")
        shape = need_shape(entry.get("shape"), "shape")
        dtype = entry.get("dtype")
        need(isinstance(dtype, str) and dtype in NUMPY_DTYPES, "dtype", f"unknown dtype {shown(dtype)}")
        dig = entry.get("digest")
        need(isinstance(dig, bytes) and len(dig) == 32, "digest", "must be 32 bytes (SHA-256)")
        fields, arrays = entry.get("fields", {}), entry.get("arrays")
        need(isinstance(fields, dict), "fields", "must be a map")
        need(isinstance(arrays, dict) and all(isinstance(k, str) for k in arrays), "arrays",
             "must be a map of stored arrays")
        refs = {k: _parse_ref(v, f"arrays.{k}", self._size, self.version[1]) for k, v in arrays.items()}
        cls = FORMS.get(form)
        if cls is None:
            need(self._newer, "form", f"unknown form {shown(form)}")
        else:
            self._known(fields, cls.FIELDS, "fields.")
            need(form == "dense" or dtype == "float32", "dtype", "compressed forms decode to float32")
            cls.check(shape, dtype, fields, {k: r.spec for k, r in refs.items()},
                      {k: r.spec for k, r in self._banks.items()})
        return TensorInfo(name, form, shape, dtype, dig, fields, refs)

    def _regions(self) -> list[tuple[int, int, str | None, str]]:
        """(offset, length, tensor, field) of every payload, in file order."""
        regions = [(r.offset, r.length, None, f"banks.{n}") for n, r in self._banks.items()]
        regions += [(r.offset, r.length, None, f"attachments.{n}") for n, r in self._attachments.items()]
        for t in self._tensors.values():
            regions += [(r.offset, r.length, t.name, f"arrays.{k}") for k, r in t.arrays.items()]
        return sorted(regions, key=lambda region: region[:2])

    def _check_layout(self) -> None:
        """Payloads tile the data area in order: each at the first 64-aligned offset after the last."""
        end = 0
        for offset, length, tensor, field in self._regions():
            if offset != _align(end):
                raise KernelpackError(f"must be {_align(end)} (payloads are packed in order, "
                                      "64-aligned, no overlap)", tensor=tensor, field=f"{field}.offset")
            end = offset + length
        need(self._data_start + end == self._size, "size", f"file is {self._size} bytes; its header describes {self._data_start + end}")

    def check_padding(self) -> None:
        """Every byte outside header and payloads is zero (so every bit of the file is checked)."""
        spans = [(self._header_end, self._data_start)]
        end = 0
        for offset, length, _, _ in self._regions():
            spans.append((self._data_start + end, self._data_start + offset))
            end = offset + length
        for lo, hi in spans:
            if hi > lo and any(self._pread(hi - lo, lo)):
                raise KernelpackError(f"non-zero padding bytes at {lo}..{hi}: the file is corrupted",
                                      path=self.path, field="padding")

    # access
    def keys(self) -> list[str]:
        return list(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self._tensors:
            raise KeyError(name)
        return self._tensors[name]

    def bank_info(self) -> dict[str, ArrayRef]:
        return dict(self._banks)

    def attachments(self) -> list[str]:
        """Names of the attached byte strings (e.g. ``onnx.graph``)."""
        return list(self._attachments)

    def read_attachment(self, name: str) -> bytes:
        """One attachment's bytes, checked against its SHA-256 like any payload."""
        if name not in self._attachments:
            raise KernelpackError(f"no attachment {name!r}; the file has {sorted(self._attachments)}",
                                  path=self.path, field="attachments")
        return self.read_array(self._attachments[name], f"attachments.{name}").data.tobytes()

    def read_array(self, ref: ArrayRef, field: str, tensor: str | None = None) -> Stored:
        """One payload: checked against its SHA-256, decompressed to exactly its declared size."""
        size = max(ref.length, ref.spec.nbytes)
        if size > self.limits.max_decoded_bytes:
            raise KernelpackError(f"payload of {size} bytes exceeds the limit max_decoded_bytes="
                                  f"{self.limits.max_decoded_bytes} (see kernelpack.Limits)",
                                  path=self.path, tensor=tensor, field=field)
        body = self._pread(ref.length, self._data_start + ref.offset)
        if hashlib.sha256(body).digest() != ref.sha256:
            raise KernelpackError("payload checksum mismatch: the file is corrupted",
                                  path=self.path, tensor=tensor, field=field)
        if ref.codec == "zstd":
            body = self._inflate(body, ref.spec.nbytes, field, tensor)
        data = np.frombuffer(body, dtype=NUMPY_DTYPES[ref.spec.dtype]).reshape(ref.spec.shape)
        return Stored(data, ref.spec.dtype, ref.spec.step)

    def _inflate(self, body: bytes, size: int, field: str, tensor: str | None) -> bytes:
        """One zstd frame that declares exactly ``size`` bytes and nothing after it.

        zstd itself refuses to produce more than a frame's declared content size, so
        a payload never inflates beyond what its dtype and shape say.
        """
        import zstandard

        def bad(message: str) -> KernelpackError:
            return KernelpackError(message, path=self.path, tensor=tensor, field=field)

        try:
            declared = zstandard.get_frame_parameters(body).content_size
            if declared != size:
                raise bad(f"compressed payload declares {declared} bytes; its dtype and shape say {size}")
            # One-shot: one allocation of the declared size, about twice as fast as a
            # streaming object; bytes after the frame are an error (allow_extra_data).
            out = zstandard.ZstdDecompressor().decompress(body, max_output_size=size,
                                                          allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise bad(f"bad zstd payload: {exc}") from None
        if len(out) != size:
            raise bad("zstd payload is not exactly one frame of its declared size")
        return out

    def encoded(self, name: str) -> Encoded:
        """The tensor in its stored form, payloads read and checked."""
        info = self.info(name)
        cls = FORMS.get(info.form)
        if cls is None:
            raise KernelpackError(f"form {shown(info.form)} needs a newer kernelpack (file format "
                                  f"{self.version[0]}.{self.version[1]})", path=self.path, tensor=name,
                                  field="form")
        bank_name = info.fields.get("bank") if info.form == "basis" else None
        bank_specs = {bank_name: self._banks[bank_name].spec} if bank_name is not None else {}
        peak = cls.peak_elements(info.shape, info.fields, {k: r.spec for k, r in info.arrays.items()}, bank_specs)
        if 8 * peak > self.limits.max_decoded_bytes:
            raise KernelpackError(f"decoding needs an array of {peak} elements ({8 * peak} bytes as float64), "
                                  f"over the limit max_decoded_bytes={self.limits.max_decoded_bytes} "
                                  "(see kernelpack.Limits)", path=self.path, tensor=name, field="shape")
        arrays = {k: self.read_array(r, f"arrays.{k}", name) for k, r in info.arrays.items()}
        try:
            banks = {bank_name: self._bank(bank_name)} if bank_name is not None else {}
            return cls.build(info.shape, info.dtype, info.fields, arrays, banks)
        except KernelpackError as exc:
            raise exc.located(path=self.path, tensor=name) from None

    def check_payloads(self) -> None:
        """Check the payloads no tensor's decode reads (attachments, banks no tensor uses)
        against their SHA-256: after it and a decode of every tensor, every byte of the
        file has been checked."""
        for name in self._banks:
            self._bank(name)
        for name in self._attachments:
            self.read_attachment(name)

    def _bank(self, name: str) -> Stored:
        if name not in self._bank_cache:
            self._bank_cache[name] = self.read_array(self._banks[name], f"banks.{name}")
        return self._bank_cache[name]

    def decode(self, name: str, ops: Ops) -> Any:
        """Decode one tensor with ``ops`` (numpy or torch backend)."""
        return self.encoded(name).decode(ops)

    def get_numpy(self, name: str) -> np.ndarray:
        """One tensor decoded by numpy (no torch import). bfloat16 comes widened to float32."""
        return self.decode(name, NumpyOps())

    def get_tensor(self, name: str, device: Any = "cpu") -> Any:
        """One tensor decoded by torch on ``device`` (the arithmetic runs there)."""
        return self.decode(name, get_ops("torch", device))

    def verify(self, backend: str = "numpy", device: Any = "cpu") -> dict[str, bool]:
        """Decode every tensor and compare with the digest recorded at pack time (and check
        every other byte of the file again)."""
        self.check_padding()
        self.check_payloads()
        ops = get_ops(backend, device)
        return {name: self._matches(info, ops.to_numpy(self.decode(name, ops)))
                for name, info in self._tensors.items()}

    @staticmethod
    def _matches(info: TensorInfo, array: np.ndarray) -> bool:
        """Decoded shape, dtype and SHA-256 are the ones recorded at pack time."""
        dtype_ok = array.dtype == NUMPY_DTYPES[info.dtype] or (
            info.dtype == "bfloat16" and array.dtype in (np.float32, np.uint16))
        return tuple(array.shape) == info.shape and dtype_ok and digest(array, info.dtype) == info.digest
