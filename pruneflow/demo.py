"""`make demo`: the main job on the embedded default, end to end, in one table.

Trains a ResNet-20 baseline on digits (32x32), runs a dense trial and light/medium/heavy rapid
trials plus a fine-tuned one, then measures every exported model again with their rounds
interleaved in one run, so the speed-ups over the dense model are ratios measured side by side.
"""

from __future__ import annotations

import argparse
import json
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
    args = ap.parse_args(argv)
    out = Path(args.out)
    progress = _Progress()
    t0 = time.perf_counter()

    from pruneflow.baseline import train_baseline
    from pruneflow.bench import BenchmarkOptions, compare
    from pruneflow.data import DatasetSpec
    from pruneflow.spec import parse_spec
    from pruneflow.stages import run_trial

    base_dir = out / "baseline"
    baseline = base_dir / "baseline.pt"
    meta = base_dir / "baseline.json"
    if baseline.is_file() and meta.is_file() and json.loads(meta.read_text()).get("epochs") == args.baseline_epochs:
        progress(f"baseline: reusing {baseline}")
    else:
        progress(f"baseline: training resnet20 on digits 32x32 for {args.baseline_epochs} epochs")
        m = train_baseline("resnet20", DatasetSpec(name="digits", image_size=32), args.baseline_epochs, base_dir,
                           progress=progress)
        progress(f"baseline: val Top-1 {m['val_top1']:.2f}%, test Top-1 {m['test_top1']:.2f}%")

    rows = []
    for name, sparsities, epochs in TRIALS:
        progress(f"--- trial {name}: sparsities {dict(zip(GROUPS, sparsities, strict=True))}, {epochs} epoch(s)")
        spec = parse_spec(trial_spec(out, name, sparsities, epochs, baseline))
        rows.append(run_trial(spec, progress))

    progress(f"comparing {len(rows)} exported models, rounds interleaved in one run")
    opts = BenchmarkOptions(rounds=args.compare_rounds, iterations=200, threads=1, warmup=50)
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
          f"{args.compare_rounds} rounds; speed-up = paired ratio over the dense model.")
    print(f"results DB: {out / 'pruneflow.db'}   artifacts: {out / 'trials'}   "
          f"total {time.perf_counter() - t0:.0f} s")
    (out / "demo.json").write_text(json.dumps({"rows": rows, "comparison": cmp}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
