"""Plain-text tables for the terminal (no dependencies)."""

from __future__ import annotations

from collections.abc import Sequence


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]], formats: dict | None = None) -> str:
    """columns: (key, header) pairs; formats: key -> callable(value) -> str."""
    formats = formats or {}
    cells = [[formats.get(k, _fmt)(r.get(k)) for k, _ in columns] for r in rows]
    headers = [h for _, h in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True)))

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    return "\n".join(out)
