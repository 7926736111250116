"""Plain-text tables for benchmark results (no dependencies)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_result", "format_comparison"]


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def _ms(value: float) -> str:
    return f"{value:.3f}"


def _effective(result: dict, key: str) -> str | None:
    """Property as compiled: top level (CPU, GPU) or of the executing device behind AUTO/HETERO/MULTI."""
    props = result.get("compiled_properties", {})
    if key in props:
        return props[key]
    device = str(props.get("EXECUTION_DEVICES", "")).split(",")[0]
    return props.get(f"{device}.{key}")


def _precision(result: dict) -> str:
    requested = result.get("settings", {}).get("precision", "?")
    effective = _effective(result, "INFERENCE_PRECISION_HINT")
    if effective and effective != requested:
        return f"{requested} (ran {effective})"
    return str(requested)


def _threads(result: dict) -> str:
    requested = result.get("settings", {}).get("threads", "?")
    effective = _effective(result, "INFERENCE_NUM_THREADS")
    if effective and effective != str(requested):
        return f"{requested} (ran {effective})"
    return str(requested)


def _stat_cells(result: dict) -> list[str]:
    lat = result["latency_ms"]
    return [
        _ms(lat["median"]),
        _ms(lat["p90"]),
        _ms(lat["p99"]),
        f"{100.0 * result['round_median_cv']:.1f}",
        f"{result['throughput_fps']:.1f}",
    ]


_STAT_HEADERS = ["median ms", "p90 ms", "p99 ms", "CV %", "fps"]


def _setup_line(result: dict) -> str:
    s = result.get("settings", {})
    return (
        f"{s.get('rounds', '?')} rounds x {s.get('iterations', '?')} calls "
        f"(warm-up {s.get('warmup', '?')}), hint {s.get('hint', '?')}, input {result.get('input_shape')}"
    )


def format_result(result: dict) -> str:
    """Short human-readable summary of one ``measure()`` result."""
    headers = ["backend", "device", "precision", "threads", *_STAT_HEADERS]
    row = [str(result["backend"]), str(result["device"]), _precision(result), _threads(result),
           *_stat_cells(result)]
    right = [False, False, False, True, *([True] * len(_STAT_HEADERS))]
    return "\n".join([
        f"model: {result['model']}",
        _setup_line(result),
        _table(headers, [row], right),
    ])


def format_comparison(cmp: dict) -> str:
    """Table with one row per model of a ``compare()`` result and its speed-ups vs the first model."""
    models = cmp["models"]
    if not models:
        return "(no models)"
    first = models[0]
    headers = ["model", *_STAT_HEADERS, "speedup", "paired"]
    rows = []
    for d in models:
        ratio = cmp["ratios"][d["label"]]
        rows.append([str(d["label"]), *_stat_cells(d), f"{ratio['speedup']:.2f}x",
                     f"{ratio['speedup_paired']:.2f}x"])
    right = [False, *([True] * (len(headers) - 1))]
    header = (
        f"{first['backend']} / {first['device']} / precision {_precision(first)} / threads {_threads(first)}; "
        + _setup_line(first)
    )
    return "\n".join([
        header,
        _table(headers, rows, right),
        f"speed-ups relative to {first['label']!r} (median ratio; paired = median of per-round ratios)",
    ])
