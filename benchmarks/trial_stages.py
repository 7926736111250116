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

# Library functions the time goes to: (label, module, attribute path). Each is wrapped with a timer while
# the trials run (the stages import them at call time, so the wrappers are what they call). Inclusive
# times: rows overlap (load_checkpoint of a thinned model includes a build_graph, and so on).
HOTSPOTS = [
    ("model forward (ResNetCifar.forward)", "pruneflow.models.resnet", "ResNetCifar.forward"),
    ("train.evaluate (val/test, batch 512)", "pruneflow.train", "evaluate"),
    ("data.load_dataset (digits, resize)", "pruneflow.data", "load_dataset"),
    ("checkpoint.load_checkpoint", "pruneflow.checkpoint", "load_checkpoint"),
    ("checkpoint.save_checkpoint", "pruneflow.checkpoint", "save_checkpoint"),
    ("prune.build_graph (Torch-Pruning trace)", "pruneflow.prune", "build_graph"),
    ("prune.make_plan", "pruneflow.prune", "make_plan"),
    ("prune.masked_copy", "pruneflow.prune", "masked_copy"),
    ("prune.thin", "pruneflow.prune", "thin"),
    ("prune.count_params_and_macs", "pruneflow.prune", "count_params_and_macs"),
    ("thin check: output_check.compare_outputs", "pruneflow.bench.output_check", "compare_outputs"),
    ("export.export_onnx (torch.onnx)", "pruneflow.export", "export_onnx"),
    ("export.export_openvino (convert+save)", "pruneflow.export", "export_openvino"),
    ("export.check_parity (8 imgs, batch 1)", "pruneflow.export", "check_parity"),
    ("  parity: onnxruntime", "pruneflow.export", "_run_onnxruntime"),
    ("  parity: openvino compile+runs", "pruneflow.export", "_run_openvino"),
    ("export.save_reference", "pruneflow.export", "save_reference"),
    ("bench.load_model (OV read+compile)", "pruneflow.bench.runner", "load_model"),
    ("bench timed_calls (warm-up+rounds)", "pruneflow.bench.backends", "OpenVINOModel.timed_calls"),
    ("bench gc.collect before timing", "pruneflow.bench.runner", "gc.collect"),
    ("store.ResultsStore open", "pruneflow.store", "ResultsStore.__init__"),
    ("stages.versions (importlib.metadata)", "pruneflow.stages", "versions"),
]


class StageTimers:
    """Wraps the HOTSPOTS functions with timers; seconds and calls are kept per trial and stage."""

    def __init__(self) -> None:
        self.stage = "-"
        self.current: dict[tuple[str, str], list[float]] = {}
        self.trials: list[dict[tuple[str, str], list[float]]] = []
        self._undo: list[tuple[object, str, object]] = []

    def _wrap(self, label: str, fn):
        import functools

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                cell = self.current.setdefault((label, self.stage), [0.0, 0])
                cell[0] += time.perf_counter() - t0
                cell[1] += 1

        return timed

    def install(self) -> None:
        import importlib
        import types

        for label, module, attr in HOTSPOTS:
            owner = importlib.import_module(module)
            *path, name = attr.split(".")
            if path == ["gc"]:  # the runner's `gc` module: give it a proxy whose collect is timed
                import gc

                proxy = types.SimpleNamespace(
                    collect=self._wrap(label, gc.collect),
                    isenabled=gc.isenabled,
                    enable=gc.enable,
                    disable=gc.disable,
                )
                self._undo.append((owner, "gc", owner.gc))
                owner.gc = proxy
                continue
            for part in path:
                owner = getattr(owner, part)
            original = getattr(owner, name)
            self._undo.append((owner, name, original))
            setattr(owner, name, self._wrap(label, original))

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()

    def end_trial(self) -> None:
        self.trials.append(self.current)
        self.current = {}

    def matrix(self, trial_indices: list[int]) -> list[list[str]]:
        """Median over the given trials of the seconds per (function, stage); calls per trial."""
        rows = []
        for label, _module, _attr in HOTSPOTS:
            per_stage = []
            for stage in STAGE_NAMES:
                per_stage.append(
                    statistics.median(self.trials[i].get((label, stage), [0.0, 0])[0] for i in trial_indices)
                )
            calls = statistics.median(
                sum(c for (lab, _), (_, c) in self.trials[i].items() if lab == label) for i in trial_indices
            )
            if not calls:
                continue
            rows.append(
                [
                    label,
                    f"{calls:g}",
                    *(f"{v:.2f}" if v >= 0.005 else "" for v in per_stage),
                    f"{sum(per_stage):.2f}",
                ]
            )
        return rows


