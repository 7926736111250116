"""How much of a rapid trial a forked, preloaded task pays cold: ``prune_to_export`` three times in a
process forked after imports only (as the preloading executor forks), then, with ``warm``, three times in
one forked after the parent ran a trial itself. One torch thread, as a task on this 2-core machine.

    .venv/bin/python benchmarks/task_warmth.py [warm]

It prints each call's time and its stages' times (RESULTS.md has them as a table). Never run by CI.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT, ensure_baseline  # noqa: E402

PRELOAD = ("torch torch_pruning onnx onnxscript openvino onnxruntime optuna sklearn.datasets pruneflow.prune "
           "pruneflow.train pruneflow.export pruneflow.checkpoint pruneflow.recalibrate pruneflow.data "
           "pruneflow.store pruneflow.bench pruneflow.models pruneflow.stages").split()
ROOT = OUT / "task_warmth"


def trial(ckpt: Path, i: int, sparsity: float) -> tuple[float, dict]:
    from pruneflow import stages
    from pruneflow.data import dataset_cache
    from pruneflow.spec import TrialSpec
    from pruneflow.threads import torch_threads

    spec = stages.resolve_spec(TrialSpec.model_validate({
        "trial_id": f"t{i}", "baseline": {"checkpoint": str(ckpt)}, "finetune": {"epochs": 0},
        "artifacts": str(ROOT / "trials"), "db": f"sqlite:///{ROOT / 'results.db'}",
        "pruning": {"groups": [{"name": f"layer{k}", "patterns": [f"layer{k}.*.conv1"], "sparsity": sparsity}
                               for k in (1, 2)]}}))
    t = time.perf_counter()
    with dataset_cache(ROOT / "datasets"), torch_threads(1):
        out = stages.prune_to_export(spec)
    return round(time.perf_counter() - t, 2), out["timings_s"]


def forked(tag: str, ckpt: Path, base: int) -> None:
    pid = os.fork()
    if pid == 0:
        for k in range(3):
            print(tag, "call", k, *trial(ckpt, base + k, 0.3 + 0.1 * k), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)


def main(argv: list[str]) -> None:
    t = time.perf_counter()
    for name in PRELOAD:
        importlib.import_module(name)
    print(f"preload {time.perf_counter() - t:.2f} s", flush=True)
    ckpt = ensure_baseline()
    forked("forked-cold", ckpt, 0)
    if argv[:1] == ["warm"]:
        print("parent", *trial(ckpt, 100, 0.4), flush=True)
        forked("forked-warm", ckpt, 10)


if __name__ == "__main__":
    main(sys.argv[1:])
