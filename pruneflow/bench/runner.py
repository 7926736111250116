"""Latency measurement of exported models (OpenVINO IR / ONNX). Never imports torch."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np

from .backends import LoadedModel, load_model
from .settings import BenchmarkOptions
from .stats import paired_speedup, speedup, summarize

__all__ = ["ParityError", "measure", "compare", "environment_info"]

Progress = Callable[[str], None] | None

_LATENCY_KEYS = ("median", "p90", "p99", "mean", "min", "max", "std")


class ParityError(RuntimeError):
    """The model's output on the check input differs from the expected output by more than check_atol."""

    def __init__(self, message: str, max_abs_diff: float = float("nan")):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff

    def __reduce__(self):  # keep both fields when pickled (e.g. across worker processes)
        return (type(self), (str(self), self.max_abs_diff))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _load_avg() -> list[float] | None:
    try:
        return [round(v, 3) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment_info() -> dict:
    """Host facts recorded with every measurement (cheap; imports no runtime)."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "versions": {
            "openvino": _version("openvino"),
            "onnxruntime": _version("onnxruntime"),
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "host": socket.gethostname(),
    }


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _emit(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


def _max_abs_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        if a.size == e.size and a.squeeze().shape == e.squeeze().shape:
            a, e = a.reshape(e.shape), e
        else:
            raise ParityError(
                f"parity check failed: output shape {list(a.shape)} != expected shape {list(e.shape)}",
                float("inf"),
            )
    if a.size == 0:
        return 0.0
    diff = np.abs(a - e)
    diff[np.isnan(a) & np.isnan(e)] = 0.0  # NaN in the same place on both sides is agreement
    value = float(np.max(diff))
    return value if np.isfinite(value) else float("inf")


def _parity_check(
    loaded: LoadedModel, check: tuple[np.ndarray, np.ndarray], atol: float, progress: Progress
) -> float:
    x, expected = check
    x = np.ascontiguousarray(np.asarray(x, dtype=loaded.input_dtype))
    if tuple(x.shape) != loaded.input_shape:
        raise ValueError(
            f"check input has shape {list(x.shape)} but {str(loaded.path)!r} expects {list(loaded.input_shape)}"
        )
    out = loaded.infer(x)
    diff = _max_abs_diff(out, expected)
    if not diff <= atol:
        raise ParityError(
            f"parity check failed for {str(loaded.path)!r}: max abs diff {diff:.6g} > check_atol {atol:g}",
            diff,
        )
    _emit(progress, f"parity check: max abs diff {diff:.3g} <= {atol:g}")
    return diff


def _result_dict(
    loaded: LoadedModel,
    options: BenchmarkOptions,
    rounds_latency: list[list[float]],
    wall: list[float],
    round_order: list[int],
    env: dict,
    load_before: list[float] | None,
    started_at: str,
    t_start: float,
    check_diff: float | None,
) -> dict:
    stats = summarize(rounds_latency, batch=loaded.input_shape[0])
    return {
        "model": str(loaded.path),
        "backend": options.backend,
        "device": options.device,
        "settings": options.model_dump(),
        "input_shape": list(loaded.input_shape),
        "latency_ms": {k: stats[k] for k in _LATENCY_KEYS},
        "round_medians_ms": stats["round_medians"],
        "round_median_cv": stats["round_median_cv"],
        "round_order": round_order,
        "n_samples": stats["n_samples"],
        "throughput_fps": stats["throughput_fps"],
        "wall_mean_ms": float(np.mean(wall)),
        "compile_s": round(float(loaded.compile_s), 4),
        "compiled_properties": dict(loaded.properties),
        "skipped_properties": list(loaded.skipped_properties),
        "load_avg_before": load_before,
        "load_avg_after": _load_avg(),
        **env,
        "started_at": started_at,
        "duration_s": round(time.perf_counter() - t_start, 4),
        "check_max_abs_diff": check_diff,
    }


def measure(
    model_path: str | Path,
    options: BenchmarkOptions,
    check: tuple[np.ndarray, np.ndarray] | None = None,
    check_atol: float = 1e-3,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Benchmark one model; return the JSON-serialisable latency record (see module docs / README)."""
    t_start = time.perf_counter()
    started_at = _now_iso()
    load_before = _load_avg()
    env = environment_info()
    loaded = load_model(model_path, options)
    _emit(progress, f"compiled {Path(model_path).name} on {options.backend}/{options.device} "
          f"in {loaded.compile_s:.2f} s")
    check_diff = _parity_check(loaded, check, check_atol, progress) if check is not None else None

    x = loaded.make_input(options.seed)
    rounds_latency: list[list[float]] = []
    wall: list[float] = []
    with _gc_paused():
        if options.warmup:
            loaded.timed_calls(x, options.warmup)
            _emit(progress, f"warm-up: {options.warmup} calls")
        for r in range(options.rounds):
            lat, w = loaded.timed_calls(x, options.iterations)
            rounds_latency.append(lat)
            wall.extend(w)
            _emit(progress, f"round {r + 1}/{options.rounds}: median {float(np.median(lat)):.3f} ms")
    return _result_dict(
        loaded, options, rounds_latency, wall, list(range(options.rounds)), env,
        load_before, started_at, t_start, check_diff,
    )


def _default_labels(paths: list[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    names = [str(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{i}:{p}" for i, p in enumerate(paths)]


def compare(
    model_paths: list[str | Path],
    options: BenchmarkOptions,
    labels: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Benchmark several models with interleaved rounds; speed-ups are relative to the FIRST model.

    All models are compiled and warmed up first; then in each round every model runs
    ``iterations`` timed calls, the starting model rotating each round to avoid order bias.
    Returns {"models": [measure-like dict + "label", ...], "ratios": {label: {"speedup",
    "speedup_paired"}}, "baseline": first label, "settings": ..., "started_at", "duration_s"}.
    ``speedup`` = median(first) / median(this); ``speedup_paired`` = median over rounds of
    round_median(first) / round_median(this) (more robust to machine drift).
    """
    paths = [Path(p) for p in model_paths]
    if not paths:
        raise ValueError("compare needs at least one model path")
    if labels is None:
        labels = _default_labels(paths)
    else:
        labels = [str(label) for label in labels]
        if len(labels) != len(paths):
            raise ValueError(f"got {len(labels)} labels for {len(paths)} models")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be unique, got {labels}")

    t_start = time.perf_counter()
    started_at = _now_iso()
    load_before = _load_avg()
    env = environment_info()
    loaded = []
    for path, label in zip(paths, labels, strict=True):
        model = load_model(path, options)
        loaded.append(model)
        _emit(progress, f"compiled {label} in {model.compile_s:.2f} s")
    inputs = [m.make_input(options.seed) for m in loaded]

    n = len(loaded)
    rounds_latency: list[list[list[float]]] = [[] for _ in range(n)]
    walls: list[list[float]] = [[] for _ in range(n)]
    slots: list[list[int]] = [[] for _ in range(n)]
    slot = 0
    with _gc_paused():
        if options.warmup:
            for m, x in zip(loaded, inputs, strict=True):
                m.timed_calls(x, options.warmup)
            _emit(progress, f"warm-up: {options.warmup} calls per model")
        for r in range(options.rounds):
            order = [(r + k) % n for k in range(n)]
            for i in order:
                lat, w = loaded[i].timed_calls(inputs[i], options.iterations)
                rounds_latency[i].append(lat)
                walls[i].extend(w)
                slots[i].append(slot)
                slot += 1
            summary = ", ".join(f"{labels[i]} {float(np.median(rounds_latency[i][-1])):.3f}" for i in range(n))
            _emit(progress, f"round {r + 1}/{options.rounds}: median ms {summary}")

    models = []
    for i, m in enumerate(loaded):
        d = _result_dict(
            m, options, rounds_latency[i], walls[i], slots[i], env, load_before, started_at, t_start, None
        )
        models.append({"label": labels[i], **d})
    base = models[0]
    ratios = {
        d["label"]: {
            "speedup": speedup(base["latency_ms"]["median"], d["latency_ms"]["median"]),
            "speedup_paired": paired_speedup(base["round_medians_ms"], d["round_medians_ms"]),
        }
        for d in models
    }
    return {
        "models": models,
        "ratios": ratios,
        "baseline": labels[0],
        "settings": options.model_dump(),
        "started_at": started_at,
        "duration_s": round(time.perf_counter() - t_start, 4),
    }