# Wrappers skipped in the "top cumulative functions" list: they only forward to what is below them.
_WRAPPERS = (
    "_wrapped_call_impl",
    "_call_impl",
    "decorate_context",
    "inner",
    "__enter__",
    "__exit__",
    "wrapper",
)


def spec_dict(baseline: Path, root: Path, trial_id: str) -> dict:
    return {
        "name": "bench-stages",
        "trial_id": trial_id,
        "model": {"name": "resnet20"},
        "dataset": {"name": "digits", "image_size": 32},
        "baseline": {"checkpoint": str(baseline)},
        "pruning": {
            "criterion": "l1",
            "groups": [
                {"name": f"layer{i}", "patterns": [f"layer{i}.*.conv1"], "sparsity": 0.5} for i in (1, 2, 3)
            ],
        },
        "finetune": {"epochs": 0},
        "artifacts": str(root / "trials"),
        "db": f"sqlite:///{root / 'results.db'}",
    }


def run_stages(
    spec, profile: bool = False, timers: StageTimers | None = None
) -> tuple[dict[str, float], dict[str, pstats.Stats]]:
    from pruneflow import stages

    times: dict[str, float] = {}
    profiles: dict[str, pstats.Stats] = {}
    for name in STAGE_NAMES:
        fn = getattr(stages, name)
        prof = cProfile.Profile() if profile else None
        if timers is not None:
            timers.stage = name
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
    if timers is not None:
        timers.end_trial()
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


