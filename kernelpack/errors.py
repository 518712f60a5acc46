"""The one exception type for bad input.

Every malformed, truncated, corrupted or hostile container, and every invalid
argument to an encoder, raises :class:`KernelpackError`. Its message names the
file, the tensor and the field, so a service log says exactly what was wrong.
"""

from __future__ import annotations

import importlib
from typing import Any


class KernelpackError(ValueError):
    """Bad input: a container or argument that does not follow the spec."""

    def __init__(self, message: str, *, path: str | None = None,
                 tensor: str | None = None, field: str | None = None) -> None:
        self.path, self.tensor, self.field, self.reason = path, tensor, field, message
        where = []
        if path is not None:
            where.append(f"file '{path}'")
        if tensor is not None:
            where.append(f"tensor '{tensor}'")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)

    def located(self, *, path: str | None = None, tensor: str | None = None) -> "KernelpackError":
        """The same error with the file and tensor filled in where still unknown."""
        return KernelpackError(self.reason, path=self.path or path,
                               tensor=self.tensor if self.tensor is not None else tensor,
                               field=self.field)



def need_module(name: str, purpose: str, extra: str = "demo") -> Any:
    """Import an optional dependency, or say in one line which extra provides it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise KernelpackError(f"{purpose} needs the '{name.split('.')[0]}' package: "
                              f"pip install 'kernelpack[{extra}]'") from None
