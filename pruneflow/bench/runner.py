"""Latency measurement of exported models (OpenVINO IR / ONNX). Never imports torch."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from .backends import LoadedModel, effective_property, load_model
from .output_check import EXPORT_ATOL, EXPORT_RTOL, as_expected, compare_outputs, describe, output_scale
from .ov_api import runtime_version_if_loaded
from .settings import BenchmarkOptions
from .stats import paired_speedup, speedup, summarize

__all__ = [
    "ARGMAX_TIE_RTOL",
    "MIN_ARGMAX_AGREEMENT",
    "REDUCED_PRECISION_RTOL",
    "ParityError",
    "check_tolerance",
    "compare",
    "environment_info",
    "measure",
]

Progress = Callable[[str], None] | None

_LATENCY_KEYS = ("median", "p90", "p99", "mean", "min", "max", "std")

# ---------------------------------------------------------------- output check before any timing
# The device must reproduce the reference (torch's logits) by the rule of pruneflow.bench.output_check:
# max |device - torch| <= check_atol + rtol * max |reference output|, and the predicted classes agree.
# At f32 rtol is ``check_rtol``, the export's (the benchmark stage passes spec.export.parity_atol and
# parity_rtol). Reduced precision cannot meet it: bf16 keeps 8 significant bits (unit roundoff 2^-8), f16
# keeps 11 (2^-11), and every layer's rounding adds up. Measured with the CPU plugin (AMX-BF16,
# AVX512-FP16) on ResNet-20 / digits, 256 validation images each, dense at 16x16 and 32x32 and four rapid
# pruned ones at 16x16: max |device - torch| up to 5.9% of the sample's largest |logit| at bf16 (0.16
# absolute) and 0.57% at f16 (0.017 absolute). So at reduced precision rtol is REDUCED_PRECISION_RTOL:
# 32 unit roundoffs of the format (bf16 2^-3 = 12.5%, f16 2^-6 = 1.6%, about 2x and 3x the worst case
# measured). The precision is the one the compiled model reports it runs (INFERENCE_PRECISION_HINT read
# back), not the one requested.
REDUCED_PRECISION_RTOL: dict[str, float] = {"bf16": 2.0**-3, "f16": 2.0**-6}
# A tolerance that loose could let through a model that no longer classifies like torch, so at reduced
# precision the predicted class of each reference sample (argmax of its flattened output) must also be
# torch's. Rounding flips a prediction only on a near-tie: in the measurements above 6 of 1536 samples
# flipped at bf16 (none at f16), every one with torch's top two logits within 2.2% of the output scale.
# Such samples cannot vouch for anything, and the verdict on them is deterministic (a permanent failure
# of that model, not noise), so samples whose top-two margin in torch's output is at most
# ARGMAX_TIE_RTOL[precision] * output scale (16 unit roundoffs: bf16 6.25%, f16 0.78%; half the
# tolerance) are left out, and of the others at least MIN_ARGMAX_AGREEMENT must agree. A model that
# computes a different function agrees at about chance. 0.9 leaves room for a rare flip in a large
# reference batch; with fewer than 10 samples it means every one must agree (one flip is already more
# than 10%), which is what a small batch can vouch for.
ARGMAX_TIE_RTOL: dict[str, float] = {"bf16": 2.0**-4, "f16": 2.0**-7}
MIN_ARGMAX_AGREEMENT = 0.9
_KNOWN_PRECISIONS = ("f32", "f16", "bf16")


class ParityError(RuntimeError):
    """The model's output on the check input is not the expected output within the check's tolerance
    (and, at reduced precision, its predicted classes disagree with the reference's).

    ``details`` holds the check record (precision, atol, max_abs_diff, argmax_agreement, ...)."""

    def __init__(self, message: str, max_abs_diff: float = float("nan"), details: dict | None = None):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.details = dict(details or {})

    def __reduce__(self):  # keep every field when pickled (e.g. across worker processes)
        return (type(self), (str(self), self.max_abs_diff, self.details))


def check_tolerance(precision: str, check_atol: float, check_rtol: float, output_scale: float) -> tuple[float, float]:
    """(tolerance, rtol) of the output check at ``precision``: ``check_atol + rtol * output_scale``, rtol being
    ``check_rtol`` at f32 and REDUCED_PRECISION_RTOL[precision] (at least ``check_rtol``) at f16/bf16;
    output_scale is max |reference output|."""
    rtol = max(float(check_rtol), REDUCED_PRECISION_RTOL.get(precision, 0.0))
    return float(check_atol) + rtol * float(output_scale), rtol


def _inference_precision(loaded: LoadedModel) -> str | None:
    """INFERENCE_PRECISION_HINT as the compiled model reports it (of the executing device behind AUTO)."""
    return effective_property(loaded.properties, "INFERENCE_PRECISION_HINT")


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


def _isolated(isolation: Callable[[], AbstractContextManager[list[int]]] | None) -> AbstractContextManager[list[int]]:
    return isolation() if isolation else contextlib.nullcontext([])


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
            # the 2022.3 archive install (the NCS2 worker) has no distribution metadata: ask the runtime
            "openvino": _version("openvino") or runtime_version_if_loaded(),
            "onnxruntime": _version("onnxruntime"),
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "host": socket.gethostname(),
    }


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _emit(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


def _as_expected(actual: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    try:
        return as_expected(actual, expected)
    except ValueError as exc:
        raise ParityError(f"parity check failed: {exc}", float("inf")) from None


def _run_check_input(loaded: LoadedModel, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Outputs for the check input: the model's own batch, or several such batches stacked on axis 0
    (e.g. 8 reference images through a batch-1 model), run one batch at a time."""
    x = np.ascontiguousarray(np.asarray(x, dtype=loaded.input_dtype))
    shape = loaded.input_shape
    if tuple(x.shape) == shape:
        return loaded.infer(x), shape[0]
    if x.ndim == len(shape) and tuple(x.shape[1:]) == shape[1:] and x.shape[0] % shape[0] == 0:
        b = shape[0]
        outs = [loaded.infer(np.ascontiguousarray(x[i:i + b])) for i in range(0, x.shape[0], b)]
        return np.concatenate(outs, axis=0), x.shape[0]
    raise ValueError(
        f"check input has shape {list(x.shape)} but {str(loaded.path)!r} expects {list(shape)} "
        "(or a multiple of its batch size along axis 0)"
    )


def _parity_check(
    loaded: LoadedModel,
    options: BenchmarkOptions,
    check: tuple[np.ndarray, np.ndarray],
    atol: float,
    rtol: float,
    progress: Progress,
) -> dict:
    """Check the device's output against the reference at the precision the model really runs.

    Returns the check record (see ``measure``); raises ParityError when the check fails.
    """
    x, expected = check
    out, samples = _run_check_input(loaded, x)
    out, expected = _as_expected(out, expected)
    reported = _inference_precision(loaded)
    if reported in _KNOWN_PRECISIONS:
        precision, source = reported, "compiled model"
    else:  # the device does not say: trust the request
        precision, source = options.precision, "requested (not reported by the compiled model)"
    scale = output_scale(expected)
    _, used_rtol = check_tolerance(precision, atol, rtol, scale)
    reduced = precision in ARGMAX_TIE_RTOL
    record = compare_outputs(
        out, expected, atol=atol, rtol=used_rtol, samples=samples,
        tie_margin=ARGMAX_TIE_RTOL[precision] * scale if reduced else None,
        min_agreement=MIN_ARGMAX_AGREEMENT if reduced else 1.0,
    )
    record.update({"precision": precision, "precision_source": source, "precision_requested": options.precision,
                   "check_atol": float(atol), "check_rtol": float(rtol)})
    where = f"for {str(loaded.path)!r} at precision {precision} ({source}; requested {options.precision})"
    if not record["passed"]:
        raise ParityError(f"parity check failed {where}: {describe(record)}", record["max_abs_diff"], record)
    _emit(progress, f"parity check at {precision}: {describe(record)}")
    return record


LATENCY_SEQUENTIAL = "one request at a time: each synchronous call timed on its own"
LATENCY_UNDER_LOAD = (
    "per request with {n} request(s) in flight in an asynchronous queue (throughput mode): from "
    "start_async to completion, including any wait for a free stream"
)


class _Rounds:
    """What the timed rounds of one model produced."""

    def __init__(self) -> None:
        self.latency: list[list[float]] = []  # per round, per call/request (ms)
        self.wall: list[float] = []  # sequential: wall ms of every call; async: wall ms of every round
        self.fps: list[float] = []  # async only: completed inferences * batch / wall time, per round


def _warm_up(loaded: LoadedModel, x: np.ndarray, n: int) -> None:
    if n <= 0:
        return
    if loaded.async_requests is not None:
        loaded.timed_async(x, max(n, loaded.async_requests))
    else:
        loaded.timed_calls(x, n)


def _timed_round(loaded: LoadedModel, x: np.ndarray, n: int, rounds: _Rounds) -> list[float]:
    if loaded.async_requests is not None:
        lat, wall_ms = loaded.timed_async(x, n)
        rounds.wall.append(wall_ms)
        rounds.fps.append(n * loaded.input_shape[0] * 1000.0 / wall_ms if wall_ms > 0 else float("inf"))
    else:
        lat, wall = loaded.timed_calls(x, n)
        rounds.wall.extend(wall)
    rounds.latency.append(lat)
    return lat


def _throughput(loaded: LoadedModel, rounds: _Rounds, stats: dict, iterations: int) -> dict:
    batch = loaded.input_shape[0]
    if loaded.async_requests is not None:
        return {
            "method": "async_queue",
            "requests": loaded.async_requests,
            "fps": float(np.median(rounds.fps)),
            "round_fps": [float(v) for v in rounds.fps],
            "inferences_per_round": iterations,
            "description": (
                f"median over rounds of completed inferences x batch {batch} / wall time, "
                f"{loaded.async_requests} request(s) in flight (OPTIMAL_NUMBER_OF_INFER_REQUESTS)"
            ),
        }
    round_fps = [batch * 1000.0 / float(np.mean(r)) for r in rounds.latency]
    return {
        "method": "sequential",
        "requests": 1,
        "fps": stats["throughput_fps"],
        "round_fps": round_fps,
        "inferences_per_round": iterations,
        "description": f"batch {batch} x 1000 / mean latency of one request at a time (not a throughput test)",
    }


def _result_dict(
    loaded: LoadedModel,
    options: BenchmarkOptions,
    rounds: _Rounds,
    round_order: list[int],
    env: dict,
    load_before: list[float] | None,
    started_at: str,
    t_start: float,
    check: dict | None,
) -> dict:
    stats = summarize(rounds.latency, batch=loaded.input_shape[0])
    throughput = _throughput(loaded, rounds, stats, options.iterations)
    if loaded.async_requests is not None:
        latency_kind = LATENCY_UNDER_LOAD.format(n=loaded.async_requests)
        wall_mean = float(np.sum(rounds.wall) / stats["n_samples"])  # wall time per completed inference
    else:
        latency_kind = LATENCY_SEQUENTIAL
        wall_mean = float(np.mean(rounds.wall))
    return {
        "model": str(loaded.path),
        "backend": options.backend,
        "device": options.device,
        "settings": options.model_dump(),
        "input_shape": list(loaded.input_shape),
        "inference_precision": _inference_precision(loaded),
        "latency_kind": latency_kind,
        "latency_ms": {k: stats[k] for k in _LATENCY_KEYS},
        "round_medians_ms": stats["round_medians"],
        "round_median_cv": stats["round_median_cv"],
        "round_order": round_order,
        "n_samples": stats["n_samples"],
        "throughput_fps": throughput["fps"],
        "throughput": throughput,
        "wall_mean_ms": wall_mean,
        "compile_s": round(float(loaded.compile_s), 4),
        "compiled_properties": dict(loaded.properties),
        "skipped_properties": list(loaded.skipped_properties),
        "load_avg_before": load_before,
        "load_avg_after": _load_avg(),
        **env,
        "started_at": started_at,
        "duration_s": round(time.perf_counter() - t_start, 4),
        "check_max_abs_diff": None if check is None else check["max_abs_diff"],
        "check": check,
    }


def measure(
    model_path: str | Path,
    options: BenchmarkOptions,
    check: tuple[np.ndarray, np.ndarray] | None = None,
    check_atol: float = EXPORT_ATOL,
    check_rtol: float = EXPORT_RTOL,
    progress: Callable[[str], None] | None = None,
    isolation: Callable[[], AbstractContextManager[list[int]]] | None = None,
) -> dict:
    """Benchmark one model; return the JSON-serialisable latency record (latency.json).

    ``isolation`` (e.g. :func:`pruneflow.cpu_pause.paused`) is entered around the warm-up and the timed
    rounds only, after compiling and the check; it yields the pids it stopped, whose number is the
    record's ``paused_cpu_tasks``.

    ``check`` = (input, expected output): checked before any timing, at the precision the compiled
    model reports it runs, by the rule of :mod:`pruneflow.bench.output_check`: max |out - expected| <=
    ``check_atol + rtol * max|expected|`` with rtol ``check_rtol`` at f32 and REDUCED_PRECISION_RTOL[p]
    at f16/bf16, and the predicted classes equal to the reference's on the samples that are no near-tie
    (all of them at f32; at least MIN_ARGMAX_AGREEMENT at f16/bf16, see ARGMAX_TIE_RTOL). The input may
    stack several of the model's batches on axis 0. The record of the check is ``result["check"]``:
    compare_outputs' record (max_abs_diff, output_scale, relative_diff, atol, rtol, tolerance, decided_by,
    diff_over_tolerance, argmax_agreement and the rest, passed) with precision (as run), precision_source,
    precision_requested, check_atol and check_rtol.

    With ``hint="latency"`` every call runs alone and ``latency_ms`` is its latency; ``throughput_fps``
    is then only batch * 1000 / mean latency. With ``hint="throughput"`` (OpenVINO) each round completes
    ``iterations`` inferences through an AsyncInferQueue of OPTIMAL_NUMBER_OF_INFER_REQUESTS requests:
    ``throughput_fps`` is the median over rounds of completed inferences * batch / wall time,
    ``latency_ms`` the per-request latency under that load, ``wall_mean_ms`` the wall time per completed
    inference. ``throughput`` and ``latency_kind`` say which.
    """
    t_start = time.perf_counter()
    started_at = _now_iso()
    load_before = _load_avg()
    env = environment_info()
    loaded = load_model(model_path, options)
    _emit(progress, f"compiled {Path(model_path).name} on {options.backend}/{options.device} "
          f"in {loaded.compile_s:.2f} s")
    check_record = (_parity_check(loaded, options, check, check_atol, check_rtol, progress)
                    if check is not None else None)

    x = loaded.make_input(options.seed)
    rounds = _Rounds()
    with _isolated(isolation) as stopped, _gc_paused():
        if options.warmup:
            _warm_up(loaded, x, options.warmup)
            _emit(progress, f"warm-up: {options.warmup} calls")
        for r in range(options.rounds):
            lat = _timed_round(loaded, x, options.iterations, rounds)
            extra = f", {rounds.fps[-1]:.1f} fps" if rounds.fps else ""
            _emit(progress, f"round {r + 1}/{options.rounds}: median {float(np.median(lat)):.3f} ms{extra}")
    result = _result_dict(
        loaded, options, rounds, list(range(options.rounds)), env,
        load_before, started_at, t_start, check_record,
    )
    return {**result, "paused_cpu_tasks": len(stopped)}


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
    isolation: Callable[[], AbstractContextManager[list[int]]] | None = None,
) -> dict:
    """Benchmark several models with interleaved rounds; speed-ups are relative to the FIRST model.

    All models are compiled and warmed up first; then in each round every model runs
    ``iterations`` timed calls, the starting model rotating each round to avoid order bias.
    Returns {"models": [measure-like dict + "label", ...], "ratios": {label: {"speedup",
    "speedup_paired"}}, "baseline": first label, "settings": ..., "started_at", "duration_s"}.
    ``speedup`` = median(first) / median(this); ``speedup_paired`` = median over rounds of
    round_median(first) / round_median(this) (more robust to machine drift). With hint="throughput" the
    ratios also hold ``throughput_ratio`` = fps(this) / fps(first) and ``throughput_ratio_paired`` = median
    over rounds of round_fps(this) / round_fps(first). ``isolation``: as in :func:`measure`, around
    every model's warm-up and all the rounds.
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
    rounds = [_Rounds() for _ in range(n)]
    slots: list[list[int]] = [[] for _ in range(n)]
    slot = 0
    with _isolated(isolation) as stopped, _gc_paused():
        if options.warmup:
            for m, x in zip(loaded, inputs, strict=True):
                _warm_up(m, x, options.warmup)
            _emit(progress, f"warm-up: {options.warmup} calls per model")
        for r in range(options.rounds):
            order = [(r + k) % n for k in range(n)]
            for i in order:
                _timed_round(loaded[i], inputs[i], options.iterations, rounds[i])
                slots[i].append(slot)
                slot += 1
            summary = ", ".join(f"{labels[i]} {float(np.median(rounds[i].latency[-1])):.3f}" for i in range(n))
            _emit(progress, f"round {r + 1}/{options.rounds}: median ms {summary}")

    models = []
    for i, m in enumerate(loaded):
        d = _result_dict(m, options, rounds[i], slots[i], env, load_before, started_at, t_start, None)
        models.append({"label": labels[i], **d})
    base = models[0]
    ratios = {
        d["label"]: {
            "speedup": speedup(base["latency_ms"]["median"], d["latency_ms"]["median"]),
            "speedup_paired": paired_speedup(base["round_medians_ms"], d["round_medians_ms"]),
        }
        for d in models
    }
    if all(d["throughput"]["method"] == "async_queue" for d in models):
        # throughput mode: the latencies above are under load; the figure that matters is the throughput
        for d in models:
            base_fps, fps = base["throughput"]["round_fps"], d["throughput"]["round_fps"]
            ratios[d["label"]]["throughput_ratio"] = d["throughput"]["fps"] / base["throughput"]["fps"]
            ratios[d["label"]]["throughput_ratio_paired"] = paired_speedup(fps, base_fps)
    return {
        "models": models,
        "ratios": ratios,
        "baseline": labels[0],
        "settings": options.model_dump(),
        "started_at": started_at,
        "duration_s": round(time.perf_counter() - t_start, 4),
        "paused_cpu_tasks": len(stopped),
    }
