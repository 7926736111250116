"""How much of a rapid trial a forked, preloaded task pays cold: ``prune_to_export`` three times in a
process forked after imports only (as the preloading executor forks), then, with ``warm``, three times in
one forked after the parent ran a trial itself. One torch thread, as a task on this 2-core machine.

    .venv/bin/python benchmarks/task_warmth.py [warm]

The modules imported first are the rendered template's ``[pruneflow] preload`` (``airflow.cfg.template``), through
the executor's own :func:`pruneflow_airflow.preload.preload_modules`. Prints a table of each call's time,
its stages' times and its ratio to the cold process's first call. Never run by CI.
"""

from __future__ import annotations

import configparser
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT, ensure_baseline, machine_header, table  # noqa: E402

ROOT = OUT / "task_warmth"
STAGES = ("prepare", "prune", "thinnify", "retrain", "export")


def template_preload() -> str:
    """``[pruneflow] preload`` as ``pruneflow airflow init`` renders it for the embedded default."""
    from pruneflow.airflow_cli import DEFAULT_PORT, render_config, resolve_home

    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read_string(render_config(resolve_home(str(ROOT / "airflow-home")), DEFAULT_PORT))
    return cfg.get("pruneflow", "preload")


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


def forked(ckpt: Path, base: int) -> list[tuple[float, dict]]:
    """Three calls in a forked process; their results come back through a pipe."""
    import json

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        with os.fdopen(wfd, "w") as out:
            json.dump([trial(ckpt, base + k, 0.3 + 0.1 * k) for k in range(3)], out)
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd) as inp:
        text = inp.read()
    os.waitpid(pid, 0)
    return [tuple(r) for r in json.loads(text)]


def main(argv: list[str]) -> None:
    from pruneflow_airflow.preload import preload_modules

    print(machine_header("task_warmth: a forked, preloaded task's prune_to_export calls"))
    preload_modules(template_preload())
    ckpt = ensure_baseline()
    runs = [("forked after imports only", forked(ckpt, 0))]
    if argv[:1] == ["warm"]:
        trial(ckpt, 100, 0.4)
        runs.append(("forked after the parent ran a trial", forked(ckpt, 10)))
    cold = runs[0][1][0][0]
    rows = [[name, k, f"{total:.2f}", *(f"{stages[s]:.2f}" if s in stages else "-" for s in STAGES),
             f"{total / cold:.2f}x"] for name, calls in runs for k, (total, stages) in enumerate(calls)]
    print(table(["process", "call", "total s", *STAGES, "vs cold 1st"], rows))


if __name__ == "__main__":
    main(sys.argv[1:])
