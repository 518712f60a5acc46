"""The plain-text tables of the command line and the demo, in one place (its own module so
that kernelpack.demo needs nothing from kernelpack.cli, which runs the demo)."""

from __future__ import annotations

from typing import Any, Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """Plain aligned text; ``align`` has one '<' (left) or '>' (right) per column."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[Any]) -> str:
        return "  ".join(f"{str(c):{a}{w}}" for c, a, w in zip(cells, align, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
