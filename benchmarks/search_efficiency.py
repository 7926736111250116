"""search_efficiency: what the search gains over random sampling, on real rapid trials.

ResNet-20 on digits 32x32 (the embedded default), rapid trials (0 fine-tuning epochs), three
pruning groups (the inner convolution of every residual block per stage), sparsity in [0, 0.9]
in steps of 0.05. For each sampler (TPE on the single objective, NSGA-II and multi-objective TPE on
the Pareto objective, random search on both) and each seed, a study of N trials runs through
`pruneflow.sweep.run_sweep`. Trials are real: each configuration is pruned, thinned, exported and
benchmarked once; a configuration asked for again (by another seed or sampler) reuses its measured
result, which keeps the whole benchmark to a few hundred distinct trials.

Reported per sampler, over seeds:
  * trials needed to reach within 1% of the best latency found (by any run) among trials whose
    Top-1 is no worse than the dense model's by 1 point (`latency_over_top1`, floor = dense - 1);
  * the hypervolume of the Pareto front after N trials (reference: the slowest latency x 1.1, 0 %).

Run:  .venv/bin/python benchmarks/search_efficiency.py [--trials 30] [--seeds 3]

With --spaces PROFILE.json (a sensitivity profile of ResNet-20 on digits 32x32, `pruneflow sensitivity`):
hand-written groups against `space: auto` from that profile, each with TPE with and without
predicted-infeasible skipping (`latency_model`, method macs), on `top1_under_latency` with a budget of
--budget x the dense latency (in ms, measured once first, the same for every run). The target is the
hypervolume of the feasible region (latency <= budget) that a --reference-trials random search of the
hand-written space reaches, per seed; every run stops when it reaches its seed's target or after
--reference-trials trials. Every trial is run fresh (no cache); the seeds are the outer loop and the order
of the configurations rotates with the seed, so machine drift falls on all of them alike. Reported per
configuration: trials run (and candidates skipped) and wall time to reach the target, per seed and median.

Run:  .venv/bin/python benchmarks/search_efficiency.py --spaces out/sensitivity/NAME/profile.json [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUPS = [("layer1", "layer1.*.conv1"), ("layer2", "layer2.*.conv1"), ("layer3", "layer3.*.conv1")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench" / "search"))
    ap.add_argument("--spaces", metavar="PROFILE", help="hand-written against space: auto, with and without skipping")
    ap.add_argument("--reference-trials", type=int, default=64)
    ap.add_argument("--budget", type=float, default=0.6, help="latency budget as a fraction of the dense latency")
    ap.add_argument("--write", action="store_true", help="append the output to benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.spaces:
        return spaces(args)

    from pruneflow import analysis
    from pruneflow.baseline import train_baseline
    from pruneflow.data import DatasetSpec
    from pruneflow.spec import parse_spec
    from pruneflow.stages import TrialFailed, run_trial
    from pruneflow.store import ResultsStore
    from pruneflow.sweep import parse_sweep, run_sweep

    out = Path(args.out)
    base_dir = ROOT / "out" / "bench" / "baseline-resnet20-digits32"
    if not (base_dir / "baseline.pt").is_file():
        train_baseline("resnet20", DatasetSpec(name="digits", image_size=32), 15, base_dir)
    cache_db = f"sqlite:///{out / 'cache.db'}"
    cache_dir = out / "cache"
    shutil.rmtree(out / "studies", ignore_errors=True)
    (out / "studies").mkdir(parents=True, exist_ok=True)
    base = {"baseline": {"checkpoint": str(base_dir / "baseline.pt")},
            "benchmark": {"rounds": 3, "iterations": 60, "warmup": 10, "threads": 1},
            "artifacts": str(cache_dir), "db": cache_db}
    measured_now = {"n": 0}

    def cached_result(spec: dict) -> dict | None:
        """Run (once) the configuration in the cache DB; return its row."""
        key = "c-" + "-".join(f"{int(round(g['sparsity'] * 100)):02d}" for g in _groups(spec))
        store = ResultsStore(cache_db)
        row = store.get_trial(key)
        store.close()
        if row is None or row["status"] == "running":
            cfg = {**spec, "trial_id": key, "name": "cache", "study": None, "sweep": None,
                   "artifacts": str(cache_dir), "db": cache_db}
            try:
                run_trial(parse_spec(cfg))
            except TrialFailed:
                pass
            measured_now["n"] += 1
            store = ResultsStore(cache_db)
            row = store.get_trial(key)
            store.close()
        return row

    def runner_for(study_db: str):
        def run(spec: dict) -> None:
            row = cached_result(spec)
            store = ResultsStore(study_db)
            keep = ("status", "reason", "latency_median_ms", "latency_p90_ms", "latency_cv", "top1_masked",
                    "top1_final", "params_after", "macs_after", "epochs_run", "sparsities_json")
            store.upsert_trial(spec["trial_id"], study=spec["study"], spec_json=spec, **{k: row[k] for k in keep})
            store.close()
        return run

    space = [{"name": n, "patterns": [p], "low": 0.0, "high": 0.9, "step": 0.05} for n, p in GROUPS]
    runs = [("tpe", "latency_over_top1"), ("random", "latency_over_top1"),
            ("tpe", "pareto"), ("nsga2", "pareto"), ("random", "pareto")]
    dense = cached_result({**parse_spec(base).model_dump(mode="json")})
    floor = dense["top1_final"] - 1.0
    t0 = time.perf_counter()
    results: dict[tuple[str, str], list[dict]] = {}
    for sampler, objective in runs:
        for seed in range(args.seeds):
            study = f"{objective}-{sampler}-s{seed}"
            db = f"sqlite:///{out / 'studies' / (study + '.db')}"
            extra = {"top1_floor": floor} if objective == "latency_over_top1" else {}
            sweep = parse_sweep({"study": study, "base": {**base, "db": db}, "space": space, "objective": objective,
                                 "sampler": sampler, "n_trials": args.trials, "parallel": 1, "seed": seed,
                                 "include_dense": False, **extra})
            run_sweep(sweep, runner=runner_for(db))
            results.setdefault((sampler, objective), []).append(
                {"rows": analysis.study_rows(db, study), "sweep": sweep})
            print(f"[{time.perf_counter() - t0:6.0f}s] {study}: done ({measured_now['n']} distinct trials measured)",
                  file=sys.stderr, flush=True)

    # the best latency at Top-1 >= dense - 1 found by any run (the dense model itself is measured apart,
    # not given to the searches), and a common hypervolume reference
    all_rows = [r for v in results.values() for s in v for r in s["rows"]]
    ok = [r for r in analysis.measured(all_rows) if r["top1_final"] >= floor]
    best_latency = min([r["latency_median_ms"] for r in ok] or [math.inf])
    ref = analysis.reference(all_rows)

    def trials_to_within(rows, tol=0.01):
        for i, r in enumerate(rows, 1):
            if (r["status"] == "succeeded" and r["top1_final"] is not None and r["top1_final"] >= floor
                    and r["latency_median_ms"] <= best_latency * (1 + tol)):
                return i
        return None

    lines = []
    lines.append(f"search_efficiency: ResNet-20 / digits 32x32, rapid trials, 3 groups x 19 sparsities, "
                 f"N = {args.trials} trials, seeds 0..{args.seeds - 1}")
    lines.append(f"dense: latency {dense['latency_median_ms']:.3f} ms, Top-1 {dense['top1_final']:.2f}%; "
                 f"floor {floor:.2f}%; best latency at the floor found by any run {best_latency:.3f} ms "
                 f"({dense['latency_median_ms'] / best_latency:.2f}x); distinct trials measured {measured_now['n']}")
    lines.append("")
    lines.append(f"{'sampler':<8} {'objective':<18} {'trials to within 1% of best (per seed)':<42} "
                 f"{'median':>7} {'hypervolume after N (per seed)':<36} {'mean':>8}")
    for (sampler, objective), studies in results.items():
        reach = [trials_to_within(s["rows"]) for s in studies]
        hv = [analysis.hypervolume(s["rows"], ref) for s in studies]
        reach_s = ", ".join("-" if r is None else str(r) for r in reach)
        finite = [r if r is not None else args.trials + 1 for r in reach]
        lines.append(f"{sampler:<8} {objective:<18} {reach_s:<42} {statistics.median(finite):>7.1f} "
                     f"{', '.join(f'{h:.1f}' for h in hv):<36} {statistics.mean(hv):>8.2f}")
    lines.append("")
    lines.append("(a run that never reached it counts as N+1 in the median; hypervolume in ms x Top-1 points "
                 f"against reference ({ref[0]:.3f} ms, 0 %); load average {os.getloadavg()[0]:.2f}; "
                 f"{time.perf_counter() - t0:.0f} s)")
    text = "\n".join(lines)
    print(text)
    (out / "result.txt").write_text(text)
    (out / "result.json").write_text(json.dumps({f"{k[0]}/{k[1]}": [
        {"trial_ids": [r["trial_id"] for r in s["rows"]]} for s in v] for k, v in results.items()}, indent=1))
    return 0


def spaces(args) -> int:
    """Hand-written groups against space: auto, with and without predicted-infeasible skipping."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import append_results, machine_header, say, table

    from pruneflow import analysis
    from pruneflow.latency_model import build_table
    from pruneflow.spec import parse_spec
    from pruneflow.stages import TrialFailed, run_trial
    from pruneflow.sweep import parse_sweep, run_sweep

    out = Path(args.out) / "spaces"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    profile = json.loads(Path(args.spaces).read_text())
    base = {"baseline": {"checkpoint": profile["baseline"]}, "dataset": profile["dataset"],
            "benchmark": {"rounds": 3, "iterations": 60, "warmup": 10, "threads": 1}, "artifacts": str(out / "trials")}
    dense = run_trial(parse_spec({**base, "trial_id": "dense", "db": f"sqlite:///{out / 'dense.db'}"}))
    budget = round(args.budget * dense["latency_median_ms"], 5)
    say(f"dense: {dense['latency_median_ms']:.4f} ms, Top-1 {dense['top1_final']:.2f}%; budget {budget} ms")
    hand = [{"name": n, "patterns": [p], "low": 0.0, "high": 0.9, "step": 0.05} for n, p in GROUPS]
    auto = {"profile": args.spaces, "tolerance": 1.0, "step": 0.05}

    def sweep_of(name: str, space, sampler: str, skip: bool, seed: int, table: str | None = None):
        data = {"study": f"{name}-s{seed}", "base": {**base, "db": f"sqlite:///{out / f'{name}-s{seed}.db'}"},
                "space": space, "objective": "top1_under_latency", "latency_budget": {"value": budget, "unit": "ms"},
                "sampler": sampler, "n_trials": args.reference_trials, "parallel": 1, "seed": seed,
                "include_dense": False}
        if space == "auto":
            data["auto"] = auto
        if table:
            data["latency_model"] = {"table": table, "skip_infeasible": skip}
        return parse_sweep(data)

    tables, table_s = {}, {}
    for kind, space in (("hand", hand), ("auto", "auto")):
        t0 = time.perf_counter()
        probe = sweep_of(f"table-{kind}", space, "tpe", False, 0)
        build_table(probe, out / f"table-{kind}", say)
        tables[kind], table_s[kind] = str(out / f"table-{kind}" / "table.json"), time.perf_counter() - t0
    auto_space = sweep_of("probe", "auto", "tpe", False, 0).space
    say(f"space: auto chose {len(auto_space)} groups: " + ", ".join(f"{r.name} <= {r.high}" for r in auto_space))

    def feasible_hv(rows) -> float:
        return analysis.hypervolume([r for r in analysis.measured(rows) if r["latency_median_ms"] <= budget],
                                    (budget, 0.0))

    configs = [("hand, TPE", "hand", "tpe", False), ("hand, TPE, skip", "hand", "tpe", True),
               ("auto, TPE", "auto", "tpe", False), ("auto, TPE, skip", "auto", "tpe", True)]
    results: dict[str, list[dict]] = {}
    targets = []
    t_all = time.perf_counter()
    for seed in range(args.seeds):
        ref = sweep_of("random", hand, "random", False, seed)
        run_sweep(ref)
        target = feasible_hv(analysis.study_rows(analysis_db(ref), ref.study))
        targets.append(target)
        say(f"seed {seed}: the {args.reference_trials}-trial random search reaches hypervolume {target:.2f}")
        order = configs[seed % len(configs):] + configs[:seed % len(configs)]
        for label, kind, sampler, skip in order:
            sweep = sweep_of(label.replace(", ", "-").replace(" ", ""), hand if kind == "hand" else "auto", sampler,
                             skip, seed, tables[kind])
            t0, reached = time.perf_counter(), None

            def run_until_target(spec: dict, sweep=sweep, target=target) -> None:
                try:
                    run_trial(parse_spec(spec))
                except TrialFailed:
                    pass
                if target > 0 and feasible_hv(analysis.study_rows(analysis_db(sweep), sweep.study)) >= target:
                    raise _Reached

            try:
                run_sweep(sweep, runner=run_until_target)
            except _Reached:
                reached = time.perf_counter() - t0
            rows = analysis.study_rows(analysis_db(sweep), sweep.study)
            ran = sum(r["status"] != "skipped" for r in rows)
            results.setdefault(label, []).append({"trials": ran if reached is not None else None, "seconds": reached,
                                                  "skipped": sum(r["status"] == "skipped" for r in rows),
                                                  "hv": feasible_hv(rows)})
            say(f"seed {seed} {label}: {results[label][-1]}")

    def med(values):
        done = [v for v in values if v is not None]
        return "-" if len(done) < len(values) / 2 else f"{statistics.median(done):.0f}"

    rows_out = [["random (reference)", "hand", ", ".join(str(args.reference_trials) for _ in targets), "-", "-", "-",
                 ", ".join(f"{t:.1f}" for t in targets)]]
    for label, res in results.items():
        rows_out.append([label, f"{len(auto_space)} groups" if "auto" in label else f"{len(hand)} groups",
                         ", ".join("-" if r["trials"] is None else str(r["trials"]) for r in res),
                         med([r["trials"] for r in res]), med([r["seconds"] for r in res]),
                         ", ".join(str(r["skipped"]) for r in res), ", ".join(f"{r['hv']:.1f}" for r in res)])
    text = "\n".join([
        machine_header("search_efficiency --spaces", sys.argv[1:]),
        f"ResNet-20 / digits 32x32, rapid trials, top1_under_latency, budget {budget} ms ({args.budget} x the dense "
        f"{dense['latency_median_ms']:.4f} ms); seeds 0..{args.seeds - 1}; tables built in "
        f"{table_s['hand']:.0f} s (hand) and {table_s['auto']:.0f} s (auto); the auto space: "
        + ", ".join(f"{r.name} [0, {r.high}]" for r in auto_space), "",
        table(["configuration", "space", "trials to the target (per seed)", "median", "median s", "skipped",
               "hypervolume at stop"], rows_out),
        "", f"(a run that did not reach its target in {args.reference_trials} trials shows '-'; "
        f"total {time.perf_counter() - t_all:.0f} s)"])
    print(text)
    if args.write:
        append_results("search_efficiency --spaces", text)
    return 0


class _Reached(Exception):
    """A run reached its target: the sweep stops there."""


def analysis_db(sweep) -> str:
    return sweep.trial_spec().db


def _groups(spec: dict) -> list[dict]:
    by = {g["name"]: g for g in spec["pruning"]["groups"]}
    return [by.get(n, {"name": n, "sparsity": 0.0}) for n, _ in GROUPS]


if __name__ == "__main__":
    sys.exit(main())
