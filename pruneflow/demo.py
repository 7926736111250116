"""`make demo`: the main job on the embedded default, end to end.

1. Trains a ResNet-20 baseline on digits (32x32), runs a dense trial and light/medium/heavy rapid
   trials plus a fine-tuned one in-process, then measures every exported model again with their
   rounds interleaved in one run, so the speed-ups over the dense model are ratios measured side
   by side, and prints one table.
2. Runs one trial through Airflow in-process (`airflow dags test prune_trial`, no servers).
3. Starts the embedded Airflow, triggers a `pareto` sweep of rapid trials (`prune_sweep`, each trial
   a `prune_trial` run), waits for it, prints the report's path and the best trade-offs, and stops
   the servers.

This module drives Airflow through its command line and REST API only (pruneflow never imports it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pruneflow.cli import _Progress, _trial_table

GROUPS = ("layer1", "layer2", "layer3")
TRIALS = [  # name, per-group sparsity (of the inner conv of each residual block), fine-tuning epochs
    ("dense", (0.0, 0.0, 0.0), 0),
    ("light", (0.25, 0.25, 0.25), 0),
    ("medium", (0.5, 0.5, 0.5), 0),
    ("heavy", (0.75, 0.75, 0.875), 0),
    ("medium-ft2", (0.5, 0.5, 0.5), 2),
]


def trial_spec(out: Path, name: str, sparsities, epochs: int, baseline: Path) -> dict:
    groups = [{"name": g, "patterns": [f"{g}.*.conv1"], "sparsity": s}
              for g, s in zip(GROUPS, sparsities, strict=True) if s > 0]
    return {
        "name": f"demo-{name}", "trial_id": f"demo-{name}",
        "model": {"name": "resnet20"}, "dataset": {"name": "digits", "image_size": 32},
        "baseline": {"checkpoint": str(baseline)},
        "pruning": {"criterion": "l1", "groups": groups},
        "finetune": {"epochs": epochs, "lr": 0.01},
        "benchmark": {"rounds": 5, "iterations": 100, "threads": 1},
        "artifacts": str(out / "trials"), "db": f"sqlite:///{out / 'pruneflow.db'}",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--baseline-epochs", type=int, default=15)
    ap.add_argument("--compare-rounds", type=int, default=7)
    ap.add_argument("--sweep-trials", type=int, default=24)
    ap.add_argument("--parts", default="engine,airflow-trial,sweep",
                    help="comma-separated: engine, airflow-trial, sweep")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    parts = set(args.parts.split(","))
    progress = _Progress()
    t0 = time.perf_counter()
    baseline = ensure_baseline(out, args.baseline_epochs, progress)
    if "engine" in parts:
        engine_demo(out, baseline, args.compare_rounds, progress)
    if "airflow-trial" in parts:
        airflow_trial_demo(out, baseline, progress)
    if "sweep" in parts:
        sweep_demo(out, baseline, args.sweep_trials, progress)
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s; everything is under {out}")
    return 0


def ensure_baseline(out: Path, epochs: int, progress) -> Path:
    from pruneflow.baseline import train_baseline
    from pruneflow.data import DatasetSpec

    base_dir = out / "baselines" / "resnet20-digits-32"  # the named baseline the Airflow demos find
    baseline = base_dir / "baseline.pt"
    meta = base_dir / "baseline.json"
    if baseline.is_file() and meta.is_file() and json.loads(meta.read_text()).get("epochs") == epochs:
        progress(f"baseline: reusing {baseline}")
        return baseline
    progress(f"baseline: training resnet20 on digits 32x32 for {epochs} epochs")
    m = train_baseline("resnet20", DatasetSpec(name="digits", image_size=32), epochs, base_dir, progress=progress)
    progress(f"baseline: val Top-1 {m['val_top1']:.2f}%, test Top-1 {m['test_top1']:.2f}%")
    return baseline


def engine_demo(out: Path, baseline: Path, compare_rounds: int, progress) -> None:
    t0 = time.perf_counter()

    from pruneflow.bench import BenchmarkOptions, compare
    from pruneflow.spec import parse_spec
    from pruneflow.stages import run_trial

    rows = []
    for name, sparsities, epochs in TRIALS:
        progress(f"--- trial {name}: sparsities {dict(zip(GROUPS, sparsities, strict=True))}, {epochs} epoch(s)")
        spec = parse_spec(trial_spec(out, name, sparsities, epochs, baseline))
        rows.append(run_trial(spec, progress))

    progress(f"comparing {len(rows)} exported models, rounds interleaved in one run")
    opts = BenchmarkOptions(rounds=compare_rounds, iterations=200, threads=1, warmup=50)
    cmp = compare([Path(r["trial_dir"]) / "model.xml" for r in rows], opts, labels=[r["trial_id"] for r in rows])
    by_label = {m["label"]: m for m in cmp["models"]}
    for r in rows:
        m = by_label[r["trial_id"]]
        r["latency_median_ms"] = m["latency_ms"]["median"]
        r["latency_cv"] = m["round_median_cv"]
        r["speedup"] = cmp["ratios"][r["trial_id"]]["speedup_paired"]
    table = _trial_table(rows)
    lines = table.splitlines()
    widths = max(len(line) for line in lines)
    print("\n" + "=" * widths)
    print("pruneflow demo: ResNet-20 on digits 32x32, OpenVINO CPU f32, 1 thread, batch 1")
    print("=" * widths)
    for i, line in enumerate(lines):
        extra = "speed-up" if i == 0 else "-" * 8 if i == 1 else f"{rows[i - 2]['speedup']:.2f}x"
        print(f"{line}  {extra:>8}")
    print(f"\nsparsity = fraction of filters removed from each stage's inner convolutions; "
          f"Top-1 on the validation split;\nmedian latency and CV of round medians from one interleaved run of "
          f"{compare_rounds} rounds; speed-up = paired ratio over the dense model.")
    print(f"results DB: {out / 'pruneflow.db'}   artifacts: {out / 'trials'}   "
          f"total {time.perf_counter() - t0:.0f} s")
    (out / "demo.json").write_text(json.dumps({"rows": rows, "comparison": cmp}, indent=2, default=str))


def _airflow_home(out: Path):
    from pruneflow import airflow_cli

    os.environ.update(PRUNEFLOW_ARTIFACTS=str(out / "airflow-trials"), PRUNEFLOW_DB=f"sqlite:///{out / 'pruneflow.db'}",
                      PRUNEFLOW_BASELINES=str(out / "baselines"), PRUNEFLOW_REPORTS=str(out / "reports"))
    return airflow_cli, airflow_cli.resolve_home(str(out / "airflow"))


def airflow_trial_demo(out: Path, baseline: Path, progress) -> None:
    """One trial as a real prune_trial DAG run, executed in-process by `airflow dags test`."""
    airflow_cli, home = _airflow_home(out)
    if not airflow_cli.is_initialized(home):
        progress(f"airflow: initialising the demo Airflow home {home.path}")
        airflow_cli.init(home, port=airflow_cli._free_port(), say=lambda m: progress(f"airflow: {m}"))
    conf = {"trial_id": "demo-airflow", "baseline": str(baseline),
            "sparsities": {"layer1": 0.25, "layer2": 0.25, "layer3": 0.25},
            "rounds": 3, "iterations": 60}
    progress("airflow: `airflow dags test prune_trial` (in-process, no servers) ...")
    t = time.perf_counter()
    proc = subprocess.run([airflow_cli.airflow_executable(), "dags", "test", "prune_trial", "-c", json.dumps(conf)],
                          env=airflow_cli.server_env(home), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError("airflow dags test failed:\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-30:]))
    from pruneflow.store import ResultsStore

    store = ResultsStore(os.environ["PRUNEFLOW_DB"])
    row = store.get_trial("demo-airflow")
    store.close()
    if not row or row["status"] != "succeeded":
        raise RuntimeError(f"the Airflow trial did not succeed: {row and row['status']} {row and row['reason']}")
    print(f"\nAirflow trial demo-airflow ({time.perf_counter() - t:.0f} s through `airflow dags test`): "
          f"latency {row['latency_median_ms']:.3f} ms, Top-1 {row['top1_final']:.2f}%, {row['macs_after']:,} MACs")
    print(f"  results DB: {os.environ['PRUNEFLOW_DB']}   artifacts: {row['artifact_dir']}")


def sweep_demo(out: Path, baseline: Path, n_trials: int, progress) -> None:
    """A pareto sweep through the real embedded Airflow: servers up, sweep by REST, report, servers down."""
    import httpx

    airflow_cli, home = _airflow_home(out)
    port = airflow_cli._free_port()
    if not airflow_cli.is_initialized(home):
        airflow_cli.init(home, port=port, say=lambda m: progress(f"airflow: {m}"))
    cfg = home.cfg.read_text()
    port = int(next(line.split("=")[1] for line in cfg.splitlines() if line.strip().startswith("port =")))
    progress(f"airflow: starting the servers of {home.path} on port {port}")
    airflow_cli.up(home, say=lambda m: progress(f"airflow: {m}"))
    study = f"demo-pareto-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        url = f"http://127.0.0.1:{port}"
        password = json.loads(home.passwords.read_text())["admin"]
        token = httpx.post(f"{url}/auth/token", json={"username": "admin", "password": password}, timeout=60
                           ).json()["access_token"]
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        for dag_id in ("prune_trial", "prune_sweep"):
            deadline = time.monotonic() + 180
            while client.get(f"/api/v2/dags/{dag_id}").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"DAG {dag_id} did not appear")
                time.sleep(2)
            client.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
        conf = {"study": study, "objective": "pareto", "sampler": "tpe", "n_trials": n_trials, "parallel": 2,
                "trial": {"baseline": str(baseline), "rounds": 3, "iterations": 60, "warmup": 10}}
        progress(f"sweep: triggering prune_sweep, study {study}, {n_trials} rapid trials, 2 at a time")
        client.post("/api/v2/dags/prune_sweep/dagRuns", json={"logical_date": None, "conf": conf}).raise_for_status()
        _wait_for_study(client, os.environ["PRUNEFLOW_DB"], study, n_trials, progress)
    finally:
        progress("airflow: stopping the servers")
        airflow_cli.stop(home, say=lambda m: progress(f"airflow: {m}"))
    report_dir = out / "reports" / study
    summary = json.loads((report_dir / "summary.json").read_text())
    print(f"\nSweep {study}: {summary['trials']} trials {summary['by_status']}")
    print(f"report: {report_dir / 'report.html'}")
    print("best trade-offs (the Pareto front, fastest first):")
    for b in summary["best"]:
        targets = ", ".join(f"{k} {v:.2f}" for k, v in sorted(b["targets"].items())) or "dense"
        print(f"  {b['trial_id']}: {b['latency_median_ms']:.3f} ms, Top-1 {b['top1_final']:.2f}%  ({targets})")


def _wait_for_study(client, db: str, study: str, n_trials: int, progress, timeout: float = 3600) -> None:
    from pruneflow.store import ResultsStore

    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        runs = client.get("/api/v2/dags/prune_sweep/dagRuns", params={"limit": 200}).json()["dag_runs"]
        mine = [r for r in runs if (r.get("conf") or {}).get("study") == study]
        if any(r["state"] == "failed" for r in mine):
            raise RuntimeError(f"a prune_sweep round failed: {[r['dag_run_id'] for r in mine]}")
        store = ResultsStore(db)
        done = [r for r in store.list_trials(study=study) if r["status"] != "running"]
        store.close()
        if len(done) != seen:
            seen = len(done)
            progress(f"sweep: {seen}/{n_trials} trials done, round {len(mine)}")
        if seen >= n_trials and mine and all(r["state"] == "success" for r in mine) and \
                len(mine) == -(-n_trials // 2):
            return
        time.sleep(5)
    raise RuntimeError(f"sweep {study} did not finish in {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
