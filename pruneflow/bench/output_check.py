"""One rule for every output check: thinned against masked, exported against torch, device against reference.

An output matches its reference when ``max |out - ref| <= atol + rtol * max |ref|``: the bound scales
with the outputs, so a correct model with logits in the thousands passes at float32 rounding and a
wrong one with tiny logits still fails (an absolute bound on logits does neither). ``rtol`` is the
precision's (f32: the caller's, e.g. ``export.parity_rtol``; bf16/f16: wider, see
:mod:`pruneflow.bench.runner`); ``atol`` is a small floor for outputs that are all near zero.

The predicted classes (argmax of each sample's flattened output) must agree too, on the samples that
can vouch: a sample whose reference top-two margin is within ``tie_margin`` can flip by rounding, so it
is left out. The record says which bound decided (``rtol`` when ``rtol * scale`` is the larger part)
and by how much the difference stays under it (``diff_over_tolerance``).

numpy only: the benchmark worker has no torch.
"""

from __future__ import annotations

import numpy as np

# Defaults at f32, chosen from benchmarks/output_tolerance.py (RESULTS.md, "Output checks"): over every
# registry model and a trained ResNet-20, with logits near 1, in the thousands and tiny, a correct thinning
# differed from the masked model by at most 9.6e-7 of max |ref| and a correct export from torch by at most
# 1.4e-6 (the RegNet-X of the issue that the absolute 1e-3 refused: 1.4e-6 too). rtol 1e-4 leaves 70x that;
# a wrong function differs by a sizeable share of the outputs. The absolute floor is for outputs near zero
# only: with tiny logits (x0.001) a correct model's difference was at most 5e-10.
EXPORT_RTOL = 1e-4
EXPORT_ATOL = 1e-6
THIN_RTOL = 1e-4
THIN_ATOL = 1e-6


def as_expected(actual: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 of the expected shape (a shape that differs only by axes of size 1 is reshaped),
    or ValueError naming the shapes."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        if a.size != e.size or a.squeeze().shape != e.squeeze().shape:
            raise ValueError(f"output shape {list(a.shape)} != expected shape {list(e.shape)}")
        a = a.reshape(e.shape)
    return a, e


def max_abs_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    a, e = as_expected(actual, expected)
    if a.size == 0:
        return 0.0
    diff = np.abs(a - e)
    diff[np.isnan(a) & np.isnan(e)] = 0.0  # NaN in the same place on both sides is agreement
    value = float(np.max(diff))
    return value if np.isfinite(value) else float("inf")


def output_scale(expected: np.ndarray) -> float:
    """max |expected| over its finite values (0 when there are none)."""
    ref = np.asarray(expected, dtype=np.float64)
    finite = ref[np.isfinite(ref)]
    return float(np.max(np.abs(finite))) if finite.size else 0.0


def argmax_agreement(actual: np.ndarray, expected: np.ndarray, samples: int,
                     tie_margin: float) -> tuple[float, float, int]:
    """Class agreement of the samples (rows along axis 0; class = argmax of the flattened output):
    (over all samples, over the samples where the reference's top-two margin exceeds ``tie_margin``,
    their count)."""
    a, e = as_expected(actual, expected)
    if a.size == 0 or samples == 0:
        return 1.0, 1.0, 0
    a = a.reshape(samples, -1)
    e = e.reshape(samples, -1)
    same = np.argmax(a, axis=1) == np.argmax(e, axis=1)
    if e.shape[1] > 1:
        top2 = np.sort(e, axis=1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > tie_margin
    else:
        decisive = np.ones(samples, dtype=bool)
    counted = int(decisive.sum())
    return float(same.mean()), float(same[decisive].mean()) if counted else 1.0, counted


def compare_outputs(actual: np.ndarray, expected: np.ndarray, *, atol: float, rtol: float,
                    samples: int | None = None, tie_margin: float | None = None,
                    min_agreement: float = 1.0) -> dict:
    """The check record of ``actual`` against ``expected`` (see the module docstring); ``passed`` is its
    verdict. ``samples``: rows along axis 0 (default ``len(expected)``); ``tie_margin``: default twice
    the tolerance, the most a difference within it can move a top-two margin."""
    diff = max_abs_diff(actual, expected)
    scale = output_scale(expected)
    tolerance = float(atol) + float(rtol) * scale
    margin = 2 * tolerance if tie_margin is None else float(tie_margin)
    n = int(np.asarray(expected).shape[0]) if samples is None else int(samples)
    agree_all, agree, counted = argmax_agreement(actual, expected, n, margin)
    within = diff <= tolerance
    agrees = agree >= min_agreement
    return {
        "max_abs_diff": diff,
        "output_scale": scale,
        "relative_diff": diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")),
        "atol": float(atol),
        "rtol": float(rtol),
        "tolerance": tolerance,
        "decided_by": "rtol" if rtol * scale >= atol else "atol",
        "diff_over_tolerance": diff / tolerance,
        "samples": n,
        "argmax_agreement": agree_all,
        "argmax_tie_margin": margin,
        "argmax_decisive_samples": counted,
        "argmax_agreement_decisive": agree,
        "min_argmax_agreement": float(min_agreement),
        "within_tolerance": bool(within),
        "passed": bool(within and agrees),
    }


def describe(record: dict) -> str:
    """One line of a check record, with the numbers that decided it."""
    bound = (f"{record['atol']:g} + {record['rtol']:g} x output scale {record['output_scale']:.4g} "
             f"= {record['tolerance']:.3g}")
    agree = (f"argmax agreement {record['argmax_agreement_decisive']:.3f} of {record['argmax_decisive_samples']} "
             f"decisive sample(s) (of {record['samples']}; needs >= {record['min_argmax_agreement']:g})")
    rel = record["relative_diff"]
    return (f"max abs diff {record['max_abs_diff']:.3g} (relative {rel:.2g}) "
            f"{'<=' if record['within_tolerance'] else '>'} tolerance {bound}; {agree}")
