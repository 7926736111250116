"""Sweep throughput: the same rapid sweep in-process (`pruneflow sweep`) and through the embedded Airflow,
in ONE run of this script.

The sweep: a `pareto` TPE search over the conv1 sparsities of ResNet-20's three stages on digits 32x32,
N rapid trials (0 fine-tuning epochs, OpenVINO CPU benchmark of 3 rounds x 60 iterations), seed 0,
`parallel` lanes, the dense model first. A baseline is trained once into out/bench/ and given by path.

(a) in-process: one `python -m pruneflow.cli sweep SWEEP.yaml` process (one lane, trials one after another);
(b) Airflow: real servers (`pruneflow airflow up` in a tmp home, the embedded default: the preloading
    LocalExecutor, SQLite), one `prune_sweep` run triggered by REST, its trials `prune_trial` runs.

Reported: wall and trials/hour of each and their ratio; per trial through Airflow, trigger -> record
(the prune_trial run's queued_at -> end_date: median, p90); the machine's idle CPU share over each
phase (/proc/stat idle + iowait over all ticks: what the run left unused of the 2 cores).

    .venv/bin/python benchmarks/sweep_throughput.py [--trials 48] [--parallel 2] [--write] [--keep]

`--write` appends the printed output to benchmarks/RESULTS.md. Never run by CI.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
AIM_RATIO, AIM_PER_HOUR = 0.8, 600


def cpu_ticks() -> tuple[int, int]:
    """(idle + iowait, all) ticks of the whole machine since boot."""
    with open("/proc/stat") as fh:
        vals = [int(v) for v in fh.readline().split()[1:9]]
    return vals[3] + vals[4], sum(vals)


def idle_share(t0: tuple[int, int], t1: tuple[int, int]) -> float:
    return (t1[0] - t0[0]) / max(1, t1[1] - t0[1])


def run_inprocess(root: Path, baseline: Path, n: int, parallel: int, say) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    spec = {"study": "throughput", "objective": "pareto", "sampler": "tpe", "n_trials": n, "parallel": parallel,
            "seed": 0, "space": SWEEP_SPACE,
            "base": {"baseline": {"checkpoint": str(baseline)}, "finetune": {"epochs": 0},
                     "benchmark": BENCH, "artifacts": str(root / "trials"), "db": f"sqlite:///{root / 'results.db'}"}}
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PRUNEFLOW_"))}
    env["PRUNEFLOW_HOME"] = str(REPO)
    load0, ticks0, t0 = load_avg(), cpu_ticks(), time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pruneflow.cli", "sweep", str(path)], env=env, cwd=REPO,
                          capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"in-process sweep failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    say(f"in-process: {n} trials in {wall:.0f} s")
    return {"wall": wall, "idle": idle_share(ticks0, cpu_ticks()), "load": (load0, load_avg())}


def run_airflow(root: Path, baseline: Path, n: int, parallel: int, say, timeout: float) -> dict:
    srv = Servers(REPO, root, {})
    say(f"airflow up: healthy after {srv.up():.1f} s")
    try:
        with srv.client() as c:
            srv.unpause(c, "prune_trial", "prune_sweep")
            time.sleep(5)  # let start-up work (first parse, serialization) settle
            conf = {"study": "throughput", "objective": "pareto", "sampler": "tpe", "n_trials": n,
                    "parallel": parallel, "seed": 0, "space": SWEEP_SPACE, "report": False,
                    "trial": {"baseline": str(baseline), "epochs": 0, **BENCH}}
            load0, ticks0, t0 = load_avg(), cpu_ticks(), time.time()
            r = c.post("/api/v2/dags/prune_sweep/dagRuns", json={"logical_date": None, "conf": conf})
            r.raise_for_status()
            sweep_run = r.json()["dag_run_id"]
            deadline = time.monotonic() + timeout
            done = 0
            while True:
                state = c.get(f"/api/v2/dags/prune_sweep/dagRuns/{sweep_run}").json()["state"]
                if state in ("success", "failed"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the sweep did not finish in {timeout:.0f} s")
                runs = c.get("/api/v2/dags/prune_trial/dagRuns", params={"limit": 100, "state": "success"}).json()
                if runs["total_entries"] // 8 > done // 8:
                    say(f"airflow: {runs['total_entries']} trials done after {time.time() - t0:.0f} s")
                done = runs["total_entries"]
                time.sleep(2)
            ticks1 = cpu_ticks()
            if state != "success":
                raise RuntimeError(f"the sweep run ended {state} (logs under {srv.home / 'logs'}; use --keep)")
            runs = c.get("/api/v2/dags/prune_trial/dagRuns", params={"limit": 100}).json()["dag_runs"]
    finally:
        srv.down()
    last = max(ts(r["end_date"]) for r in runs)
    per_trial = sorted(ts(r["end_date"]) - ts(r["queued_at"]) for r in runs)
    return {"wall": last - t0, "idle": idle_share(ticks0, ticks1), "load": (load0, load_avg()),
            "runs": len(runs), "states": {s: sum(r["state"] == s for r in runs) for s in ("success", "failed")},
            "per_trial": per_trial}


def p90(vals: list[float]) -> float:
    return statistics.quantiles(vals, n=10)[-1] if len(vals) >= 2 else vals[0]


def report(args, header: str, ip: dict, af: dict) -> str:
    rate = {k: 3600 * args.trials / m["wall"] for k, m in (("ip", ip), ("af", af))}
    rows = [["in-process (`pruneflow sweep`, one lane)", f"{ip['wall']:.0f}", f"{rate['ip']:.0f}", "1.00",
             "-", "-", f"{100 * ip['idle']:.0f} %", f"{ip['load'][0]} -> {ip['load'][1]}"],
            [f"Airflow (`prune_sweep`, {args.parallel} lanes)", f"{af['wall']:.0f}", f"{rate['af']:.0f}",
             f"{rate['af'] / rate['ip']:.2f}", f"{statistics.median(af['per_trial']):.1f}", f"{p90(af['per_trial']):.1f}",
             f"{100 * af['idle']:.0f} %", f"{af['load'][0]} -> {af['load'][1]}"]]
    out = [header, "",
           table(["mode", "wall s", "trials/h", "ratio", "trigger->record median s", "p90 s", "idle CPU",
                  "load 1/5/15 before -> after"], rows),
           "",
           f"Airflow: {af['runs']} prune_trial runs ({af['states']}); the in-process wall includes the one Python and "
           "torch start-up of its process, the Airflow wall runs from the REST trigger to the last trial's end.",
           f"Aim (issue 11): Airflow >= {AIM_RATIO}x in-process and >= {AIM_PER_HOUR} trials/hour: "
           f"{rate['af'] / rate['ip']:.2f}x, {rate['af']:.0f}/hour."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = sweep_args(__doc__, 48, argv)
    root = OUT / "sweep_throughput"
    shutil.rmtree(root, ignore_errors=True)
    baseline = ensure_baseline(progress=say)
    header = machine_header("sweep_throughput: one rapid sweep in-process and through Airflow", argv)
    ip = run_inprocess(root / "inprocess", baseline, args.trials, args.parallel, say)
    af = run_airflow(root / "airflow", baseline, args.trials, args.parallel, say, args.timeout)
    text = report(args, header, ip, af)
    print(text)
    if args.write:
        append_results("Sweep throughput: in-process against Airflow, one run", text)
    (OUT / "sweep_throughput.json").write_text(json.dumps({"inprocess": ip, "airflow": af}, indent=2, default=str))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
