"""The validating reader: an open container (``Container``) and its checked header entries.

The reader checks the whole header (every field, limits, layout) before it reads
or allocates any payload; every payload is checked against its SHA-256 before it
is decompressed; nothing is unpickled.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import os
import stat
import struct
import threading
from dataclasses import dataclass
from typing import Any, Collection, Iterator, Mapping

import numpy as np

from kernelpack import entropy
from kernelpack._backend import NUMPY_DTYPES, NumpyOps, Ops, get_ops
from kernelpack._progress import progress as progress_bar
from kernelpack.codecs import _declared, _one_frame, _unshuffle, codecs_of
from kernelpack.errors import KernelpackError
from kernelpack.files import need_file_name
from kernelpack.forms import FORMS, Encoded
from kernelpack.forms._base import (ELEMENT_WORK, ArraySpec, Cost, Stored, key_shown, need, need_int, need_name,
                                    need_shape, need_step, shown)
from kernelpack.forms.basis import MAX_BANK, check_bank, check_bank_values
from kernelpack.layout import (ADDED_ARRAY_KEYS, ADDED_KEYS, ARRAY_KEYS, COMPACT, DICTIONARY, GROUP_KEYS, GROUPED,
                               MAGIC, MAX_GROUP, PREAMBLE, TENSOR_KEYS, TOP_KEYS, VERSION, ZSTD_MAGIC, _align,
                               digest, parse_header, unaligned)
from kernelpack.limits import MAX_HEADER, Budget, Limits

#: Verified groups a reader keeps, in bytes, when they are not views of the preloaded file.
GROUP_CACHE = 4 << 20
#: A whole-file load (``Container(..., preload=True)``) reads everything after the header with
#: one read when that is at most this many bytes (and within ``Limits.max_decoded_bytes``),
#: instead of one read per payload and per padding gap: measured on 2 cores, PP-OCRv4 det
#: (2.2 MB, 124 tensors) loads 14% faster, while a 20 MB ResNet-18 loaded 5 to 10% slower
#: (a fresh 20 MB buffer to fault in). Bigger files are read payload by payload, so that a
#: load never holds the whole file beside the decoded tensors.
PRELOAD_MAX = 8 << 20


@dataclass(frozen=True)
class ArrayRef:
    """A stored array's header entry: what it is and where its payload lies."""

    spec: ArraySpec
    offset: int
    length: int
    codec: str
    sha256: bytes | None  # None: its bytes are checked by the hash group it lies in (1.6)


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

    def __repr__(self) -> str:  # the digest as 8 hex digits, not 32 bytes
        return (f"TensorInfo(name={self.name!r}, form={self.form!r}, shape={self.shape}, dtype={self.dtype!r}, "
                f"stored_bytes={self.stored_bytes}, digest={self.digest.hex()[:8]}...)")

    @property
    def dense_bytes(self) -> int:
        """Bytes of the tensor as dense float32 (the reference for compression ratios)."""
        return int(np.prod(self.shape, dtype=np.int64)) * 4


def _need_codec(codec: Any, spec: ArraySpec, field: str, minor: int, known: tuple[str, ...]) -> str:
    """A codec of the file's minor version, ``known = codecs_of(minor)`` (every codec this
    reader knows, in a newer one): a codec added later is refused like an unknown one, so no
    reader misreads its bytes. ``zstd-shuffle`` needs elements of more than one byte (one
    plane is the array itself)."""
    if codec not in known:  # messages formatted only on failure: this runs once per array ref
        newer = (f" (a codec of a newer format version? this reader reads {VERSION[0]}.{VERSION[1]}: the file "
                 "needs a newer reader)") if minor > VERSION[1] else ""
        raise KernelpackError(f"must be one of {known} in a version {VERSION[0]}.{minor} file, "
                              f"got {shown(codec)}{newer}", field=field)
    if codec == "zstd-shuffle" and NUMPY_DTYPES[spec.dtype].itemsize == 1:
        raise KernelpackError(f"zstd-shuffle is only for elements of more than one byte, not {spec.dtype}",
                              field=field)
    if codec in ("rans", "rans-ctx") and (spec.dtype not in entropy.DTYPES or spec.size == 0):
        raise KernelpackError(f"{codec} is only for non-empty arrays of {sorted(entropy.DTYPES)}, not "
                              f"{spec.dtype} of shape {list(spec.shape)}", field=field)
    return codec


