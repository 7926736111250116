"""Where the CPU goes during a rapid sweep through the embedded Airflow: per server process.

Runs one `prune_sweep` (the sweep of `sweep_throughput.py`: pareto TPE, seed 0, rapid trials) on real
servers (`pruneflow airflow up` in a tmp home) and prints, per Airflow process, the CPU seconds it used
during the sweep, its own and its reaped children's (a LocalExecutor worker's children are its task
processes), and the machine's busy CPU seconds per trial (/proc/stat).

    .venv/bin/python benchmarks/server_cpu.py [--trials 24] [--parallel 4] [--idle 60] [--set SECTION.KEY=VALUE ...]

``--idle S`` first measures the same processes for S seconds with nothing triggered, and prints each
one's cores (CPU s per wall s) idle beside its cores during the sweep: a server loop that costs as much
idle as busy is a cost per second, not per trial.

``--set`` overrides an airflow.cfg key for this run (e.g. ``--set pruneflow.task_threads=2``). Never run by CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT, REPO, SWEEP_SPACE, ensure_baseline, machine_header, say, table  # noqa: E402
from airflow_overhead import Servers  # noqa: E402
from sweep_throughput import BENCH, cpu_ticks  # noqa: E402


def airflow_processes() -> list[psutil.Process]:
    me = os.getpid()
    found = []
    for p in psutil.process_iter():
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if p.pid != me and ("airflow" in cmd or "LocalExecutor" in cmd):
            found.append(p)
    return found


def cpu_snapshot() -> dict[int, tuple[str, float, float]]:
    """pid -> (command line, own CPU s, reaped children's CPU s)."""
    snap = {}
    for p in airflow_processes():
        try:
            t = p.cpu_times()
            snap[p.pid] = (" ".join(p.cmdline())[:70], t.user + t.system, t.children_user + t.children_system)
        except psutil.Error:
            continue
    return snap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--idle", type=float, default=0, help="seconds measured with nothing triggered first")
    args = ap.parse_args(argv)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    root = OUT / "server_cpu"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    baseline = ensure_baseline(progress=say)
    header = machine_header("server_cpu: CPU seconds per Airflow process during a rapid sweep", argv)
    srv = Servers(REPO, root, overrides)
    say(f"airflow up: healthy after {srv.up():.1f} s")
    try:
        with srv.client() as c:
            srv.unpause(c, "prune_trial", "prune_sweep")
            time.sleep(5)  # let start-up work settle
            idle0 = cpu_snapshot()
            time.sleep(args.idle)
            before, ticks0, t0 = cpu_snapshot(), cpu_ticks(), time.monotonic()
            conf = {"study": "server-cpu", "objective": "pareto", "sampler": "tpe", "n_trials": args.trials,
                    "parallel": args.parallel, "seed": 0, "space": SWEEP_SPACE, "report": False,
                    "trial": {"baseline": str(baseline), "epochs": 0, **BENCH}}
            r = c.post("/api/v2/dags/prune_sweep/dagRuns", json={"logical_date": None, "conf": conf})
            r.raise_for_status()
            run_id = r.json()["dag_run_id"]
            while (state := c.get(f"/api/v2/dags/prune_sweep/dagRuns/{run_id}").json()["state"]) not in (
                    "success", "failed"):
                if time.monotonic() - t0 > args.timeout:
                    raise RuntimeError(f"the sweep did not finish in {args.timeout:.0f} s")
                time.sleep(1)
            wall, ticks1, after = time.monotonic() - t0, cpu_ticks(), cpu_snapshot()
    finally:
        srv.down()
    if state != "success":
        raise RuntimeError(f"the sweep run ended {state}")
    hz = os.sysconf("SC_CLK_TCK")
    busy = ((ticks1[1] - ticks0[1]) - (ticks1[0] - ticks0[0])) / hz
    rows = []
    for pid, (cmd, own, children) in sorted(after.items(), key=lambda kv: -(kv[1][1] + kv[1][2])):
        own0, children0 = before.get(pid, (cmd, 0.0, 0.0))[1:]
        used = own - own0 + children - children0
        row = [cmd, f"{own - own0:.1f}", f"{children - children0:.1f}", f"{used / args.trials:.2f}"]
        if args.idle:
            idle = sum(before.get(pid, (cmd, 0.0, 0.0))[1:]) - sum(idle0.get(pid, (cmd, 0.0, 0.0))[1:])
            row += [f"{idle / args.idle:.3f}", f"{used / wall:.3f}"]
        rows.append(row)
    print("\n".join([header, "",
                     f"sweep: {args.trials} trials, {args.parallel} lanes, {wall:.0f} s wall "
                     f"({3600 * args.trials / wall:.0f} trials/h); machine busy {busy:.0f} CPU s, "
                     f"{busy / args.trials:.2f} per trial; overrides: {' '.join(args.set) or 'none'}", "",
                     table(["process", "own CPU s", "children CPU s", "per trial s"]
                           + (["idle cores", "sweep cores"] if args.idle else []), rows)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
