"""Plain-text tables for benchmark results (through pruneflow.table, the project's one table formatter)."""

from __future__ import annotations

from collections.abc import Sequence

from pruneflow.table import format_cells

from .backends import effective_property

__all__ = ["format_result", "format_comparison"]


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    return format_cells(headers, rows, ["right" if r else "left" for r in right])


def _ms(value: float) -> str:
    return f"{value:.3f}"


def _effective(result: dict, key: str) -> str | None:
    """Property as compiled: top level (CPU, GPU) or of the executing device behind AUTO/HETERO/MULTI."""
    return effective_property(result.get("compiled_properties", {}), key)


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
    line = (
        f"{s.get('rounds', '?')} rounds x {s.get('iterations', '?')} calls "
        f"(warm-up {s.get('warmup', '?')}), hint {s.get('hint', '?')}, input {result.get('input_shape')}"
    )
    throughput = result.get("throughput") or {}
    if throughput.get("method") == "async_queue":
        line += (
            f"; async queue of {throughput.get('requests')} requests: fps = completed inferences / wall time, "
            "latencies per request under that load"
        )
    return line


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
    by_fps = all("throughput_ratio_paired" in cmp["ratios"][d["label"]] for d in models)
    headers = ["model", *_STAT_HEADERS, "speedup", "paired"] + (["fps ratio"] if by_fps else [])
    rows = []
    for d in models:
        ratio = cmp["ratios"][d["label"]]
        row = [str(d["label"]), *_stat_cells(d), f"{ratio['speedup']:.2f}x", f"{ratio['speedup_paired']:.2f}x"]
        if by_fps:
            row.append(f"{ratio['throughput_ratio_paired']:.2f}x")
        rows.append(row)
    right = [False, *([True] * (len(headers) - 1))]
    header = (
        f"{first['backend']} / {first['device']} / precision {_precision(first)} / threads {_threads(first)}; "
        + _setup_line(first)
    )
    footer = f"speed-ups relative to {first['label']!r} (median ratio; paired = median of per-round ratios)"
    if by_fps:
        footer += "; speedup/paired compare latencies under load, fps ratio = paired ratio of round throughputs"
    return "\n".join([header, _table(headers, rows, right), footer])
