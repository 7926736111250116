"""Does a code change slow a rapid trial? Old and new code side by side, in one run, interleaved.

A rapid trial as in trial_stages.py (ResNet-20 on digits 32x32, layer1..3 `conv1` at 0.5, OpenVINO CPU f32,
torch on 1 thread). Each arm runs in a fresh subprocess per round (imports from its own checkout via
PYTHONPATH; the same installed packages), warms up with one trial and then times `--trials` more; the
arms take turns round by round, so load on this shared machine hits them alike. Arms:

- `base`: the code at `--base` (a git revision, checked out as a worktree under out/bench/);
- `head, no recal`: this checkout with BatchNorm recalibration off (what the base trial did);
- `head`: this checkout with its defaults (recalibration on: it re-estimates BatchNorm statistics twice).

    .venv/bin/python benchmarks/rapid_trial_ab.py --base d82f514 [--rounds 4] [--trials 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT, REPO, ensure_baseline, load_avg, machine_header, table  # noqa: E402

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from pruneflow.spec import parse_spec
from pruneflow.stages import run_trial
spec, n, tag = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
times = []
for i in range(n + 1):
    s = parse_spec({**spec, "trial_id": f"ab-{tag}-{i}"})
    t = time.perf_counter()
    run_trial(s)
    times.append(time.perf_counter() - t)
print(json.dumps(times[1:]))
"""


def spec_for(baseline: Path, root: Path, recal: bool | None) -> dict:
    spec = {"model": {"name": "resnet20"}, "dataset": {"name": "digits", "image_size": 32},
            "baseline": {"checkpoint": str(baseline)},
            "pruning": {"groups": [{"name": f"layer{i}", "patterns": [f"layer{i}.*.conv1"], "sparsity": 0.5}
                                   for i in (1, 2, 3)]},
            "artifacts": str(root / "trials"), "db": f"sqlite:///{root / 'results.db'}"}
    if recal is False:
        spec["pruning"]["bn_recalibration"] = {"samples": 0}
    return spec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True, help="git revision of the old code")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--trials", type=int, default=3, help="timed trials per arm and round (after one warm-up)")
    args = ap.parse_args()
    baseline = ensure_baseline(epochs=3)
    rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = OUT / f"ab-{rev}"
    if not tree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=REPO, check=True, capture_output=True)
    arms = [("base", tree, None), ("head, no recal", REPO, False), ("head", REPO, None)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in arms}
    load_before = load_avg()
    t0 = time.perf_counter()
    for rnd in range(args.rounds):
        order = arms[rnd % len(arms):] + arms[: rnd % len(arms)]  # rotate who goes first
        for name, code, recal in order:
            root = OUT / "ab-runs" / name.replace(",", "").replace(" ", "-") / str(rnd)
            spec = spec_for(baseline, root, recal)
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec), str(args.trials), str(rnd)],
                                 env={"PYTHONPATH": str(code), "PATH": "/usr/bin:/bin", "HOME": str(OUT), "OMP_NUM_THREADS": "1"},
                                 capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                raise RuntimeError(f"{name}: {out.stderr[-2000:]}")
            times[name] += json.loads(out.stdout.strip().splitlines()[-1])
            print(f"round {rnd + 1}/{args.rounds} {name}: {statistics.median(times[name]):.2f} s median so far",
                  file=sys.stderr, flush=True)
    base = statistics.median(times["base"])
    rows = [[name, len(ts), f"{statistics.median(ts):.2f}", f"{min(ts):.2f}", f"{max(ts):.2f}",
             f"{statistics.median(ts) / base:.2f}x"] for name, ts in times.items()]
    print(machine_header("rapid_trial_ab — does a change slow a rapid trial?"))
    print(f"base {rev} against this checkout; {args.rounds} interleaved rounds x {args.trials} warm trials per arm; "
          f"load {load_before} -> {load_avg()}; {time.perf_counter() - t0:.0f} s\n")
    print(table(["arm", "trials", "median s", "min s", "max s", "vs base"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
