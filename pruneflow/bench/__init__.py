"""Latency benchmark of exported models (OpenVINO IR / ONNX) with OpenVINO or onnxruntime.

This package must never import torch (directly or indirectly): it runs in the benchmark
worker, which has no torch. OpenVINO and onnxruntime are imported lazily, only by the
backend that is used.
"""

from .format import format_comparison, format_result
from .runner import (
    ARGMAX_TIE_RTOL,
    MIN_ARGMAX_AGREEMENT,
    REDUCED_PRECISION_RTOL,
    ParityError,
    check_tolerance,
    compare,
    environment_info,
    measure,
)
from .settings import BenchmarkOptions
from .stats import paired_speedup, speedup, summarize

__all__ = [
    "ARGMAX_TIE_RTOL",
    "MIN_ARGMAX_AGREEMENT",
    "REDUCED_PRECISION_RTOL",
    "BenchmarkOptions",
    "ParityError",
    "check_tolerance",
    "compare",
    "environment_info",
    "format_comparison",
    "format_result",
    "measure",
    "paired_speedup",
    "speedup",
    "summarize",
]
