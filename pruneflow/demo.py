"""`make demo`: the main job on the embedded default, end to end.

The default (`--parts sweep`) is what a user of pruneflow does:

1. Trains the ResNet-20 baseline on digits (32x32), once.
2. Starts the embedded Airflow and triggers a `pareto` sweep (`prune_sweep`): a screen of rapid trials,
   each a `prune_trial` run whose Top-1 is measured after BatchNorm recalibration, then promotion
   stages that fine-tune the best of the screen (successive halving) as new `prune_trial` runs.
3. Prints the answer: the Pareto front of the fine-tuned models, each measured again beside the dense
   model in one run with their rounds interleaved, so the speed-ups are ratios measured side by side,
   with the Top-1 the screen predicted and the Top-1 fine-tuning achieved; then the report's path.

`--parts engine` runs a few trials in-process and compares them; `--parts airflow-trial` runs one
trial through `airflow dags test` (no servers). This module drives Airflow through its command line
and REST API only (pruneflow never imports it).
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
#: The demo's promotion stages (epochs:top): fine-tuning settings measured to converge on ResNet-20/digits
#: (benchmarks/recovery_prediction.py)
PROMOTE = "10:4"
FINETUNE_LR = 0.02
# sweep lanes: 3 keep the 2-slot CPU pool busy while a benchmark holds both (benchmarks/RESULTS.md, sweep_throughput)
PARALLEL = 3
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
    ap.add_argument("--sweep-trials", type=int, default=24, help="rapid trials of the screen (the dense one included)")
    ap.add_argument("--promote", default=PROMOTE,
                    help="promotion stages as EPOCHS:TOP,... (each fine-tunes the previous stage's best TOP)")
    ap.add_argument("--parts", default="sweep", help="comma-separated: sweep, engine, airflow-trial")
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
        promote = [{"epochs": int(e), "top": int(k)} for e, k in (p.split(":") for p in args.promote.split(","))]
        sweep_demo(out, baseline, args.sweep_trials, promote, args.compare_rounds, progress)
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
        airflow_cli.init(home, port=airflow_cli.free_port(), say=lambda m: progress(f"airflow: {m}"))
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


def sweep_demo(out: Path, baseline: Path, n_trials: int, promote: list[dict], compare_rounds: int, progress) -> None:
    """A pareto sweep through the real embedded Airflow: servers up, sweep by REST (screen, then promotion
    stages), servers down; then the fine-tuned front measured beside the dense model, and the report."""
    import httpx

    airflow_cli, home = _airflow_home(out)
    port = airflow_cli.free_port()
    if not airflow_cli.is_initialized(home):
        airflow_cli.init(home, port=port, say=lambda m: progress(f"airflow: {m}"))
    cfg = home.cfg.read_text()
    port = int(next(line.split("=")[1] for line in cfg.splitlines() if line.strip().startswith("port =")))
    progress(f"airflow: starting the servers of {home.path} on port {port}")
    airflow_cli.up(home, say=lambda m: progress(f"airflow: {m}"))
    study = f"demo-pareto-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
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
        conf = {"study": study, "objective": "pareto", "sampler": "tpe", "n_trials": n_trials, "parallel": PARALLEL,
                "promote": promote,
                "trial": {"baseline": str(baseline), "lr": FINETUNE_LR, "rounds": 3, "iterations": 60, "warmup": 10}}
        stages = ", then ".join(f"the best {p['top']} fine-tuned for {p['epochs']} epochs" for p in promote)
        progress(f"sweep: triggering prune_sweep, study {study}: {n_trials} rapid trials in {PARALLEL} lanes, then {stages}")
        client.post("/api/v2/dags/prune_sweep/dagRuns", json={"logical_date": None, "conf": conf}).raise_for_status()
        _wait_for_sweep(client, out / "reports" / study, study, progress)
    finally:
        progress("airflow: stopping the servers")
        airflow_cli.stop(home, say=lambda m: progress(f"airflow: {m}"))
    progress(f"sweep: done in {time.perf_counter() - t0:.0f} s")
    _print_answer(out, study, compare_rounds, progress)


def _print_answer(out: Path, study: str, compare_rounds: int, progress) -> None:
    """The fine-tuned front, each model measured again beside the dense one (rounds interleaved)."""
    from pruneflow import analysis
    from pruneflow.bench import BenchmarkOptions, compare
    from pruneflow.table import format_table

    report_dir = out / "reports" / study
    summary = json.loads((report_dir / "summary.json").read_text())
    rows = analysis.study_rows(os.environ["PRUNEFLOW_DB"], study)
    by_id = {r["trial_id"]: r for r in rows}
    dense = analysis.dense_row(rows)
    front = [by_id[b["trial_id"]] for b in summary["best"] if not by_id[b["trial_id"]]["dense"]]
    models = [dense, *front]
    progress(f"comparing the dense model and the {len(front)} fine-tuned models of the front, rounds interleaved")
    cmp = compare([Path(r["artifact_dir"]) / "model.xml" for r in models],
                  BenchmarkOptions(rounds=compare_rounds, iterations=200, threads=1, warmup=50),
                  labels=[r["trial_id"] for r in models])
    lat = {m["label"]: m["latency_ms"]["median"] for m in cmp["models"]}
    table = []
    for r in models:
        parent = by_id.get(r.get("parent") or "")
        screen = parent
        while screen is not None and screen.get("parent"):  # the screen's trial this one descends from
            screen = by_id.get(screen["parent"])
        table.append({
            "trial": r["trial_id"] + (" (dense)" if r["dense"] else ""),
            **{g: r["targets"].get(g, 0.0) for g in GROUPS},
            "macs": r.get("macs_after"), "ms": lat[r["trial_id"]],
            "speedup": cmp["ratios"][r["trial_id"]]["speedup_paired"],
            "predicted": (screen or r).get("top1_recalibrated"), "achieved": r["top1_final"],
            "epochs": r.get("epochs_run") or 0,
        })
    cols = [("trial", "trial"), *[(g, g) for g in GROUPS], ("macs", "MACs"), ("ms", "median ms"),
            ("speedup", "speed-up"), ("predicted", "Top-1 screen"), ("achieved", "Top-1 fine-tuned"),
            ("epochs", "epochs")]
    fmt = {g: (lambda v: f"{v:.2f}") for g in GROUPS} | {
        "ms": lambda v: f"{v:.3f}", "speedup": lambda v: f"{v:.2f}x",
        "predicted": lambda v: "-" if v is None else f"{v:.2f}", "achieved": lambda v: f"{v:.2f}"}
    text = format_table(table, cols, fmt)
    width = max(len(line) for line in text.splitlines())
    print("\n" + "=" * width)
    print("pruneflow demo: the fastest accurate ResNet-20s for digits 32x32 on this CPU (OpenVINO f32, 1 thread)")
    print("=" * width)
    print(text)
    q = summary.get("prediction") or {}
    rec = (q.get("recalibrated") or {})
    c = q.get("compute") or {}
    print(f"\nsparsity = fraction of filters removed from each stage's inner convolutions; Top-1 on the validation "
          f"split.\nTop-1 screen = the rapid trial's Top-1 after BatchNorm recalibration (no training); Top-1 "
          f"fine-tuned = after promotion.\nspeed-up = paired ratio over the dense model, all measured in one run "
          f"of {compare_rounds} interleaved rounds.")
    if rec:
        print(f"screen against fine-tuning over the promoted trials: {analysis.describe_rank_correlation(rec)}; "
              f"fine-tuning spent {c.get('epochs_spent')} epochs against {c.get('epochs_to_fine_tune_all')} to "
              "fine-tune every screened trial.")
    counts = ", ".join(f"{n} {status}" for status, n in summary["by_status"].items() if n) or "none recorded"
    print(f"study {study}: {summary['trials']} trials ({counts})")
    print(f"report: {report_dir / 'report.html'}")
    (report_dir / "demo_front.json").write_text(json.dumps({"rows": table, "comparison": cmp}, indent=2, default=str))


def _wait_for_sweep(client, report_dir: Path, study: str, progress, timeout: float = 3600) -> None:
    """Until the sweep's last run has written the report (every run of the study succeeded)."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        runs = client.get("/api/v2/dags/prune_sweep/dagRuns", params={"limit": 200}).json()["dag_runs"]
        mine = [r for r in runs if (r.get("conf") or {}).get("study") == study]
        if any(r["state"] == "failed" for r in mine):
            raise RuntimeError(f"a prune_sweep run failed: {[r['dag_run_id'] for r in mine]}")
        state = (len(mine), max(((r.get("conf") or {}).get("stage") or 0 for r in mine), default=0))
        if state != seen:
            seen = state
            progress(f"sweep: run {state[0]} " + ("(screening)" if state[1] == 0 else f"(promotion stage {state[1]})"))
        if (report_dir / "summary.json").is_file() and mine and all(r["state"] == "success" for r in mine):
            return
        time.sleep(3)
    raise RuntimeError(f"sweep {study} did not finish in {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