def _cell(vals: list[float]) -> str:
    return f"{statistics.median(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--trials",
        type=int,
        default=None,
        help="timed warm trials per torch-threads setting (default 5; --quick: 2)",
    )
    ap.add_argument(
        "--torch-threads",
        default="default,1",
        help="comma-separated torch intra-op thread settings, alternated trial by trial (default: default,1)",
    )
    ap.add_argument("--quick", action="store_true", help="2 trials per setting, imports timed once")
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

    default_threads = torch.get_num_threads()
    settings = []
    for tok in args.torch_threads.split(","):
        tok = tok.strip()
        n = default_threads if tok == "default" else int(tok)
        settings.append((f"torch threads {n}" + (" (default)" if tok == "default" else ""), n))

    baseline = ensure_baseline(args.baseline_epochs)
    root = OUT / "trial_stages"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    bo = BenchmarkOptions()
    print(
        f"trial:    resnet20, digits 32x32, layer1/2/3 .*.conv1 at 0.5, criterion l1, 0 epochs, baseline {baseline}"
    )
    print(
        f"          benchmark stage: openvino CPU {bo.precision}, threads {bo.threads}, hint {bo.hint}, "
        f"warmup {bo.warmup}, {bo.rounds} rounds x {bo.iterations} iterations"
    )
    print(
        f"trials:   1 cold + {n_trials} warm per setting in one process, settings alternated trial by trial: "
        f"{', '.join(label for label, _ in settings)}{'' if args.no_profile else '; + 1 under cProfile'}\n",
        flush=True,
    )

    timers = StageTimers()
    trial_setting: list[str] = []

    def one(tag: str, threads: int, label: str) -> dict[str, float]:
        torch.set_num_threads(threads)
        spec = parse_spec(spec_dict(baseline, root, f"stages-{tag}"))
        times, _ = run_stages(spec, timers=timers)
        trial_setting.append(label)
        print(
            f"trial {tag} (torch threads {threads}): "
            + ", ".join(f"{k} {v:.2f}" for k, v in times.items())
            + f" s  (load {load_avg()})",
            flush=True,
        )
        return times

    timers.install()
    cold = one("cold", settings[0][1], "cold")
    warm: dict[str, list[dict[str, float]]] = {label: [] for label, _ in settings}
    for i in range(n_trials):
        for label, threads in settings:
            warm[label].append(one(f"{i + 1}-t{threads}", threads, label))
    timers.uninstall()
    torch.set_num_threads(default_threads)

    first = settings[0][0]
    # share of the sum of the per-stage medians (medians of stages do not add up to the median total)
    med_first = sum(statistics.median(r[name] for r in warm[first]) for name in STAGE_NAMES)
    headers = [
        "stage",
        f"cold ({settings[0][1]} thr)",
        *(f"{label}: median (min-max)" for label, _ in settings),
        f"share ({settings[0][1]} thr, of stage medians)",
    ]
    rows = []
    for name in (*STAGE_NAMES, "total"):
        rows.append(
            [
                name,
                f"{cold[name]:.2f}",
                *(_cell([r[name] for r in warm[label]]) for label, _ in settings),
                ""
                if name == "total"
                else f"{100 * statistics.median(r[name] for r in warm[first]) / med_first:.0f}%",
            ]
        )
    print(f"\n## Stage wall time (seconds; warm = {n_trials} trials per setting, interleaved)\n")
    print(table(headers, rows))

    for label, _ in settings:
        idx = [i for i, lab in enumerate(trial_setting) if lab == label]
        print(
            f"\n## Where the time goes, {label}: inclusive seconds of library functions per stage\n"
            f"(median over the {len(idx)} warm trials, timer-wrapped; rows overlap; calls = per trial)\n"
        )
        print(table(["function", "calls", *STAGE_NAMES, "trial"], timers.matrix(idx)))

    repeats = 1 if args.quick else 3
    imports = import_cost(repeats)
    print(f"\n## Start-up + import cost of a fresh process (median of {repeats}, seconds)\n")
    print(table(["subprocess", "seconds"], [[label, f"{s:.2f}"] for label, s in imports]))
    startup = imports[-1][1]
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, pruneflow.stages, pruneflow.spec; "
            "print(sorted(m for m in ('torch', 'openvino', 'onnxruntime') if m in sys.modules))",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    ).stdout.strip()
    print(
        f"(the same imports took {in_process_import:.2f} s inside this process before the trials; "
        f"heavy modules loaded by `import pruneflow.stages, pruneflow.spec` alone: {probe})"
    )

    def tp_row(mode: str, s: float) -> list[str]:
        return [
            mode,
            f"{s:.1f}",
            f"{3600 / s:.0f}",
            f"{RESEARCH_S[0] / s:.1f}-{RESEARCH_S[1] / s:.1f}x",
            "yes" if s < TARGET_S else "no",
        ]

    print("\n## Throughput (research pipeline: 24-55 s per rapid trial, ~90/hour; target < 10 s)\n")
    tp_rows = [
        tp_row(f"warm, in one process, {label}", statistics.median(r["total"] for r in warm[label]))
        for label, _ in settings
    ]
    tp_rows.append(
        tp_row(
            f"fresh process per trial (start-up + cold trial, {settings[0][1]} thr)", startup + cold["total"]
        )
    )
    tp_rows.append(
        ["research pipeline (reference)", f"{RESEARCH_S[0]:.0f}-{RESEARCH_S[1]:.0f}", "~90", "1x", "no"]
    )
    print(table(["mode", "s/trial", "trials/hour", "vs research", f"< {TARGET_S:.0f} s"], tp_rows))
    print(
        f"(one process per stage, as separate Airflow tasks would run, adds up to ~{len(STAGE_NAMES)} x "
        f"{startup:.1f} s of start-up plus each stage's cold-path cost)"
    )

    if not args.no_profile:
        for label, threads in settings:
            torch.set_num_threads(threads)
            spec = parse_spec(spec_dict(baseline, root, f"stages-profiled-t{threads}"))
            ptimes, profiles = run_stages(spec, profile=True)
            print(f"\n## cProfile, {label}: one extra warm trial (profiling inflates Python-heavy code)\n")
            print(
                "profiled stage seconds: "
                + ", ".join(f"{s} {ptimes[s]:.2f}" for s in STAGE_NAMES)
                + f"; total {ptimes['total']:.2f}  (load {load_avg()})"
            )
            for name in sorted(STAGE_NAMES, key=lambda s: -ptimes[s])[:2]:
                print(f"\ntop cumulative functions of `{name}` ({ptimes[name]:.2f} s profiled):\n")
                print(
                    table(
                        ["function", "calls", "tottime", "cumtime"],
                        [
                            [f, str(nc), f"{tt:.3f}", f"{ct:.3f}"]
                            for f, nc, tt, ct in top_cumulative(profiles[name], 10)
                        ],
                    )
                )
        torch.set_num_threads(default_threads)
    print(f"\nload avg: {load_avg()} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
