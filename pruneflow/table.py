"""Plain-text tables for the terminal: the one table formatter of pruneflow (built on ``tabulate``).

Torch-free and light (only ``tabulate``): the benchmark worker (``pruneflow.bench``) uses it too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tabulate import tabulate

__all__ = ["format_cells", "format_table"]

_ALIGN = {"left": "left", "l": "left", "right": "right", "r": "right", "center": "center", "c": "center"}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def format_cells(headers: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> str:
    """Table of ready-made string cells: a header line, a dashed rule per column, one line per row.

    ``align``: "left" / "right" / "center" per column; default: the first column left, the others right.
    Cells are printed as given (no number parsing); trailing spaces are stripped.
    """
    headers = [str(h) for h in headers]
    n = len(headers)
    for i, row in enumerate(rows):
        if len(row) != n:
            raise ValueError(f"row {i} has {len(row)} cells for {n} columns")
    if align is None:
        align = ["left"] + ["right"] * (n - 1)
    if len(align) != n:
        raise ValueError(f"{len(align)} alignments for {n} columns")
    try:
        colalign = [_ALIGN[a] for a in align]
    except KeyError as exc:
        raise ValueError(f"unknown alignment {exc.args[0]!r}; expected left, right or center") from None
    text = tabulate(
        [[str(c) for c in row] for row in rows],
        headers=headers,
        tablefmt="simple",
        colalign=colalign,
        headersalign=colalign,
        disable_numparse=True,
        preserve_whitespace=True,
    )
    return "\n".join(line.rstrip() for line in text.splitlines())


def format_table(
    rows: Sequence[dict],
    columns: Sequence[tuple[str, str]],
    formats: dict[str, Callable[[Any], str]] | None = None,
    *,
    align: Sequence[str] | None = None,
) -> str:
    """columns: (key, header) pairs; formats: key -> callable(value) -> str (default: ``_fmt``: None is
    "-", ints with thousands separators, floats to 4 significant digits). ``align`` as in ``format_cells``
    (default: the first column left, the others right)."""
    formats = formats or {}
    cells = [[formats.get(k, _fmt)(r.get(k)) for k, _ in columns] for r in rows]
    return format_cells([h for _, h in columns], cells, align)
