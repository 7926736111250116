"""Wall time of each stage of a rapid pruning trial, and where it goes.

A rapid trial: ResNet-20 on digits at 32x32, groups layer1/2/3 (`layerN.*.conv1`) at sparsity 0.5,
0 fine-tuning epochs, OpenVINO CPU f32 benchmark with the spec's default settings. N trials run in
one process through the stage functions, each stage timed with time.perf_counter; the first trial
is the cold one (lazy imports, first calls), the others are warm. Start-up + import cost is timed in
fresh subprocesses. One more trial runs under cProfile (not counted in the timings) to say which
functions the time goes to.

    .venv/bin/python benchmarks/trial_stages.py [--trials N] [--quick] [--no-profile]

Writes under out/bench/ (baseline reused across runs, trial folders replaced). Never run by CI.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT, REPO, ensure_baseline, load_avg, machine_header, table  # noqa: E402

STAGE_NAMES = ("prepare", "prune", "thinnify", "retrain", "export", "benchmark", "record")
RESEARCH_S = (24.0, 55.0)  # the research pipeline's seconds per rapid trial (about 90 per hour)
TARGET_S = 10.0

# Library functions the time goes to: (label, file suffix, function name). Inclusive times: rows overlap
# (load_checkpoint of a thinned model includes a build_graph, thin includes one, ...).
HOTSPOTS = [
    ("train.evaluate (full val/test forward)", "pruneflow/train.py", "evaluate"),
    ("data.load_dataset (digits, resize)", "pruneflow/data.py", "load_dataset"),
    ("checkpoint.load_checkpoint", "pruneflow/checkpoint.py", "load_checkpoint"),
    ("checkpoint.save_checkpoint", "pruneflow/checkpoint.py", "save_checkpoint"),
    ("prune.build_graph (Torch-Pruning trace)", "pruneflow/prune.py", "build_graph"),
    ("prune.make_plan", "pruneflow/prune.py", "make_plan"),
    ("prune.masked_copy", "pruneflow/prune.py", "masked_copy"),
    ("prune.thin", "pruneflow/prune.py", "thin"),
    ("prune.count_params_and_macs", "pruneflow/prune.py", "count_params_and_macs"),
    ("prune.max_output_difference (64 imgs)", "pruneflow/prune.py", "max_output_difference"),
    ("export.export_onnx (torch.onnx)", "pruneflow/export.py", "export_onnx"),
    ("export.export_openvino (convert+save)", "pruneflow/export.py", "export_openvino"),
    ("export.check_parity", "pruneflow/export.py", "check_parity"),
    ("  parity: onnxruntime session+runs", "pruneflow/export.py", "_run_onnxruntime"),
    ("  parity: openvino compile+runs", "pruneflow/export.py", "_run_openvino"),
    ("export.save_reference", "pruneflow/export.py", "save_reference"),
    ("bench.load_model (OV read+compile)", "pruneflow/bench/backends.py", "load_model"),
    ("bench.timed_calls (warm-up+rounds)", "pruneflow/bench/backends.py", "timed_calls"),
    ("gc.collect (bench._gc_paused)", "~", "<built-in method gc.collect>"),
    ("store.ResultsStore (SQLite)", "pruneflow/store.py", "__init__"),
    ("stages.versions (importlib.metadata)", "pruneflow/stages.py", "versions"),
]
# Wrappers skipped in the "top cumulative functions" list: they only forward to what is below them.
_WRAPPERS = ("_wrapped_call_impl", "_call_impl", "decorate_context", "inner", "__enter__", "__exit__", "wrapper")


def spec_dict(baseline: Path, root: Path, trial_id: str) -> dict:
    return {
        "name": "bench-stages", "trial_id": trial_id,
        "model": {"name": "resnet20"}, "dataset": {"name": "digits", "image_size": 32},
        "baseline": {"checkpoint": str(baseline)},
        "pruning": {"criterion": "l1", "groups": [
            {"name": f"layer{i}", "patterns": [f"layer{i}.*.conv1"], "sparsity": 0.5} for i in (1, 2, 3)]},
        "finetune": {"epochs": 0},
        "artifacts": str(root / "trials"), "db": f"sqlite:///{root / 'results.db'}",
    }


def run_stages(spec, profile: bool = False) -> tuple[dict[str, float], dict[str, pstats.Stats]]:
    from pruneflow import stages

    times: dict[str, float] = {}
    profiles: dict[str, pstats.Stats] = {}
    for name in STAGE_NAMES:
        fn = getattr(stages, name)
        prof = cProfile.Profile() if profile else None
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        out = fn(spec)
        if prof is not None:
            prof.disable()
        times[name] = time.perf_counter() - t0
        if prof is not None:
            profiles[name] = pstats.Stats(prof)
        if name == "retrain" and out.get("abandoned"):
            raise RuntimeError(f"trial abandoned in retrain: {out.get('reason')}")
    times["total"] = sum(times[s] for s in STAGE_NAMES)
    return times, profiles


def import_cost(repeats: int) -> list[tuple[str, float]]:
    """Median wall seconds of a fresh interpreter doing only these imports (start-up included)."""
    cases = [
        ("python -c pass (interpreter only)", "pass"),
        ("import torch", "import torch"),
        ("import openvino", "import openvino"),
        ("import pruneflow.bench (torch-free)", "import pruneflow.bench"),
        ("import pruneflow.stages", "import pruneflow.stages"),
        ("import pruneflow.stages, torch, openvino", "import pruneflow.stages, torch, openvino"),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = []
    for label, code in cases:
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
            ts.append(time.perf_counter() - t0)
        out.append((label, statistics.median(ts)))
    return out


def _short(key: tuple) -> str:
    file, line, func = key
    if file == "~":
        return func
    for marker in ("site-packages/", "/work/main/", str(REPO) + "/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{file}:{line}({func})"


def top_cumulative(stats: pstats.Stats, n: int) -> list[tuple[str, int, float, float]]:
    rows = []
    for key, (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if key[2] in _WRAPPERS or key[2].startswith("<lambda>") or "stages.py" in key[0]:
            continue
        rows.append((_short(key), nc, tt, ct))
    rows.sort(key=lambda r: -r[3])
    return rows[:n]


def hotspot_matrix(profiles: dict[str, pstats.Stats]) -> list[list[str]]:
    rows = []
    for label, suffix, func in HOTSPOTS:
        per_stage = []
        calls = 0
        for name in STAGE_NAMES:
            ct = 0.0
            for key, (_cc, nc, _tt, c, _callers) in profiles[name].stats.items():  # type: ignore[attr-defined]
                if key[2] == func and key[0].endswith(suffix):
                    ct += c
                    calls += nc
            per_stage.append(ct)
        if sum(per_stage) < 0.005:
            continue
        rows.append([label, str(calls), *(f"{v:.2f}" if v >= 0.005 else "" for v in per_stage), f"{sum(per_stage):.2f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=None, help="timed trials (default 5; --quick: 2)")
    ap.add_argument("--quick", action="store_true", help="2 trials, imports timed once")
    ap.add_argument("--no-profile", action="store_true", help="skip the extra cProfile'd trial")
    ap.add_argument("--baseline-epochs", type=int, default=3)
    args = ap.parse_args(argv)
    n_trials = args.trials or (2 if args.quick else 5)
    print(machine_header("pruneflow benchmark: wall time of the stages of a rapid trial", argv), flush=True)

    # The same imports that the start-up measurement times, so "fresh process" = start-up + cold trial.
    t0 = time.perf_counter()
    import openvino  # noqa: F401
    import torch

    import pruneflow.stages  # noqa: F401
    from pruneflow.bench import BenchmarkOptions
    from pruneflow.spec import parse_spec
    in_process_import = time.perf_counter() - t0

    baseline = ensure_baseline(args.baseline_epochs)
    root = OUT / "trial_stages"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    bo = BenchmarkOptions()
    print(f"trial:    resnet20, digits 32x32, layer1/2/3 .*.conv1 at 0.5, criterion l1, 0 epochs, baseline {baseline}")
    print(f"          benchmark stage: openvino CPU {bo.precision}, threads {bo.threads}, hint {bo.hint}, "
          f"warmup {bo.warmup}, {bo.rounds} rounds x {bo.iterations} iterations; torch threads {torch.get_num_threads()}")
    print(f"trials:   {n_trials} timed in one process (trial 1 cold){'' if args.no_profile else ' + 1 under cProfile'}\n",
          flush=True)

    runs = []
    for i in range(n_trials):
        spec = parse_spec(spec_dict(baseline, root, f"stages-{i + 1}"))
        times, _ = run_stages(spec)
        runs.append(times)
        print(f"trial {i + 1}/{n_trials}: " + ", ".join(f"{k} {v:.2f}" for k, v in times.items())
              + f" s  (load {load_avg()})", flush=True)

    cold = runs[0]
    warm = runs[1:] or runs
    headers = ["stage", "trial 1 (cold)", f"median ({len(warm)} warm)", "min", "max", "share of median"]
    med_total = statistics.median(r["total"] for r in warm)
    rows = []
    for name in (*STAGE_NAMES, "total"):
        vals = [r[name] for r in warm]
        med = statistics.median(vals)
        rows.append([name, f"{cold[name]:.2f}", f"{med:.2f}", f"{min(vals):.2f}", f"{max(vals):.2f}",
                     f"{100 * med / med_total:.0f}%"])
    print("\n## Stage wall time (seconds)\n")
    print(table(headers, rows))

    repeats = 1 if args.quick else 3
    imports = import_cost(repeats)
    print(f"\n## Start-up + import cost of a fresh process (median of {repeats}, seconds)\n")
    print(table(["subprocess", "seconds"], [[label, f"{s:.2f}"] for label, s in imports]))
    startup = imports[-1][1]
    print(f"(the same imports took {in_process_import:.2f} s inside this process before the trials)")

    fresh = startup + cold["total"]
    print("\n## Throughput\n")
    tp_rows = [
        ["warm, many trials in one process", f"{med_total:.1f}", f"{3600 / med_total:.0f}",
         f"{RESEARCH_S[0] / med_total:.1f}-{RESEARCH_S[1] / med_total:.1f}x",
         "yes" if med_total < TARGET_S else "no"],
        ["one fresh process per trial (start-up + cold trial)", f"{fresh:.1f}", f"{3600 / fresh:.0f}",
         f"{RESEARCH_S[0] / fresh:.1f}-{RESEARCH_S[1] / fresh:.1f}x", "yes" if fresh < TARGET_S else "no"],
        ["research pipeline (reference)", f"{RESEARCH_S[0]:.0f}-{RESEARCH_S[1]:.0f}", "~90", "1x", "no"],
    ]
    print(table(["mode", "s/trial", "trials/hour", "vs research", f"< {TARGET_S:.0f} s target"], tp_rows))
    print(f"(one process per stage, as separate Airflow tasks would run, adds up to ~{len(STAGE_NAMES)} x "
          f"{startup:.1f} s of start-up and the cold-path costs of each stage)")

    if not args.no_profile:
        spec = parse_spec(spec_dict(baseline, root, "stages-profiled"))
        ptimes, profiles = run_stages(spec, profile=True)
        slow = max(STAGE_NAMES, key=lambda s: ptimes[s])
        print("\n## Where the time goes (one extra warm trial under cProfile; profiling inflates Python-heavy code)\n")
        print("profiled stage seconds: " + ", ".join(f"{s} {ptimes[s]:.2f}" for s in STAGE_NAMES)
              + f"; total {ptimes['total']:.2f}")
        print("\ninclusive seconds of library functions per stage (rows overlap; calls = over the whole trial):\n")
        print(table(["function", "calls", *STAGE_NAMES, "trial"], hotspot_matrix(profiles)))
        for name in sorted(STAGE_NAMES, key=lambda s: -ptimes[s])[:3]:
            print(f"\ntop cumulative functions of `{name}` ({ptimes[name]:.2f} s profiled"
                  f"{', the slowest stage' if name == slow else ''}):\n")
            print(table(["function", "calls", "tottime", "cumtime"],
                        [[f, str(nc), f"{tt:.3f}", f"{ct:.3f}"] for f, nc, tt, ct in top_cumulative(profiles[name], 10)]))
    print(f"\nload avg: {load_avg()} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
