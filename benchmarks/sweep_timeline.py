"""Where a rapid sweep's trials wait through the embedded Airflow: the CPU pool's slots over time.

Runs the sweep of `sweep_throughput.py` (pareto TPE, seed 0, rapid trials) through real servers only,
then reads every `prune_trial` task instance from the metadata DB (SQLite) and prints, per task, its
median run time and its waits (scheduled -> queued: the scheduler found no pool room; queued -> start:
the executor), the gaps between a trial's tasks, the share of the sweep with 0, 1, 2... CPU-pool slots
taken (the pool of `prune_to_export`; a benchmark counts there only when it runs in that pool), the share
with a benchmark running, and the share during which a benchmark was waiting for its pool.

    .venv/bin/python benchmarks/sweep_timeline.py [--trials 24] [--parallel 2] [--keep]

Never run by CI.
"""

from __future__ import annotations

import shutil
import sqlite3
import statistics
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT, ensure_baseline, machine_header, say, sweep_args, table  # noqa: E402
from sweep_throughput import run_airflow  # noqa: E402

STEP = 0.05  # seconds per timeline cell


def _t(value) -> float | None:
    return datetime.fromisoformat(str(value)).timestamp() if value else None


def task_instances(db: Path) -> list[dict]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute("select run_id, task_id, pool, pool_slots, scheduled_dttm, queued_dttm, start_date, end_date "
                           "from task_instance where dag_id = 'prune_trial' and start_date is not null").fetchall()
    finally:
        con.close()
    return [dict(run=r[0], task=r[1], pool=r[2], slots=r[3], sch=_t(r[4]), q=_t(r[5]), s=_t(r[6]), e=_t(r[7]))
            for r in rows]


def med(vals: list[float]) -> str:
    return f"{statistics.median(vals):.2f}" if vals else "-"


def analyse(tis: list[dict]) -> str:
    t0, t1 = min(x["s"] for x in tis), max(x["e"] for x in tis)
    rows = []
    for task in ("validate", "prune_to_export", "benchmark", "record"):
        v = [x for x in tis if x["task"] == task]
        waits = [x["q"] - x["sch"] for x in v if x["q"] and x["sch"]]
        rows.append([task, len(v), med([x["e"] - x["s"] for x in v]), f"{sum(x['e'] - x['s'] for x in v):.1f}",
                     med(waits), f"{sum(waits):.1f}", med([x["s"] - x["q"] for x in v if x["q"]])])
    runs: dict[str, dict] = {}
    for x in tis:
        runs.setdefault(x["run"], {})[x["task"]] = x
    order = ("validate", "prune_to_export", "benchmark", "record")
    gaps = []
    for a, b in zip(order, order[1:], strict=False):
        g = sorted(r[b]["s"] - r[a]["e"] for r in runs.values() if a in r and b in r)
        gaps.append([f"{a} -> {b}", med(g), f"{g[int(0.9 * (len(g) - 1))]:.2f}", f"{sum(g):.1f}"])
    n = int((t1 - t0) / STEP) + 1
    cpu_pool = next(x["pool"] for x in tis if x["task"] == "prune_to_export")
    taken, waiting, measuring = [0] * n, [False] * n, [False] * n
    for x in tis:
        cells = range(int((x["s"] - t0) / STEP), min(n, int((x["e"] - t0) / STEP)))
        if x["pool"] == cpu_pool:
            for i in cells:
                taken[i] += x["slots"]
        if x["task"] == "benchmark":
            for i in cells:
                measuring[i] = True
            if x["sch"]:
                for i in range(max(0, int((x["sch"] - t0) / STEP)), int((x["s"] - t0) / STEP)):
                    waiting[i] = True
    share = Counter(taken)
    # a benchmark in the CPU pool takes every slot: with fewer taken, it waits with one free
    slots = max((x["slots"] for x in tis if x["pool"] == cpu_pool and x["task"] == "benchmark"), default=None)
    return "\n".join([
        f"span of the trials' tasks: {t1 - t0:.0f} s",
        "",
        table(["task", "n", "run median s", "run sum s", "scheduled->queued median s", "sum s",
               "queued->start median s"], rows),
        "",
        table(["gap in a trial", "median s", "p90 s", "sum s"], gaps),
        "",
        f"CPU-pool ({cpu_pool}) slots taken, share of the span: "
        + ", ".join(f"{k}: {v / n:.0%}" for k, v in sorted(share.items())),
        f"a benchmark running: {sum(measuring) / n:.0%} of the span; waiting for its pool: {sum(waiting) / n:.0%}"
        + (f" (with a CPU slot free: {sum(w and k < slots for w, k in zip(waiting, taken, strict=True)) / n:.0%})"
           if slots else ""),
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = sweep_args(__doc__, 24, argv)
    root = OUT / "sweep_timeline"
    shutil.rmtree(root, ignore_errors=True)
    baseline = ensure_baseline(progress=say)
    header = machine_header("sweep_timeline: where a rapid sweep's trials wait through Airflow", argv)
    af = run_airflow(root, baseline, args.trials, args.parallel, say, args.timeout)
    tis = task_instances(next(root.rglob("airflow.db")))
    print("\n".join([header, "", f"sweep: {args.trials} trials, {args.parallel} lanes, {af['wall']:.0f} s "
                     f"({3600 * args.trials / af['wall']:.0f} trials/h), idle CPU {af['idle']:.0%}", "",
                     analyse(tis)]))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