def _parse_ref(value: Any, field: str, file_size: int, minor: int, codecs: tuple[str, ...]) -> ArrayRef:
    """An array ref of a file of minor version ``minor`` (whose codecs are ``codecs_of(minor)``,
    worked out once per file); unknown keys (a key added after ``minor`` included) are
    ignored only in a file of a newer minor version than this reader."""
    need(isinstance(value, dict), field, "must be a map")
    known = ARRAY_KEYS
    if not value.keys() <= known:  # keys added by a minor version, or unknown ones
        known = known.union(*(keys for m, keys in ADDED_ARRAY_KEYS.items() if m <= minor))
        if not value.keys() <= known and minor <= VERSION[1]:
            unknown = sorted(set(value) - known, key=str)
            raise KernelpackError(f"is not a field of a stored array in a version {VERSION[0]}.{minor} file",
                                  field=f"{field}.{key_shown(unknown[0])}")
    dtype = value.get("dtype")
    if not (isinstance(dtype, str) and dtype in NUMPY_DTYPES):
        raise KernelpackError(f"unknown dtype {shown(dtype)}", field=f"{field}.dtype")
    step = need_step(value["step"], dtype, f"{field}.step") if "step" in known and "step" in value else None
    dependent = "dq_step" in known and "dq_step" in value
    if dependent:
        need(step is None, f"{field}.dq_step", "an array holds codes of one kind: step or dq_step, not both")
        step = need_step(value["dq_step"], dtype, f"{field}.dq_step", levels=2)
    spec = ArraySpec(dtype, need_shape(value.get("shape"), f"{field}.shape"), step, dependent)
    offset = need_int(value.get("offset"), f"{field}.offset", 0, file_size)
    length = need_int(value.get("length"), f"{field}.length", 0, file_size)
    codec = _need_codec(value.get("codec"), spec, f"{field}.codec", minor, codecs)
    if codec == "none":
        need(length == spec.nbytes, f"{field}.length",
             f"uncompressed payload must be {spec.nbytes} bytes for its dtype and shape, got {length}")
    sha = value.get("sha256")
    if sha is None and "sha256" not in value and minor >= GROUPED and length > 0:
        return ArrayRef(spec, offset, length, codec, None)  # in a hash group: checked with the layout
    need(isinstance(sha, bytes) and len(sha) == 32, f"{field}.sha256", "must be 32 bytes")
    return ArrayRef(spec, offset, length, codec, sha)


@dataclass(frozen=True)
class Integrity:
    """What :meth:`Container.integrity` found. ``ranges``: the KernelpackError of each byte range
    outside the tensors' payloads that fails (``padding``, ``banks.NAME``, ``attachments.NAME``;
    absent when it passes). ``tensors``: per tensor True (decodes to its recorded digest), False
    (decodes, to other bits) or the KernelpackError that stopped its decode (a payload's
    checksum, a limit)."""

    ranges: dict[str, KernelpackError]
    tensors: dict[str, "bool | KernelpackError"]

    def failures(self) -> list[KernelpackError]:
        """The errors, byte ranges first, then tensors in the file's order."""
        return list(self.ranges.values()) + [v for v in self.tensors.values() if isinstance(v, KernelpackError)]

    @property
    def ok(self) -> bool:
        return not self.ranges and all(v is True for v in self.tensors.values())


