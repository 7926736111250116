"""Shared helpers of the benchmark scripts: machine facts, a reusable baseline, tables.

Not part of the library and never run by CI. Everything is written under out/bench/.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "out" / "bench"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
#: The rapid sweeps' space: the conv1 sparsities of ResNet-20's three stages
SWEEP_SPACE = [{"name": f"layer{i}", "patterns": [f"layer{i}.*.conv1"], "low": 0.0, "high": 0.9, "step": 0.05}
               for i in (1, 2, 3)]

if str(REPO) not in sys.path:  # run as `python benchmarks/NAME.py` from a checkout without an install
    sys.path.insert(0, str(REPO))


def load_avg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


def cpu_model() -> str:
    from pruneflow.bench.runner import _cpu_model

    return _cpu_model() or "unknown"


def cpu_isa() -> str:
    """The vector extensions that matter for convolution kernels (OpenVINO picks kernels by them)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    return ",".join(f for f in wanted if f in flags) or "no avx2"


def nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_header(title: str, argv: Sequence[str] | None = None) -> str:
    """The lines printed above every benchmark's tables: what ran, where, and how loaded the machine was."""
    from importlib import metadata

    def v(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "-"

    cmd = " ".join(
        [
            ".venv/bin/python",
            os.path.relpath(sys.argv[0], REPO),
            *(argv if argv is not None else sys.argv[1:]),
        ]
    )
    return "\n".join(
        [
            f"# {title}",
            f"command:  {cmd}",
            f"date:     {datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"machine:  nproc {nproc()}, {cpu_model()} ({cpu_isa()}), {platform.machine()}, Linux {platform.release()}",
            f"software: python {platform.python_version()}, torch {v('torch')}, torch-pruning {v('torch-pruning')}, "
            f"openvino {v('openvino')}, onnxruntime {v('onnxruntime')}",
            f"load avg: {load_avg()} (1/5/15 min) at start",
        ]
    )


def ensure_baseline(epochs: int = 3, out_dir: Path | None = None, progress=print) -> Path:
    """A ResNet-20 digits (32x32) baseline under out/bench/, trained once and reused on re-runs."""
    import json

    out_dir = out_dir or OUT / f"baseline-resnet20-digits-e{epochs}"
    ckpt, meta = out_dir / "baseline.pt", out_dir / "baseline.json"
    if ckpt.is_file() and meta.is_file() and json.loads(meta.read_text()).get("epochs") == epochs:
        return ckpt
    from pruneflow.baseline import train_baseline
    from pruneflow.data import DatasetSpec

    progress(f"baseline: training resnet20 on digits 32x32 for {epochs} epoch(s) into {out_dir} (once)")
    m = train_baseline("resnet20", DatasetSpec(name="digits", image_size=32), epochs, out_dir)
    progress(f"baseline: val Top-1 {m['val_top1']:.2f}% after {m['train_seconds']:.0f} s")
    return ckpt


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], align_left: int = 1) -> str:
    """Plain-text table (pruneflow's one formatter); the first `align_left` columns are left-aligned."""
    from pruneflow.table import format_cells

    return format_cells(headers, [[str(c) for c in r] for r in rows],
                        ["left" if i < align_left else "right" for i in range(len(headers))])


def say(msg: str) -> None:
    """Progress on stderr, with the time (stdout is the table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sweep_args(doc: str, trials: int, argv: Sequence[str]) -> argparse.Namespace:
    """The options of the sweep benchmarks: --trials, --parallel, --timeout, --write, --keep."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--trials", type=int, default=trials)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--write", action="store_true", help="append the output to benchmarks/RESULTS.md")
    ap.add_argument("--keep", action="store_true", help="keep the deployments' folders (logs) under out/bench/")
    return ap.parse_args(list(argv))


def append_results(title: str, text: str) -> None:
    """Append one run's output to benchmarks/RESULTS.md under ``## title``."""
    with RESULTS.open("a") as fh:
        fh.write(f"\n## {title}\n\n```\n{text}\n```\n")
