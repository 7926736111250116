"""Scale-out: the same rapid sweep under the embedded LocalExecutor and under the CeleryExecutor deployment,
in ONE run of this script on this machine.

The sweep: 12 rapid trials (0 fine-tuning epochs) of a `pareto` random search over the conv1 sparsities of
ResNet-20's three stages on digits 32x32, seed 0, 2 lanes, OpenVINO CPU benchmark of 3 rounds x 60 calls.
A baseline is trained once into out/bench/ and given by path.

(a) local: `pruneflow airflow up` in a tmp home (preloading LocalExecutor, SQLite, local trial folders);
(b) celery: `pruneflow airflow up --executor celery` in a tmp home (Redis, PostgreSQL, a training worker on
    queue `default`, a torch-free benchmark worker on `bench_cpu0` in `.venv-bench`), with the artifacts in a
    real S3-compatible store (SeaweedFS on loopback, tests/s3_server.py): every task works in its worker's
    scratch folder and moves files only through the store.

Reported: trials/hour of each and their ratio; per stage, the median queueing delay (a task instance's
queued -> start) and run time; per trial through the store, the bytes and seconds of artifact transfer
(the sum over its tasks of what `stage_workspace` logs: fetched before a stage, uploaded after).

    .venv/bin/python benchmarks/scaleout.py [--trials 12] [--parallel 2] [--write] [--keep]

`--write` appends the printed output to benchmarks/RESULTS.md. Never run by CI.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import (  # noqa: E402
    OUT,
    REPO,
    SWEEP_SPACE,
    append_results,
    ensure_baseline,
    load_avg,
    machine_header,
    say,
    sweep_args,
    table,
)
from airflow_overhead import Servers, ts  # noqa: E402

BENCH = {"rounds": 3, "iterations": 60, "warmup": 20, "threads": 1}
STAGES = ("validate", "ensure_baseline", "prune", "thinnify", "retrain", "export", "prune_to_export", "benchmark",
          "benchmark_cpu0", "record")
TRANSFER = re.compile(r"artifacts: (\d+) file\(s\), ([\d,]+) bytes (from|to) \S+ \(([\d.]+) s\)")


def transfers(home: Path, run_id: str) -> tuple[int, float]:
    """(bytes, seconds) of artifact transfer logged by the tasks of one prune_trial run (last attempts)."""
    total_bytes, total_s = 0, 0.0
    run_dir = home / "logs" / "dag_id=prune_trial" / f"run_id={run_id}"
    for task_dir in run_dir.glob("task_id=*"):
        attempts = sorted(task_dir.glob("attempt=*.log"))
        if not attempts:
            continue
        for line in attempts[-1].read_text(errors="replace").splitlines():
            m = TRANSFER.search(line)
            if m:
                total_bytes += int(m.group(2).replace(",", ""))
                total_s += float(m.group(4))
    return total_bytes, total_s


def run_sweep(srv: Servers, baseline: Path, n: int, parallel: int, say, timeout: float) -> dict:
    say(f"{srv.executor}: airflow up, healthy after {srv.up():.1f} s")
    try:
        with srv.client() as c:
            srv.unpause(c, "prune_trial", "prune_sweep")
            time.sleep(5)  # let start-up work (first parse, serialization) settle
            conf = {"study": f"scaleout-{srv.executor}", "objective": "pareto", "sampler": "random", "n_trials": n,
                    "parallel": parallel, "seed": 0, "space": SWEEP_SPACE, "report": False,
                    "trial": {"baseline": str(baseline), "epochs": 0, **BENCH}}
            load0, t0 = load_avg(), time.time()
            r = c.post("/api/v2/dags/prune_sweep/dagRuns", json={"logical_date": None, "conf": conf})
            r.raise_for_status()
            sweep_run = r.json()["dag_run_id"]
            deadline = time.monotonic() + timeout
            while (state := c.get(f"/api/v2/dags/prune_sweep/dagRuns/{sweep_run}").json()["state"]) not in (
                    "success", "failed"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the sweep did not finish in {timeout:.0f} s")
                time.sleep(2)
            if state != "success":
                raise RuntimeError(f"{srv.executor}: the sweep ended {state} (logs under {srv.home / 'logs'}; --keep)")
            runs = c.get("/api/v2/dags/prune_trial/dagRuns", params={"limit": 100}).json()["dag_runs"]
            tis = {x["dag_run_id"]: c.get(f"/api/v2/dags/prune_trial/dagRuns/{x['dag_run_id']}/taskInstances")
                   .json()["task_instances"] for x in runs}
        moved = [transfers(srv.home, run_id) for run_id in tis]
    finally:
        srv.down()
    queue: dict[str, list[float]] = defaultdict(list)
    run_s: dict[str, list[float]] = defaultdict(list)
    for task_instances in tis.values():
        for ti in task_instances:
            if ti["state"] != "success" or not ti.get("queued_when"):
                continue
            stage = "benchmark" if ti["task_id"].startswith("benchmark") else ti["task_id"]
            queue[stage].append(ts(ti["start_date"]) - ts(ti["queued_when"]))
            run_s[stage].append(ts(ti["end_date"]) - ts(ti["start_date"]))
    return {"wall": max(ts(x["end_date"]) for x in runs) - t0, "runs": len(runs), "load": (load0, load_avg()),
            "states": {s: sum(x["state"] == s for x in runs) for s in ("success", "failed")},
            "queue": dict(queue), "run": dict(run_s), "bytes": [b for b, _ in moved], "transfer_s": [s for _, s in moved]}


def report(args, header: str, local: dict, celery: dict) -> str:
    rate = {k: 3600 * m["runs"] / m["wall"] for k, m in (("local", local), ("celery", celery))}
    rows = [[name, m["runs"], f"{m['wall']:.0f}", f"{rate[name]:.0f}", f"{rate[name] / rate['local']:.2f}",
             f"{statistics.median(m['bytes']) / 1e6:.2f}" if any(m["bytes"]) else "0",
             f"{statistics.median(m['transfer_s']):.2f}" if any(m["bytes"]) else "0",
             f"{m['load'][0]} -> {m['load'][1]}"] for name, m in (("local", local), ("celery", celery))]
    stage_rows = []
    for stage in [s for s in STAGES if s in local["queue"] or s in celery["queue"]]:
        stage_rows.append([stage] + [f"{statistics.median(m[key][stage]):.2f}" if m[key].get(stage) else "-"
                                     for m in (local, celery) for key in ("queue", "run")])
    return "\n".join([
        header, "",
        table(["executor", "trials", "wall s", "trials/h", "ratio", "MB moved per trial (median)",
               "transfer s per trial (median)", "load before -> after"], rows),
        "",
        table(["stage", "local queued->start s", "local run s", "celery queued->start s", "celery run s"], stage_rows),
        "",
        f"{args.trials}-trial rapid sweep, {args.parallel} lanes, the same space and seed under each executor. Celery: "
        "training worker (concurrency 2) + torch-free benchmark worker, artifacts through SeaweedFS; local: the "
        "embedded default, trial folders on disk (no transfer). Medians over the successful task instances.",
        f"prune_trial runs: local {local['states']}, celery {celery['states']}."])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = sweep_args(__doc__, 12, argv)
    from s3_server import seaweedfs

    # As root, PostgreSQL runs as the postgres user, who must be able to enter every parent of its folder.
    root = Path(tempfile.mkdtemp(prefix="pruneflow-scaleout-"))
    root.chmod(0o711)
    baseline = ensure_baseline(progress=say)
    header = machine_header("scaleout: one rapid sweep under LocalExecutor and under CeleryExecutor", argv)
    try:
        local = run_sweep(Servers(REPO, root / "local", {}), baseline, args.trials, args.parallel, say, args.timeout)
        with seaweedfs() as s3:
            env = {**s3.env(), "PRUNEFLOW_ARTIFACTS": f"s3://{s3.bucket}/scaleout"}
            celery = run_sweep(Servers(REPO, root / "celery", {}, executor="celery", env=env), baseline,
                               args.trials, args.parallel, say, args.timeout)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    text = report(args, header, local, celery)
    print(text)
    if args.write:
        append_results("Scale-out: LocalExecutor against CeleryExecutor, one run", text)
    (OUT / "scaleout.json").write_text(json.dumps({"local": local, "celery": celery}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
