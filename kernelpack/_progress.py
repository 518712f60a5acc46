"""Progress bars, in one place: a tqdm bar on stderr when it is a terminal (or when asked),
else an object with the same few methods doing nothing, so callers never test for a bar.
tqdm is optional (the ``train`` extra): without it there is no bar, and no error."""

from __future__ import annotations

import sys
from typing import Any, Iterable

#: Seconds a job runs before its bar appears: a quick verify or plan prints nothing.
DELAY = 1.0


class Quiet:
    """The part of a tqdm bar kernelpack uses, doing nothing (no bar)."""

    def __init__(self, items: Iterable | None) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress(items: Iterable | None, enabled: bool | None, desc: str, unit: str, total: int | None = None) -> Any:
    """A tqdm bar over ``items`` (or counting up to ``total``), shown after DELAY seconds: by
    default only when stderr is a terminal; ``enabled`` overrides (False: never)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return Quiet(items)
    try:
        from tqdm import tqdm
    except ImportError:
        return Quiet(items)
    return tqdm(items, desc=desc, unit=unit, total=total, delay=DELAY)
