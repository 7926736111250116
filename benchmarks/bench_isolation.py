"""Benchmark isolation on the embedded default: the spread of ONE model re-measured during a sweep, with
torch tasks beside the benchmarks, with the benchmark taking the whole CPU pool, and with torch tasks
paused while it measures, in ONE run of this script.

While a rapid `prune_sweep` (random sampler, `parallel` lanes) runs through the embedded Airflow, a probe
trial with one fixed configuration (ResNet-20, conv1 of every stage at 0.5: the same thinned model every
time) is triggered again each time the previous probe ends, so each probe's benchmark meets whatever the
sweep's trials are doing then. Three deployments, one after the other, each a fresh tmp home:

(a) no CPU pool (`[pruneflow] cpu_pool` empty) and no pausing: torch tasks run in `default_pool`;
    benchmarks have a pool of their own with one slot, so two benchmarks never overlap, but a prune or
    export may run beside one;
(b) the benchmark in the CPU pool (`benchmark_pool = cpu`), no pausing: every torch task takes one of its
    slots, a benchmark takes all of them;
(c) the embedded default: benchmarks in a pool of one slot, and each stops the host's torch tasks while it
    measures (`pruneflow.cpu_pause`).

Reported per deployment: probes measured, the median of their median latencies, the spread across probes
(min, max, max/min, CV of the medians), the median within-benchmark CV (round medians), and the sweep's
trials/hour (what isolation costs). The ratio of the spreads is the point.

    .venv/bin/python benchmarks/bench_isolation.py [--trials 16] [--parallel 2] [--write] [--keep]

`--write` appends the printed output to benchmarks/RESULTS.md. Never run by CI.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

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

BENCH = {"rounds": 5, "iterations": 200, "warmup": 50, "threads": 1}
PROBE = {"name": "probe", "epochs": 0, "sparsities": {"layer1": 0.5, "layer2": 0.5, "layer3": 0.5}, **BENCH}
#: (label, [pruneflow] overrides); a pool of one slot for (a)'s benchmarks is created after `up`
NO_PAUSE = {"pruneflow.benchmark_pauses_torch_tasks": "False"}
MODES = [("no CPU pool: benchmarks have a pool of 1 slot, torch tasks run beside them",
          {"pruneflow.cpu_pool": "", "pruneflow.benchmark_pool": "bench_alone", **NO_PAUSE}),
         ("CPU pool: a benchmark takes every slot", {"pruneflow.benchmark_pool": "cpu", **NO_PAUSE}),
         ("pause: a benchmark stops the torch tasks while it measures (the embedded default)", {})]


def run_mode(root: Path, baseline: Path, overrides: dict[str, str], n: int, parallel: int, say,
             timeout: float) -> dict:
    srv = Servers(REPO, root, overrides)
    say(f"airflow up: healthy after {srv.up():.1f} s ({overrides or 'defaults'})")
    try:
        if overrides.get("pruneflow.cpu_pool") == "":  # (a): its benchmark pool is not the CPU pool init made
            env = {**srv.env, "AIRFLOW_HOME": str(srv.home), "AIRFLOW_CONFIG": str(srv.home / "airflow.cfg")}
            subprocess.run([str(Path(sys.executable).with_name("airflow")), "pools", "set",
                            overrides["pruneflow.benchmark_pool"], "1", "benchmarks only"],
                           env=env, check=True, capture_output=True)
        with srv.client() as c:
            srv.unpause(c, "prune_trial", "prune_sweep")
            time.sleep(5)  # let start-up work (first parse, serialization) settle
            conf = {"study": "isolation", "objective": "pareto", "sampler": "random", "n_trials": n,
                    "parallel": parallel, "seed": 0, "space": SWEEP_SPACE, "report": False,
                    "trial": {"baseline": str(baseline), "epochs": 0, **BENCH}}
            load0, t0 = load_avg(), time.time()
            r = c.post("/api/v2/dags/prune_sweep/dagRuns", json={"logical_date": None, "conf": conf})
            r.raise_for_status()
            sweep_run = r.json()["dag_run_id"]
            deadline = time.monotonic() + timeout
            probes: list[str] = []
            probe_run = None
            while True:
                state = c.get(f"/api/v2/dags/prune_sweep/dagRuns/{sweep_run}").json()["state"]
                if state in ("success", "failed"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the sweep did not finish in {timeout:.0f} s")
                if probe_run is None or c.get(f"/api/v2/dags/prune_trial/dagRuns/{probe_run}").json()["state"] in (
                        "success", "failed"):
                    trial_id = f"probe-{len(probes):03d}"
                    for _ in range(5):  # a 500 seen once here (SQLite metadata DB busy): try again
                        r = c.post("/api/v2/dags/prune_trial/dagRuns", json={
                            "logical_date": None, "conf": {**PROBE, "trial_id": trial_id, "baseline": str(baseline)}})
                        if r.status_code < 500:
                            break
                        say(f"trigger {trial_id}: {r.status_code} {r.text[:200]}; again in 2 s")
                        time.sleep(2)
                    r.raise_for_status()
                    probe_run = r.json()["dag_run_id"]
                    probes.append(trial_id)
                time.sleep(1)
            if state != "success":
                raise RuntimeError(f"the sweep run ended {state} (logs under {srv.home / 'logs'}; use --keep)")
            runs = c.get("/api/v2/dags/prune_trial/dagRuns", params={"limit": 200}).json()["dag_runs"]
            sweep_runs = [x for x in runs if (x.get("conf") or {}).get("study") == "isolation"]
            # the last probe may still run: wait for it, so that it is measured under the same sweep or not at all
            srv_wait = time.monotonic() + 300
            while probe_run and c.get(f"/api/v2/dags/prune_trial/dagRuns/{probe_run}").json()["state"] not in (
                    "success", "failed") and time.monotonic() < srv_wait:
                time.sleep(1)
    finally:
        srv.down()
    from pruneflow.store import ResultsStore

    store = ResultsStore(srv.env["PRUNEFLOW_DB"])
    last_sweep_end = max(ts(x["end_date"]) for x in sweep_runs)
    rows = [store.get_trial(p) for p in probes]
    # only the probes that ended while the sweep still ran: the last one may have run alone
    measured = [row for row in rows if row and row["status"] == "succeeded" and row["latency_median_ms"]
                and row["updated_at"].timestamp() <= last_sweep_end + 1]
    cvs = [store.benchmarks(row["trial_id"])[0]["round_median_cv"] for row in measured]
    store.close()
    return {"probes": [row["latency_median_ms"] for row in measured], "cv": cvs, "trials": len(sweep_runs),
            "wall": last_sweep_end - t0, "load": (load0, load_avg())}


def report(args, header: str, results: list[tuple[str, dict]]) -> str:
    rows = []
    spreads = []
    for label, m in results:
        p = m["probes"]
        spread = max(p) / min(p) if p else float("nan")
        spreads.append(spread)
        cv = statistics.pstdev(p) / statistics.mean(p) if len(p) > 1 else float("nan")
        rows.append([label, len(p), f"{statistics.median(p):.3f}" if p else "-", f"{min(p):.3f}" if p else "-",
                     f"{max(p):.3f}" if p else "-", f"{spread:.2f}", f"{100 * cv:.1f} %",
                     f"{100 * statistics.median(m['cv']):.1f} %" if m["cv"] else "-",
                     f"{3600 * m['trials'] / m['wall']:.0f}", f"{m['load'][0]} -> {m['load'][1]}"])
    out = [header, "",
           table(["deployment", "probes", "median ms", "min ms", "max ms", "max/min", "CV of medians",
                  "median CV in a benchmark", "sweep trials/h", "load before -> after"], rows),
           "",
           f"Spread ratio (max/min against the first row's): "
           f"{', '.join(f'{x / spreads[0]:.2f}' for x in spreads[1:])}. The probe is one "
           f"fixed model (ResNet-20, conv1 of each stage at 0.5) re-measured during a {args.trials}-trial rapid "
           f"sweep with {args.parallel} lanes; only probes that ended while the sweep ran are counted."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = sweep_args(__doc__, 16, argv)
    root = OUT / "bench_isolation"
    shutil.rmtree(root, ignore_errors=True)
    baseline = ensure_baseline(progress=say)
    header = machine_header("bench_isolation: one model re-measured during a sweep, three ways of isolating it",
                            argv)
    results = []
    for i, (label, overrides) in enumerate(MODES):
        m = run_mode(root / f"mode{i}", baseline, overrides, args.trials, args.parallel, say, args.timeout)
        say(f"{label}: {len(m['probes'])} probes, {m['probes']}")
        results.append((label, m))
    text = report(args, header, results)
    print(text)
    if args.write:
        append_results("Benchmark isolation: one model re-measured during a sweep", text)
    (OUT / "bench_isolation.json").write_text(json.dumps(dict(results), indent=2, default=str))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
