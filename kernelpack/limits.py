"""What a file may make a reader allocate and compute, and the account one load keeps of it.

:class:`Limits` is the caller's setting; :class:`Budget` is the running account of one
whole-file load or one open container: the work its decodes have run and the bytes it
holds (decoded tensors kept by the caller, banks read) or is holding now (the working set
of every decode running, on every thread). Every decode asks the budget before it reads
or allocates anything (spec/FORMAT.md, section 5, "Work and memory").
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

from kernelpack.errors import KernelpackError
from kernelpack.forms._base import Cost, need_int

MAX_HEADER = 64 << 20


@dataclass(frozen=True)
class Limits:
    """What a file may make a reader allocate and compute. A file beyond them is refused
    before the decode concerned allocates or computes anything.

    * ``max_decoded_bytes`` bounds every single array a decode holds, counted at 8 bytes
      per element (float64, the decode's working precision and the widest dtype): the
      decoded tensor, each stored array as read and as inflated, each table block and
      intermediate (``Cost.largest``).
    * ``max_total_bytes`` bounds what one load (``load``, ``load_numpy``, ``load_model``,
      ``ort_session``, ``verify``) or one open container across all its ``get_tensor``
      calls holds: every tensor it has decoded for the caller, every bank it has read, plus
      the working set (``Cost.peak_bytes``) of each decode running at that moment, on every
      thread. A whole-file load checks the whole file before it decodes anything, and runs
      fewer threads at once when that is what fits. Default (None): 4 GiB, or 4 times the
      file's size if that is more (a dense float16 or int8 model of any size fits).
    * ``max_work`` bounds the work of the same scope (``Cost.work``: float64 multiply-adds of
      the decode's products, plus weighted table entries and elements read and written), so
      that a small file cannot keep a reader busy. Default (None): 2**32 plus 2**17 per byte
      of the file. One unit took 0.03 to 0.45 ns on one core here, so a file of a few
      kilobytes decodes in at most about two seconds, while real models, whose stored bytes
      grow with their work, stay inside it with room for a second pass (``verify`` after a
      load on one open container): a ResNet-50 in ``dct`` at 5% needs 4% of what its own
      file allows, a VGG-16 28% (benchmarks/FUZZ.md, "Work").
    * ``max_header_bytes`` bounds the header (parsing takes up to about 8 times its size).

    A service opening untrusted files sets absolute bounds it can afford, e.g.
    ``Limits(max_decoded_bytes=16 << 20, max_total_bytes=256 << 20, max_work=1 << 32)``;
    a caller with bigger models raises them.
    """

    max_decoded_bytes: int = 1 << 30
    max_header_bytes: int = MAX_HEADER
    max_total_bytes: int | None = None
    max_work: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_decoded_bytes", "max_header_bytes", "max_total_bytes", "max_work"):
            value = getattr(self, name)
            if value is not None or name in ("max_decoded_bytes", "max_header_bytes"):  # these two have no None
                need_int(value, f"limits.{name}", 0, 1 << 62)

    def total_bytes(self, file_size: int) -> int:
        """``max_total_bytes`` for a file of ``file_size`` bytes."""
        return max(4 << 30, 4 * file_size) if self.max_total_bytes is None else self.max_total_bytes

    def work(self, file_size: int) -> int:
        """``max_work`` for a file of ``file_size`` bytes."""
        return (1 << 32) + (file_size << 17) if self.max_work is None else self.max_work


#: One decode as the budget sees it: tensor name, its cost, the bytes of its result.
Item = tuple[str, Cost, int]


class Budget:
    """The running account of one load or one open container against its :class:`Limits`.

    Thread-safe: decodes on several threads start and finish under one lock, so the
    working sets of the decodes running at once are all counted.
    """

    def __init__(self, limits: Limits, path: str, file_size: int) -> None:
        self.limits, self.path = limits, path
        self.max_work, self.max_total = limits.work(file_size), limits.total_bytes(file_size)
        self.work = 0  # operations of every decode started
        self.held = 0  # bytes handed to the caller or cached (results, banks)
        self.running = 0  # working sets of the decodes running now
        self._lock = threading.Lock()

    def check_array(self, name: str, cost: Cost) -> None:
        """The decode's largest array within ``max_decoded_bytes``."""
        if 8 * cost.largest > self.limits.max_decoded_bytes:
            raise KernelpackError(
                f"decoding needs an array of {cost.largest} elements ({8 * cost.largest} bytes as float64), "
                f"over the limit max_decoded_bytes={self.limits.max_decoded_bytes} (see kernelpack.Limits)",
                path=self.path, tensor=name, field="shape")

    def _check(self, name: str, cost: Cost, work: int, memory: int) -> None:
        """Refuse a decode that would take the account past a limit (``work`` and ``memory``
        are the totals with it)."""
        self.check_array(name, cost)
        if work > self.max_work:
            raise KernelpackError(
                f"decoding needs {cost.work} units of work, {work} with what this load has decoded before, "
                f"over the limit max_work={self.max_work} (see kernelpack.Limits)",
                path=self.path, tensor=name, field="shape")
        if memory > self.max_total:
            raise KernelpackError(
                f"decoding needs {cost.peak_bytes} bytes at once, {memory} with what this load holds, "
                f"over the limit max_total_bytes={self.max_total} (see kernelpack.Limits)",
                path=self.path, tensor=name, field="shape")

    def start(self, name: str, cost: Cost) -> None:
        """Account a decode about to run, or refuse it."""
        with self._lock:
            self._check(name, cost, self.work + cost.work, self.held + self.running + cost.peak_bytes)
            self.work += cost.work
            self.running += cost.peak_bytes

    def finish(self, cost: Cost, kept: int) -> None:
        """A decode has ended; the caller keeps ``kept`` bytes of its result (0 if it failed or
        its result is dropped, as ``verify`` does)."""
        with self._lock:
            self.running -= cost.peak_bytes
            self.held += kept

    def hold(self, nbytes: int, work: int, field: str) -> None:
        """Account an array read once and kept for the rest of the load (a bank, shared by every
        tensor that uses it): its bytes and the work of reading it."""
        with self._lock:
            if self.work + work > self.max_work:
                raise KernelpackError(f"reading it needs {work} units of work, {self.work + work} with what this "
                                      f"load has decoded before, over the limit max_work={self.max_work} "
                                      "(see kernelpack.Limits)", path=self.path, field=field)
            if self.held + self.running + nbytes > self.max_total:
                raise KernelpackError(f"holding {nbytes} more bytes, {self.held + self.running + nbytes} with "
                                      f"what this load holds, is over the limit max_total_bytes="
                                      f"{self.max_total} (see kernelpack.Limits)",
                                      path=self.path, field=field)
            self.held += nbytes
            self.work += work

    def plan(self, items: Sequence[Item], banks: int, bank_work: int, workers: int) -> int:
        """Check a whole-file load before any decode: run the account as a one-thread load
        would (raising the error its first failing tensor would raise), then return how
        many of ``workers`` decodes may run at once with every result kept (at least 1).
        ``banks`` and ``bank_work`` are the bytes and work of the banks the load will read."""
        work, held = self.work + bank_work, self.held + banks
        for name, cost, kept in items:
            work += cost.work
            self._check(name, cost, work, held + cost.peak_bytes)
            held += kept
        peaks = sorted((cost.peak_bytes for _, cost, _ in items), reverse=True)
        while workers > 1 and held + sum(peaks[:workers]) > self.max_total:
            workers -= 1
        return workers
