"""latency_model: how well pruneflow's latency model predicts the latency of configurations it has not seen.

For ResNet-20, ResNet-56 and MobileNetV2 (digits 32x32, random weights: latency does not depend on them),
on this CPU (OpenVINO, f32, 1 thread): the latency table of a sweep space is built
(`pruneflow.latency_model.build_table`, timed); then N random configurations of the space are pruned,
thinned, exported and measured in ONE interleaved run, and measured again in a second run. The first
`--train` configurations are the "trials already measured" the correction is fitted on; the rest are held
out. Reported per model and method (table: a + b * summed layer latencies; macs: a + b * MACs; each with
the correction the sweep would have after `--train` trials, and with the table's dense calibration only):
the share of held-out configurations whose prediction lies within +-10 % and +-5 % of the measured latency.
"repeat" is the same share for the second measurement against the first: what this machine's noise allows.

Run:  .venv/bin/python benchmarks/latency_model.py [--configs 30] [--train 10] [--write]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT, append_results, machine_header, say, table  # noqa: E402

BENCH = {"rounds": 5, "iterations": 100, "warmup": 20, "threads": 1}


def _range(name: str, patterns: list[str]) -> dict:
    return {"name": name, "patterns": patterns, "low": 0.0, "high": 0.8, "step": 0.05}


MODELS = {
    "resnet20": [_range(f"layer{i}", [f"layer{i}.*.conv1"]) for i in (1, 2, 3)],
    "resnet56": [_range(f"layer{i}", [f"layer{i}.*.conv1"]) for i in (1, 2, 3)],
    # the expand convolutions of each stage of inverted residuals (each its own coupled set)
    "mobilenetv2": [_range(f"stage{k}", [f"features.{i}.conv.0.0" for i in idx]) for k, idx in
                    enumerate([(2, 3), (4, 5, 6), (7, 8, 9, 10), (11, 12, 13), (14, 15, 16)], start=1)],
}


def _share(pred: list[float], meas: list[float], tol: float) -> str:
    return f"{100 * sum(abs(p - m) / m <= tol for p, m in zip(pred, meas, strict=True)) / len(meas):.0f}%"


def _export_configs(model: str, shape: list[int], space: list[dict], configs: list[dict], out: Path) -> list[Path]:
    import torch

    from pruneflow.export import export_onnx, export_openvino
    from pruneflow.models import build_model
    from pruneflow.prune import GroupRequest, make_plan, thin

    paths = []
    for i, c in enumerate(configs):
        torch.manual_seed(0)
        m = build_model(model, shape[1], 10)
        reqs = [GroupRequest(r["name"], r["patterns"], c[r["name"]], "l1") for r in space if c[r["name"]] > 0]
        thinned = thin(m, make_plan(m, shape, reqs))[0] if reqs else m
        paths.append(export_openvino(export_onnx(thinned, shape, out / f"c{i:03d}.onnx"), out / f"c{i:03d}.xml", shape))
    return paths


def run_model(model: str, n: int, train: int, seed: int) -> list[list[object]]:
    from pruneflow.bench import BenchmarkOptions, compare
    from pruneflow.latency_model import LatencyModel, build_table, table_groups
    from pruneflow.sweep import parse_sweep

    out = OUT / "latency_model" / model
    space = MODELS[model]
    sweep = parse_sweep({"study": f"latency-{model}", "space": space, "objective": "latency",
                         "base": {"model": {"name": model}, "benchmark": BENCH}})
    t0 = time.perf_counter()
    tab = build_table(sweep, out / "table", lambda m: None if m.startswith("round") else say(f"{model}: {m}"))
    build_s = time.perf_counter() - t0
    rng = random.Random(seed)
    grids = {g["name"]: g["grid"] for g in table_groups(sweep)}
    configs = [{name: rng.choice(grid) for name, grid in grids.items()} for _ in range(n)]
    say(f"{model}: exporting {n} configurations")
    paths = _export_configs(model, tab["input_shape"], space, configs, out / "configs")
    opts = BenchmarkOptions.model_validate(BENCH)
    runs = []
    for r in range(2):
        say(f"{model}: measuring the {n} configurations, run {r + 1}/2")
        cmp = compare(paths, opts, labels=[p.stem for p in paths])
        runs.append([m["latency_ms"]["median"] for m in cmp["models"]])
    meas, again = runs
    (out / "measured.json").write_text(json.dumps({"configs": configs, "runs": runs}, indent=1))
    held = list(range(train, n))
    rows = []
    for method in ("table", "macs"):
        for fitted in (0, train):
            lm = LatencyModel(tab, [(configs[i], meas[i]) for i in range(fitted)], method)
            pred = [lm.predict(configs[i]) for i in held]
            got = [meas[i] for i in held]
            err = statistics.median(abs(p - m) / m for p, m in zip(pred, got, strict=True))
            rows.append([model, method, f"{lm.correction['kind']} ({fitted} trials)", len(held), _share(pred, got, 0.10),
                         _share(pred, got, 0.05), f"{100 * err:.1f}%", len(tab["entries"]), f"{build_s:.0f} s"])
    rows.append([model, "repeat", "2nd run vs 1st", len(held), _share([again[i] for i in held], [meas[i] for i in held], 0.10),
                 _share([again[i] for i in held], [meas[i] for i in held], 0.05),
                 f"{100 * statistics.median(abs(again[i] - meas[i]) / meas[i] for i in held):.1f}%", "", ""])
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", type=int, default=30)
    ap.add_argument("--train", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--write", action="store_true", help="append the output to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        rows += run_model(model, args.configs, args.train, args.seed)
    text = "\n".join([
        machine_header("latency_model", argv),
        f"benchmark: {BENCH}; configurations {args.configs}, correction fitted on the first {args.train}, "
        "the rest held out", "",
        table(["model", "method", "correction", "held out", "within 10%", "within 5%", "median |error|",
               "table shapes", "table build"], rows, align_left=3)])
    print(text)
    if args.write:
        append_results("latency_model", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