class Container:
    """An open container: validated header, lazy access to single tensors.

    Use as ``with kernelpack.open(path) as c: c.get_tensor(name)``. Reading is
    thread-safe (positional reads on one descriptor). Opening checks every byte outside
    the payloads (header, layout, zero padding); each payload is checked when read.
    """

    def __init__(self, path: str | os.PathLike, limits: Limits | None = None, preload: bool = False) -> None:
        """``preload``: the caller will read every payload (a whole-file load), so read them
        all at once after the header checks, if they fit PRELOAD_MAX and the limits."""
        self.path = need_file_name(path)
        if limits is not None and not isinstance(limits, Limits):
            raise KernelpackError(f"must be a kernelpack.Limits, got {type(limits).__name__}", path=self.path,
                                  field="limits")
        self.limits = limits if limits is not None else Limits()
        self._costs: dict[str, Cost] = {}
        self._preloaded: memoryview | None = None  # the file from the header's end, if preloaded
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise KernelpackError(f"cannot open: {exc.strerror}", path=self.path) from None
        try:
            info = os.fstat(self._fd)
            if not stat.S_ISREG(info.st_mode):
                raise KernelpackError("not a regular file", path=self.path)
            self._size = info.st_size
            self.budget = Budget(self.limits, self.path, self._size)  # the work and memory of its decodes
            self._read_header(preload)
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
        self._preloaded = None
        self._group_cache = {}  # its views would keep the preloaded file alive
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        if not hasattr(self, "_tensors"):  # its header was refused
            return f"<kernelpack.Container {getattr(self, 'path', None)!r} (not opened)>"
        state = "open" if self._fd >= 0 else "closed"
        version = ".".join(map(str, getattr(self, "version", ())))
        return f"<kernelpack.Container {self.path!r} format {version}, {len(self._tensors)} tensors, {state}>"

    # header
    def _pread(self, length: int, offset: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise KernelpackError(f"cannot read: {exc.strerror}", path=self.path) from None
        except MemoryError:
            raise KernelpackError(f"out of memory reading {length} bytes (see kernelpack.Limits)",
                                  path=self.path) from None
        if len(data) != length:
            raise KernelpackError(f"truncated: {length} bytes expected at offset {offset}", path=self.path,
                                  field="size")
        return data

    def _read_header(self, preload: bool) -> None:
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
        if head[:4] == ZSTD_MAGIC:
            head = self._inflate_header(head, limit)
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
        if preload:
            self._preload()
        self.check_padding()

    def _inflate_header(self, head: bytes, limit: int) -> bytes:
        """A compressed header (since 1.4): one zstd frame declaring its size, at most ``limit``
        bytes, checked before anything is allocated, with nothing after it."""
        import zstandard

        def bad(message: str) -> KernelpackError:
            return KernelpackError(message, path=self.path, field="header")

        if self.version[1] < COMPACT:
            raise bad(f"is a zstd frame, which a version {self.version[0]}.{self.version[1]} header cannot be "
                      f"(compressed headers are a {VERSION[0]}.{COMPACT} feature)")
        declared = _declared(head, bad, "compressed header")
        if declared == zstandard.CONTENTSIZE_UNKNOWN or declared > limit:
            raise bad(f"compressed header declares {'no size' if declared == zstandard.CONTENTSIZE_UNKNOWN else declared}"
                      f"; it must declare at most {limit} bytes (the header limit)")
        return _one_frame(head, declared, bad, "compressed header", dictionary=self.version[1] >= DICTIONARY)

    def _preload(self) -> None:
        """One read of everything after the header, once the header and layout are checked,
        if it is at most PRELOAD_MAX bytes and within ``limits.max_decoded_bytes`` (so this
        read allocates no more than the largest payload the limits allow)."""
        size = self._size - self._header_end
        if size <= min(PRELOAD_MAX, self.limits.max_decoded_bytes):
            self._preloaded = memoryview(self._pread(size, self._header_end))

    def _read(self, length: int, offset: int) -> bytes | memoryview:
        """``length`` bytes at ``offset`` after the header: from the preloaded bytes if any (the
        layout check put every payload and gap inside them), else one positional read."""
        if self._preloaded is None:
            return self._pread(length, offset)
        start = offset - self._header_end
        return self._preloaded[start:start + length]

    @property
    def _newer(self) -> bool:
        """The file has a newer minor version than this reader: its unknown keys are ignored."""
        return self.version[1] > VERSION[1]

    def _known(self, keys: Any, allowed: frozenset[str], field: str) -> None:
        """Unknown keys are errors, unless the file has a newer minor version (then ignored)."""
        if allowed.issuperset(keys) or self._newer:  # the common case: no sorting
            return
        unknown = sorted(set(keys) - allowed, key=str)
        if unknown:
            raise KernelpackError(f"unknown field in a version {self.version[0]}.{self.version[1]} file",
                                  field=f"{field}{key_shown(unknown[0])}")

    def _parse(self, header: Any) -> None:
        need(isinstance(header, dict), "header", "must be a map")
        added = (keys for m, keys in ADDED_KEYS.items() if m <= self.version[1])
        self._known(header, TOP_KEYS.union(*added), "")
        meta = header.get("metadata", {})
        need(isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in meta.items()), "metadata", "must map str to str")
        self._metadata: dict[str, str] = meta
        banks, tensors = header.get("banks", {}), header.get("tensors")
        need(isinstance(banks, dict), "banks", "must be a map")
        need(isinstance(tensors, dict), "tensors", "must be a map")
        self._codecs = codecs_of(self.version[1])  # every array ref checks its codec against them
        self._banks: dict[str, ArrayRef] = {}
        for name, value in banks.items():
            need_name(name, "banks")
            self._banks[name] = _parse_ref(value, f"banks.{name}", self._size, self.version[1], self._codecs)
            bank_shape = self._banks[name].spec.shape
            need(len(bank_shape) >= 2 and 1 <= bank_shape[0] <= MAX_BANK, f"banks.{name}.shape",
                 f"must be [n, *filter_shape] with 1 <= n <= {MAX_BANK}")
        self._bank_specs = {name: ref.spec for name, ref in self._banks.items()}  # every tensor's check reads them
        attachments = header.get("attachments", {})
        need(isinstance(attachments, dict), "attachments", "must be a map")
        self._attachments: dict[str, ArrayRef] = {}
        for name, value in attachments.items():
            need_name(name, "attachments")
            ref = _parse_ref(value, f"attachments.{name}", self._size, self.version[1], self._codecs)
            need(ref.spec.dtype == "uint8" and len(ref.spec.shape) == 1, f"attachments.{name}",
                 "must be a uint8 array of rank 1 (bytes)")
            self._attachments[name] = ref
        self._tensors: dict[str, TensorInfo] = {}
        for name, entry in tensors.items():
            need_name(name, "tensors")  # before the error can name the tensor: a bad name is not shown raw
            try:
                self._tensors[name] = self._parse_tensor(name, entry)
            except KernelpackError as exc:
                raise exc.located(tensor=name) from None
        for name, spec in self._bank_specs.items():  # banks no tensor names too (those it names passed)
            check_bank(spec, name)
        self._groups = self._parse_groups(header.get("groups", []) if self.version[1] >= GROUPED else [])
        self._check_layout()
        self._check_groups()
        self._bank_cache: dict[str, Stored] = {}
        self._group_cache: dict[int, bytes | memoryview] = {}  # verified group bytes, oldest first
        self._group_lock = threading.Lock()

    def _parse_groups(self, value: Any) -> list[tuple[int, int, bytes]]:
        """The hash groups (since 1.6): (offset, length, sha256) byte ranges of the data area in
        ascending order, none overlapping, each 1 to MAX_GROUP bytes."""
        need(isinstance(value, list), "groups", "must be a list of hash groups")
        groups: list[tuple[int, int, bytes]] = []
        end = 0
        for i, entry in enumerate(value):
            field = f"groups[{i}]"
            need(isinstance(entry, dict), field, "must be a map")
            self._known(entry, GROUP_KEYS, f"{field}.")
            offset = need_int(entry.get("offset"), f"{field}.offset", end, self._size)
            length = need_int(entry.get("length"), f"{field}.length", 1, MAX_GROUP)
            sha = entry.get("sha256")
            need(isinstance(sha, bytes) and len(sha) == 32, f"{field}.sha256", "must be 32 bytes")
            groups.append((offset, length, sha))
            end = offset + length
        return groups

    def _check_groups(self) -> None:
        """Every payload without its own ``sha256`` lies inside one hash group, every group holds
        one such payload and ends inside the data area (so every group byte is a payload or a
        zero gap the layout check placed)."""
        self._group_starts = [offset for offset, _, _ in self._groups]
        used: set[int] = set()
        for ref, tensor, field in self._all_refs():
            if ref.sha256 is None:
                i = self._group_of(ref)
                if i < 0 or ref.offset + ref.length > self._groups[i][0] + self._groups[i][1]:
                    raise KernelpackError("is missing, and the payload lies in no hash group (spec section 2.4)",
                                          tensor=tensor, field=f"{field}.sha256")
                used.add(i)
        data_size = self._size - self._data_start
        for i, (offset, length, _) in enumerate(self._groups):
            need(offset + length <= data_size, f"groups[{i}].length",
                 f"ends at {offset + length}, after the data area ({data_size} bytes)")
            need(i in used, f"groups[{i}]", "holds no payload that lacks its own sha256")

    def _parse_tensor(self, name: str, entry: Any) -> TensorInfo:
        need(isinstance(entry, dict), "", "entry must be a map")
        self._known(entry, TENSOR_KEYS, "")
        form = entry.get("form")
        need(isinstance(form, str), "form", "must be a string")
        shape = need_shape(entry.get("shape"), "shape")
        dtype = entry.get("dtype")
        if not (isinstance(dtype, str) and dtype in NUMPY_DTYPES):
            raise KernelpackError(f"unknown dtype {shown(dtype)}", field="dtype")
        dig = entry.get("digest")
        need(isinstance(dig, bytes) and len(dig) == 32, "digest", "must be 32 bytes (SHA-256)")
        fields, arrays = entry.get("fields", {}), entry.get("arrays")
        need(isinstance(fields, dict), "fields", "must be a map")
        need(isinstance(arrays, dict) and all(isinstance(k, str) for k in arrays), "arrays",
             "must be a map of stored arrays")
        refs = {k: _parse_ref(v, f"arrays.{key_shown(k)}", self._size, self.version[1], self._codecs)
                for k, v in arrays.items()}
        cls = FORMS.get(form)
        if cls is None:
            if not self._newer:
                raise KernelpackError(f"unknown form {shown(form)}", field="form")
        else:
            self._known(fields, cls.FIELDS, "fields.")
            if not cls.FIELDS <= fields.keys():  # every field a form defines is required
                raise KernelpackError(f"is missing (a {form} tensor needs the fields {sorted(cls.FIELDS)})",
                                      field=min(cls.FIELDS - fields.keys()))
            need(cls.ANY_DTYPE or dtype == "float32", "dtype", "compressed forms decode to float32")
            cls.check(shape, dtype, fields, {k: r.spec for k, r in refs.items()}, self._bank_specs)
        return TensorInfo(name, form, shape, dtype, dig, fields, refs)

    def _regions(self) -> list[tuple[int, int, str | None, str, bool]]:
        """(offset, length, tensor, field, unaligned) of every payload, in file order: by (offset,
        length), ties (zero-length payloads at one offset) in header order — banks, attachments,
        then each tensor's arrays — which the stable sort keeps. The order of ties decides only
        which payload an error names, never whether the layout is valid. ``unaligned``: it may
        start right after the previous payload (a compressed or empty one, in a 1.4 file)."""
        compact = self.version[1] >= COMPACT
        regions = [(r.offset, r.length, tensor, field, compact and unaligned(r.codec, r.length))
                   for r, tensor, field in self._all_refs()]
        return sorted(regions, key=lambda region: region[:2])

    def _all_refs(self) -> Iterator[tuple[ArrayRef, str | None, str]]:
        """(array-ref, tensor, field) of every payload, in header order: banks, attachments,
        then each tensor's arrays."""
        yield from ((r, None, f"banks.{n}") for n, r in self._banks.items())
        yield from ((r, None, f"attachments.{n}") for n, r in self._attachments.items())
        for t in self._tensors.values():
            yield from ((r, t.name, f"arrays.{key_shown(k)}") for k, r in t.arrays.items())

    def _group_of(self, ref: ArrayRef) -> int:
        """The index of the last hash group starting at or before ``ref`` (-1 if none)."""
        return bisect.bisect_right(self._group_starts, ref.offset) - 1

    def _check_layout(self) -> None:
        """Payloads tile the data area in order: each at the first 64-aligned offset after the last
        (in a 1.4 file a compressed or empty payload may instead start right after it).

        Only the payloads this reader knows take part, so bytes owned by a key it does not know
        (a key of a newer minor version, ignored) break the tiling: such a file is refused
        (field ``….offset`` of the next known payload, or ``size``), never read in part."""
        self._layout = self._regions()  # check_padding walks it again
        unknown = (" (a file of a newer minor version may hold payloads under keys this reader does not "
                   "know)") if self._newer else ""
        end = 0
        for offset, length, tensor, field, packed in self._layout:
            if offset != _align(end) and not (packed and offset == end):
                allowed = f"{end} or {_align(end)}" if packed and end != _align(end) else f"{_align(end)}"
                raise KernelpackError(f"must be {allowed} (payloads are packed in order, 64-aligned, in a 1.4 file "
                                      f"a compressed or empty one may follow unaligned; no overlap){unknown}",
                                      tensor=tensor, field=f"{field}.offset")
            end = offset + length
        need(self._data_start + end == self._size, "size",
             f"file is {self._size} bytes; its header describes {self._data_start + end}{unknown}")

    def check_padding(self) -> None:
        """Every byte outside header and payloads is zero (so every bit of the file is checked)."""
        spans = [(self._header_end, self._data_start)]
        end = 0
        for offset, length, *_ in self._layout:
            spans.append((self._data_start + end, self._data_start + offset))
            end = offset + length
        for lo, hi in spans:
            if hi > lo and any(self._read(hi - lo, lo)):
                raise KernelpackError(f"non-zero padding bytes at {lo}..{hi}: the file is corrupted",
                                      path=self.path, field="padding")

    # access
    def metadata(self) -> dict[str, str]:
        """The header's ``metadata`` (str to str, a copy), as safetensors' ``safe_open(...).metadata()``
        gives it; ``{}`` when the file has none (safetensors says None: a dict needs no test)."""
        return dict(self._metadata)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        """A tensor's checked header entry; KeyError for a name the file lacks, as a Mapping."""
        if not isinstance(name, str):
            raise KernelpackError(f"a tensor name is a str, got {type(name).__name__}", path=self.path,
                                  field="name")
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
        try:
            return self._read_array(ref, field, tensor)
        except MemoryError:
            raise KernelpackError(f"out of memory reading it ({ref.spec.nbytes} bytes; see kernelpack.Limits)",
                                  path=self.path, tensor=tensor, field=field) from None

    def _read_array(self, ref: ArrayRef, field: str, tensor: str | None) -> Stored:
        size = max(ref.length, ref.spec.nbytes)
        if size > self.limits.max_decoded_bytes:
            raise KernelpackError(f"payload of {size} bytes exceeds the limit max_decoded_bytes="
                                  f"{self.limits.max_decoded_bytes} (see kernelpack.Limits)",
                                  path=self.path, tensor=tensor, field=field)
        if ref.sha256 is None:
            body = self._grouped(ref, field, tensor)
        else:
            body = self._read(ref.length, self._data_start + ref.offset)
            if hashlib.sha256(body).digest() != ref.sha256:
                raise KernelpackError("payload checksum mismatch: the file is corrupted",
                                      path=self.path, tensor=tensor, field=field)
        if ref.codec in entropy.DECODERS:
            try:
                body = entropy.DECODERS[ref.codec](body, NUMPY_DTYPES[ref.spec.dtype], ref.spec.size)
            except KernelpackError as exc:
                raise KernelpackError(exc.reason, path=self.path, tensor=tensor, field=field) from None
        elif ref.codec != "none":  # zstd, zstd-shuffle: the same frame checks
            body = self._inflate(body, ref.spec.nbytes, field, tensor)
        if ref.codec == "zstd-shuffle":
            body = _unshuffle(body, NUMPY_DTYPES[ref.spec.dtype])
        if isinstance(body, memoryview):  # preloaded, uncompressed: copied, so that a tensor
            body = bytes(body)  # does not keep the whole preloaded file alive
        data = np.frombuffer(body, dtype=NUMPY_DTYPES[ref.spec.dtype]).reshape(ref.spec.shape)
        return Stored(data, ref.spec.dtype, ref.spec.step, ref.spec.dq)

    def _grouped(self, ref: ArrayRef, field: str, tensor: str | None) -> bytes | memoryview:
        """A payload of a hash group (1.6): a slice of the group's bytes, read and checked against
        the group's SHA-256 once and kept (views of a preloaded file always; read ones up to
        GROUP_CACHE bytes, oldest dropped first), so a whole load hashes each group once."""
        i = self._group_of(ref)
        offset, length, sha = self._groups[i]
        with self._group_lock:
            data = self._group_cache.pop(i, None)
            if data is None:  # at most MAX_GROUP bytes, whatever the limits: the format bounds it
                data = self._read(length, self._data_start + offset)
                if hashlib.sha256(data).digest() != sha:
                    raise KernelpackError(f"payload checksum mismatch: the file is corrupted (hash group groups[{i}], "
                                          f"bytes {offset}..{offset + length} of the data area, which this payload "
                                          "shares with other small payloads)", path=self.path, tensor=tensor,
                                          field=field)
            self._group_cache[i] = data  # the newest last
            held = [k for k, v in self._group_cache.items() if not isinstance(v, memoryview)]
            while sum(len(self._group_cache[k]) for k in held) > GROUP_CACHE:
                del self._group_cache[held.pop(0)]
        start = ref.offset - offset
        return data[start:start + ref.length]

    def _inflate(self, body: bytes, size: int, field: str, tensor: str | None) -> bytes:
        """One zstd frame that declares exactly ``size`` bytes and nothing after it.

        zstd itself refuses to produce more than a frame's declared content size, so
        a payload never inflates beyond what its dtype and shape say.
        """
        def bad(message: str) -> KernelpackError:
            return KernelpackError(message, path=self.path, tensor=tensor, field=field)

        declared = _declared(body, bad, "zstd payload")
        if declared != size:
            raise bad(f"compressed payload declares {declared} bytes; its dtype and shape say {size}")
        return _one_frame(body, size, bad, "zstd payload")

    def _form(self, name: str) -> type[Encoded]:
        """The class of a tensor's form, or the error of a form this reader does not know."""
        info = self.info(name)
        cls = FORMS.get(info.form)
        if cls is None:
            raise KernelpackError(f"form {shown(info.form)} needs a newer kernelpack (file format "
                                  f"{self.version[0]}.{self.version[1]})", path=self.path, tensor=name,
                                  field="form")
        return cls

    def cost(self, name: str) -> Cost:
        """What decoding tensor ``name`` costs (largest array, working set, operations), from
        its checked header alone; spec/FORMAT.md, section 5, "Work and memory"."""
        if name not in self._costs:
            info, cls = self.info(name), self._form(name)
            bank_name = cls.bank_of(info.fields)
            banks = {bank_name: self._banks[bank_name].spec} if bank_name is not None else {}
            self._costs[name] = cls.cost(info.shape, info.fields, {k: r.spec for k, r in info.arrays.items()}, banks)
        return self._costs[name]

    def result_bytes(self, name: str) -> int:
        """Bytes of the decoded tensor (bfloat16 counted as the float32 numpy widens it to)."""
        info = self.info(name)
        return math.prod(info.shape) * (4 if info.dtype == "bfloat16" else NUMPY_DTYPES[info.dtype].itemsize)

    def encoded(self, name: str) -> Encoded:
        """The tensor in its stored form, payloads read and checked (its largest array within
        ``max_decoded_bytes`` first)."""
        self.budget.check_array(name, self.cost(name))
        return self._stored(name)

    def _stored(self, name: str) -> Encoded:
        """``encoded`` after the limits were checked (by it, or by ``decode``'s budget)."""
        info, cls = self.info(name), self._form(name)
        bank_name = cls.bank_of(info.fields)
        arrays = {k: self.read_array(r, f"arrays.{k}", name) for k, r in info.arrays.items()}
        try:
            banks = {bank_name: self._bank(bank_name)} if bank_name is not None else {}
            return cls.build(info.shape, info.dtype, info.fields, arrays, banks)
        except KernelpackError as exc:
            raise exc.located(path=self.path, tensor=name) from None

    def plan_load(self, threads: int, names: Collection[str] | None = None) -> int:
        """Check a load of ``names`` (default: every tensor) against the limits before any decode
        (the first tensor that would fail fails now, as in a one-thread load), and return how
        many of ``threads`` decodes may run at once within ``max_total_bytes``."""
        names = list(self._tensors) if names is None else [n for n in names if n in self._tensors]
        items = [(name, self.cost(name), self.result_bytes(name)) for name in names]
        used = {FORMS[t.form].bank_of(t.fields) for t in map(self._tensors.__getitem__, names) if t.form in FORMS}
        banks = [self._banks[b].spec for b in used if b in self._banks and b not in self._bank_cache]
        return self.budget.plan(items, sum(b.nbytes for b in banks), ELEMENT_WORK * sum(b.size for b in banks), threads)

    def check_payloads(self) -> None:
        """Check the payloads no tensor's decode reads (attachments, banks no tensor uses)
        against their SHA-256: after it and a decode of every tensor, every byte of the
        file has been checked."""
        for name in self._banks:
            self._bank(name)
        for name in self._attachments:
            self.read_attachment(name)

    def _bank(self, name: str) -> Stored:
        """A bank, read (and accounted) once per container however many tensors use it."""
        if name not in self._bank_cache:
            ref = self._banks[name]
            self.budget.hold(ref.spec.nbytes, ELEMENT_WORK * ref.spec.size, f"banks.{name}")
            bank = self.read_array(ref, f"banks.{name}")
            try:
                check_bank_values(bank, name)
            except KernelpackError as exc:
                raise exc.located(path=self.path) from None
            self._bank_cache[name] = bank
        return self._bank_cache[name]

    def decode(self, name: str, ops: Ops, keep: bool = True) -> Any:
        """Decode one tensor with ``ops`` (numpy or torch backend), within the limits: its work
        and working set are accounted before anything is read, its result (if ``keep``: the
        caller holds it) after. Running out of memory anyway is a KernelpackError too."""
        cost = self.cost(name)
        self.budget.start(name, cost)
        kept = 0
        try:
            result = self._stored(name).decode(ops)  # start() checked the limits
            kept = self.result_bytes(name) if keep else 0
            return result
        except MemoryError:
            raise KernelpackError(f"out of memory decoding it (its decode needs about {cost.peak_bytes} bytes "
                                  "at once; see kernelpack.Limits)", path=self.path, tensor=name,
                                  field="shape") from None
        finally:
            self.budget.finish(cost, kept)

    def get_numpy(self, name: str) -> np.ndarray:
        """One tensor decoded by numpy (no torch import). bfloat16 comes widened to float32."""
        return self.decode(name, NumpyOps())

    def get_tensor(self, name: str, device: Any = "cpu") -> Any:
        """One tensor decoded by torch on ``device`` (the arithmetic runs there)."""
        return self.decode(name, get_ops("torch", device))

    def verify(self, backend: str = "numpy", device: Any = "cpu") -> dict[str, bool]:
        """Decode every tensor and compare with the digest recorded at pack time (and check
        every other byte of the file again): True or False per tensor; the first corrupted
        byte range (padding, a bank, an attachment, then tensors in order) raises its
        KernelpackError. :meth:`integrity` reports every failure instead."""
        report = self.integrity(backend, device)
        failure = next(iter(report.failures()), None)
        if failure is not None:
            raise failure
        return {name: bool(ok) for name, ok in report.tensors.items()}

    def integrity(self, backend: str = "numpy", device: Any = "cpu", progress: bool | None = False) -> "Integrity":
        """Every check of :meth:`verify`, none stopping the others (:class:`Integrity`). A bad
        ``backend`` or ``device`` raises at once. ``progress``: a bar over the tensors on
        stderr (None: when it is a terminal; shown after a second, kernelpack._progress)."""
        ops = get_ops(backend, device)
        ranges: dict[str, KernelpackError] = {}
        checks = [("padding", self.check_padding)]
        checks += [(f"banks.{n}", lambda n=n: self._bank(n)) for n in self._banks]
        checks += [(f"attachments.{n}", lambda n=n: self.read_attachment(n)) for n in self._attachments]
        for label, check in checks:
            try:
                check()
            except KernelpackError as exc:
                ranges[label] = exc
        tensors: dict[str, bool | KernelpackError] = {}
        for name, info in progress_bar(self._tensors.items(), progress, "verify", "tensor", len(self._tensors)):
            try:
                tensors[name] = self._matches(info, ops.to_numpy(self.decode(name, ops, keep=False)))
            except KernelpackError as exc:
                tensors[name] = exc
        return Integrity(ranges, tensors)

    @staticmethod
    def _matches(info: TensorInfo, array: np.ndarray) -> bool:
        """Decoded shape, dtype and SHA-256 are the ones recorded at pack time."""
        dtype_ok = array.dtype == NUMPY_DTYPES[info.dtype] or (
            info.dtype == "bfloat16" and array.dtype in (np.float32, np.uint16))
        return tuple(array.shape) == info.shape and dtype_ok and digest(array, info.dtype) == info.digest
