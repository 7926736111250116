"""Latency statistics (pure numpy).

Conventions: percentiles use numpy's default linear interpolation; ``std`` and the
coefficient of variation use the population standard deviation (ddof=0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["summarize", "speedup", "paired_speedup", "coefficient_of_variation"]


def coefficient_of_variation(values: Sequence[float]) -> float:
    """std/mean (population std); 0.0 for a single value or a zero mean."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("coefficient_of_variation needs at least one value")
    mean = float(arr.mean())
    if arr.size < 2 or mean == 0.0:
        return 0.0
    return float(arr.std(ddof=0) / mean)


def summarize(rounds: Sequence[Sequence[float]], batch: int = 1) -> dict:
    """Summarise per-call latencies (ms) grouped by round.

    median, p90, p99, mean, min, max and std are over ALL samples of all rounds pooled (not a
    median of round medians); round_medians are the per-round medians and round_median_cv their
    spread (CV). throughput_fps = batch * 1000 / mean is the rate of one call at a time (the
    runner replaces it with a measured figure in throughput mode).
    Returns plain Python floats/ints/lists: median, p90, p99, mean, min, max, std,
    round_medians, round_median_cv, throughput_fps, n_samples.
    """
    if len(rounds) == 0:
        raise ValueError("summarize needs at least one round")
    per_round = [np.asarray(r, dtype=np.float64).ravel() for r in rounds]
    for i, r in enumerate(per_round):
        if r.size == 0:
            raise ValueError(f"round {i} has no samples")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    samples = np.concatenate(per_round)
    round_medians = [float(np.median(r)) for r in per_round]
    mean = float(samples.mean())
    return {
        "median": float(np.median(samples)),
        "p90": float(np.percentile(samples, 90)),
        "p99": float(np.percentile(samples, 99)),
        "mean": mean,
        "min": float(samples.min()),
        "max": float(samples.max()),
        "std": float(samples.std(ddof=0)),
        "round_medians": round_medians,
        "round_median_cv": coefficient_of_variation(round_medians),
        "throughput_fps": float(batch * 1000.0 / mean) if mean > 0 else float("inf"),
        "n_samples": int(samples.size),
    }


def speedup(base_median: float, other_median: float) -> float:
    """Speed-up of ``other`` relative to ``base``: base_median / other_median (>1 = other is faster)."""
    if other_median <= 0:
        raise ValueError(f"median latency must be > 0, got {other_median}")
    return float(base_median / other_median)


def paired_speedup(base_round_medians: Sequence[float], other_round_medians: Sequence[float]) -> float:
    """Median over rounds of base_round_median / other_round_median.

    Rounds are paired (run back to back in an interleaved benchmark), so slow drifts of the
    machine affect both sides of each ratio alike; this is more robust than the ratio of medians.
    """
    base = np.asarray(base_round_medians, dtype=np.float64)
    other = np.asarray(other_round_medians, dtype=np.float64)
    if base.shape != other.shape or base.size == 0:
        raise ValueError(
            f"paired_speedup needs two equally long, non-empty lists, got {base.size} and {other.size}"
        )
    if np.any(other <= 0):
        raise ValueError("round medians must be > 0")
    return float(np.median(base / other))
