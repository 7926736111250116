"""Baselines on Fashion-MNIST: ResNet-20, ResNet-56 and MobileNetV2, with test Top-1 beside the published figures.

For each model, the learning rate is chosen by measurement: a short run (``--probe-epochs`` epochs of
``--images-per-epoch`` images, cosine schedule, augmentation on) at each of ``--lrs``; the lr with the
best validation Top-1 trains the baseline for ``--epochs`` epochs. Validation is carved from the 60,000
training images (``--val-fraction``, seed 0); the test split (the 10,000 test images) is evaluated once
at the end and chooses nothing. Cost is the wall time of each run on this machine (2 cores, shared).

Published test accuracy (the data set's README): 2 conv + pooling 91.6%, ResNet-18 94.9%, MobileNet
95.0%, WRN-40-4 96.7%; those are full-data, many-epoch figures.

    .venv/bin/python benchmarks/fashion_baselines.py [--models resnet20,resnet56,mobilenetv2]
        [--image-size 28] [--epochs 10] [--images-per-epoch 20000] [--lrs 0.1,0.05,0.02]

The baselines land in out/bench/fashion_baselines/<model>-fm<size>-e<epochs>/ (reused by later benchmarks);
raw numbers in results.json beside them. Never run by CI; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT, machine_header, say, table  # noqa: E402

OUT_DIR = OUT / "fashion_baselines"
PUBLISHED = "2 conv + pooling 91.6, ResNet-18 94.9, MobileNet 95.0, WRN-40-4 96.7"


def dataset(args):
    from pruneflow.data import DatasetSpec

    return DatasetSpec(name="fashion-mnist", image_size=args.image_size, val_fraction=args.val_fraction,
                       images_per_epoch=args.images_per_epoch,
                       augment={"crop_padding": args.crop_padding, "hflip": args.hflip})


def run(args) -> list[dict]:
    from pruneflow.baseline import train_baseline

    ds = dataset(args)
    rows = []
    for model in args.models.split(","):
        probes = []
        for lr in (float(v) for v in args.lrs.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                say(f"{model}: lr {lr:g}, {args.probe_epochs} epoch(s)")
                m = train_baseline(model, ds, args.probe_epochs, tmp, lr=lr, progress=say)
            probes.append({"lr": lr, "val_top1": m["val_top1"], "seconds": m["train_seconds"]})
        best = max(probes, key=lambda p: p["val_top1"])
        out = OUT_DIR / f"{model}-fm{args.image_size}-e{args.epochs}"
        say(f"{model}: baseline at lr {best['lr']:g}, {args.epochs} epochs -> {out}")
        m = train_baseline(model, ds, args.epochs, out, lr=best["lr"], progress=say)
        rows.append({"model": model, "probes": probes, "lr": best["lr"], "epochs": args.epochs,
                     "val_top1": m["val_top1"], "test_top1": m["test_top1"], "test_loss": m["test_loss"],
                     "params": m["params"], "macs": m["macs"], "train_seconds": m["train_seconds"],
                     "probe_seconds": sum(p["seconds"] for p in probes), "checkpoint": m["checkpoint"],
                     "val_curve": [h["val_top1"] for h in m["history"]]})
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        (OUT_DIR / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return rows


def report(args, rows: list[dict]) -> str:
    lines = [machine_header("Fashion-MNIST baselines"),
             f"data: fashion-mnist {args.image_size}x{args.image_size}, {args.images_per_epoch} training images "
             f"an epoch (of {round(60000 * (1 - args.val_fraction))}), augmentation crop {args.crop_padding} + "
             f"flip {args.hflip}; validation {round(60000 * args.val_fraction)} images; test 10,000",
             f"published test Top-1: {PUBLISHED}", ""]
    probe_rows = [[r["model"], *(f"{p['lr']:g}: {p['val_top1']:.2f}" for p in r["probes"]),
                   f"{r['probe_seconds'] / 60:.1f}"] for r in rows]
    n = max((len(r["probes"]) for r in rows), default=0)
    lines += [f"lr probe ({args.probe_epochs} epoch(s)): validation Top-1", "",
              table(["model", *(f"lr {i + 1}" for i in range(n)), "minutes"], probe_rows), ""]
    lines += [table(["model", "lr", "epochs", "val Top-1", "test Top-1", "params", "MACs", "train min",
                     "val Top-1 by epoch"],
                    [[r["model"], f"{r['lr']:g}", r["epochs"], f"{r['val_top1']:.2f}", f"{r['test_top1']:.2f}",
                      f"{r['params']:,}", f"{r['macs']:,}", f"{r['train_seconds'] / 60:.1f}",
                      " ".join(f"{v:.1f}" for v in r["val_curve"])] for r in rows])]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,resnet56,mobilenetv2")
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--probe-epochs", type=int, default=2)
    ap.add_argument("--images-per-epoch", type=int, default=20000)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--lrs", default="0.1,0.05,0.02")
    ap.add_argument("--crop-padding", type=int, default=2)
    ap.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--report-only", action="store_true", help="print the tables of the saved results.json")
    args = ap.parse_args(argv)
    if args.report_only:
        saved = json.loads((OUT_DIR / "results.json").read_text())
        print(report(argparse.Namespace(**saved["args"]), saved["rows"]))
        return 0
    print(report(args, run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
