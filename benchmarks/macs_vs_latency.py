"""Do MACs predict latency? Thinned ResNet-20/56 configurations measured side by side.

For each model (untrained weights: latency does not depend on their values), every configuration is
planned and thinned (l1 criterion on the inner convolution `layerN.*.conv1` of every residual block),
exported to ONNX and OpenVINO IR in a temporary folder and its MACs counted. Then all configurations
of one model are benchmarked together with pruneflow.bench.compare() — rounds interleaved in one run,
the dense model first — so every speed-up is a ratio measured side by side (paired per round).

Configurations: uniform sparsity 0/0.25/0.4/0.5/0.6/0.75 over layer1-3, and one stage alone at 0.75,
each with round_to none / 8 / 16 (round_to keeps a multiple of that many channels, rounding the kept
count up, so it never removes more than asked).

    .venv/bin/python benchmarks/macs_vs_latency.py [--quick] [--models resnet20,resnet56]

Never run by CI; no assertions on timings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_avg, machine_header, table  # noqa: E402

STAGES = ("layer1", "layer2", "layer3")
UNIFORM = (0.25, 0.4, 0.5, 0.6, 0.75)
ALONE = 0.75
ROUND_TO = (None, 8, 16)
INPUT = [1, 1, 32, 32]


def configurations() -> list[tuple[str, dict[str, float], int | None]]:
    """(name, {stage: sparsity}, round_to); the dense model first (compare() divides by it)."""
    out: list[tuple[str, dict[str, float], int | None]] = [("dense", {}, None)]
    shapes = [(f"uniform {s:g}", dict.fromkeys(STAGES, s)) for s in UNIFORM]
    shapes += [(f"{st} only {ALONE:g}", {st: ALONE}) for st in STAGES]
    for name, sp in shapes:
        for r in ROUND_TO:
            out.append((name, sp, r))
    return out


def thin_variant(model_name: str, sparsities: dict[str, float], round_to: int | None):
    """Plan + thin one configuration; returns the network, its facts, and its shape key (all conv widths)."""
    import torch

    from pruneflow.models import build_model
    from pruneflow.prune import GroupRequest, count_params_and_macs, make_plan, thin

    torch.manual_seed(0)
    model = build_model(model_name, 1, 10).eval()
    if sparsities:
        reqs = [GroupRequest(st, [f"{st}.*.conv1"], s, "l1") for st, s in sparsities.items()]
        plan = make_plan(model, INPUT, reqs, round_to=round_to)
        net, _ = thin(model, plan)
    else:
        net = model
    params, macs = count_params_and_macs(net, INPUT)
    kept = []
    for st in STAGES:  # the inner width of each stage's blocks ("16" or, if blocks differ, "12-16")
        widths = sorted({m.conv1.out_channels for m in getattr(net, st)})
        kept.append(str(widths[0]) if len(widths) == 1 else f"{widths[0]}-{widths[-1]}")
    key = tuple(m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    return net, {"params": params, "macs": macs, "kept": "/".join(kept)}, key


def run_model(model_name: str, args, progress) -> tuple[str, list[str]]:
    from pruneflow.bench import BenchmarkOptions, compare
    from pruneflow.export import export_onnx, export_openvino

    configs = configurations()
    with tempfile.TemporaryDirectory(prefix=f"pf-macs-{model_name}-") as tmp:
        t0 = time.perf_counter()
        rows: list[dict] = []
        shapes: dict[tuple, int] = {}  # shape key -> index of the unique model (configs can coincide)
        paths: list[Path] = []
        labels: list[str] = []
        for name, sp, r in configs:
            net, info, key = thin_variant(model_name, sp, r)
            if key not in shapes:  # export each distinct architecture once: latency depends on shapes only
                shapes[key] = len(paths)
                tag = f"m{len(paths):02d}"
                onnx = export_onnx(net, INPUT, Path(tmp) / f"{tag}.onnx")
                paths.append(export_openvino(onnx, Path(tmp) / f"{tag}.xml", INPUT))
                labels.append(f"{tag} {info['kept']}")
            rows.append({"name": name, "round_to": r, "model": shapes[key], **info})
        # A/A control: the dense model a second time; its "speed-up" shows the noise floor of this run.
        paths.append(paths[0])
        labels.append("dense copy")
        rows.append({**rows[0], "name": "dense (A/A copy)", "model": len(paths) - 1})
        prep_s = time.perf_counter() - t0
        n = len(paths)
        # rounds = a multiple of the number of models: the start rotates by one model per round, so every model
        # runs equally often at every position within a round (no position bias from drift inside a round);
        # short rounds keep the models of one round close in time, which is what the paired ratio relies on.
        opts = BenchmarkOptions(
            backend="openvino",
            device="CPU",
            precision="f32",
            threads=1,
            hint="latency",
            warmup=args.warmup,
            rounds=args.rounds or args.round_factor * n,
            iterations=args.iterations,
        )
        progress(
            f"{model_name}: {len(configs)} configurations -> {n - 1} distinct models (+1 A/A copy), planned, "
            f"thinned and exported in {prep_s:.0f} s; compare() {opts.rounds} rounds x {opts.iterations} "
            f"(load {load_avg()})"
        )
        t0 = time.perf_counter()
        cmp = compare(paths, opts, labels=labels)
        cmp_s = time.perf_counter() - t0
        progress(f"{model_name}: compare() took {cmp_s:.0f} s (load {load_avg()})")

    models = cmp["models"]
    dense = rows[0]
    for row in rows:
        m = models[row["model"]]
        row["median_ms"] = m["latency_ms"]["median"]
        row["round_medians"] = m["round_medians_ms"]
        row["cv"] = m["round_median_cv"]
        row["speedup"] = cmp["ratios"][m["label"]]["speedup_paired"]
        per_round = [a / b for a, b in zip(models[0]["round_medians_ms"], row["round_medians"], strict=True)]
        q1, _q2, q3 = statistics.quantiles(per_round, n=4)
        row["ratio_spread"] = (q3 - q1) / 2 / statistics.median(per_round)
        row["speedup_min"] = models[0]["latency_ms"]["min"] / m["latency_ms"]["min"]
        row["mac_ratio"] = dense["macs"] / row["macs"]
        row["eff"] = row["speedup"] / row["mac_ratio"]
    first = models[0]
    lines = [
        f"## {model_name}: {len(rows) - 1} configurations ({n - 1} distinct models + A/A copy of dense), "
        "one interleaved compare() run",
        "",
        f"settings: openvino CPU {opts.precision}, threads {opts.threads}, hint {opts.hint}, warmup {opts.warmup}, "
        f"{opts.rounds} rounds x {opts.iterations} iterations per model, start rotated one model per round",
        f"load avg: {first['load_avg_before']} before, {first['load_avg_after']} after compare(); "
        f"prep {prep_s:.0f} s, compare {cmp_s:.0f} s",
        "",
    ]
    headers = [
        "config",
        "round_to",
        "kept l1/l2/l3",
        "MMACs",
        "MAC ratio",
        "params",
        "median ms",
        "speed-up",
        "CV %",
        "ratio IQR/2 %",
        "speed-up (min)",
        "speed-up / MAC ratio",
        "model",
    ]
    body = []
    for row in rows:
        body.append(
            [
                row["name"],
                str(row["round_to"] or "none"),
                row["kept"],
                f"{row['macs'] / 1e6:.2f}",
                f"{row['mac_ratio']:.2f}",
                f"{row['params']:,}",
                f"{row['median_ms']:.3f}",
                f"{row['speedup']:.2f}x",
                f"{100 * row['cv']:.1f}" + ("!" if row["cv"] > 0.05 else ""),
                "-" if row is dense else f"{100 * row['ratio_spread']:.1f}",
                f"{row['speedup_min']:.2f}x",
                f"{row['eff']:.2f}",
                f"m{row['model']:02d}",
            ]
        )
    lines.append(table(headers, body, align_left=3))
    lines.append("")
    lines.append(
        "speed-up = median over rounds of dense round median / config round median (paired); "
        "MAC ratio = dense MACs / config MACs;"
    )
    lines.append(
        "speed-up / MAC ratio < 1: the MAC count promises more than the latency delivers. "
        "CV % = CV of the model's per-round medians (! = above 5%);"
    )
    lines.append(
        "ratio IQR/2 % = half the interquartile range of the per-round ratios dense/config, relative to "
        "their median (robust spread of the paired speed-up);"
    )
    lines.append(
        "speed-up (min) = dense min latency / config min latency over all calls (a contention-robust "
        "cross-check: the fastest call of each model is the least disturbed one)."
    )
    lines.append(
        "model: configurations with identical layer widths share one exported model (mNN), "
        "so their numbers are identical by construction."
    )

    # round_to 8/16 against none, paired round by round (same configuration, both in the same rounds).
    lines += ["", f"### {model_name}: round_to 8/16 against none (paired over the same rounds)", ""]
    rt_rows = []
    notes = []
    base = {r["name"]: r for r in rows if r["round_to"] is None}
    for row in rows:
        if row["round_to"] is None:
            continue
        ref = base[row["name"]]
        mac_rel = row["macs"] / ref["macs"]
        if row["model"] == ref["model"]:
            rt_rows.append(
                [
                    row["name"],
                    str(row["round_to"]),
                    f"{ref['kept']} -> {row['kept']}",
                    f"{mac_rel:.3f}",
                    "-",
                    "same model",
                ]
            )
            continue
        ratio = statistics.median(
            a / b for a, b in zip(ref["round_medians"], row["round_medians"], strict=True)
        )
        verdict = "faster" if ratio > 1.02 else "slower" if ratio < 0.98 else "~equal"
        rt_rows.append(
            [
                row["name"],
                str(row["round_to"]),
                f"{ref['kept']} -> {row['kept']}",
                f"{mac_rel:.3f}",
                f"{ratio:.3f}",
                verdict,
            ]
        )
        if ratio > 1.02 and mac_rel >= 0.98:
            notes.append(
                f"{row['name']} round_to {row['round_to']}: {ratio:.2f}x faster than round_to none "
                f"with {mac_rel:.2f}x its MACs (kept {ref['kept']} -> {row['kept']})"
            )
    lines.append(
        table(
            [
                "config",
                "round_to",
                "kept (none -> rounded)",
                "MACs rounded/none",
                "speed-up over none",
                "verdict",
            ],
            rt_rows,
            align_left=3,
        )
    )
    lines.append("")
    aa = rows[-1]
    lines.append(
        "speed-up over none = median over rounds of (none round median / rounded round median); "
        f"'faster'/'slower' = beyond +-2%. A/A noise floor of this run: dense copy {aa['speedup']:.3f}x."
    )
    if notes:
        lines += ["", "SIMD-friendly widths faster at similar or higher MACs:"] + [f"- {n}" for n in notes]
    else:
        lines += [
            "",
            "no configuration where round_to 8/16 was >2% faster than none at similar or higher MACs",
        ]

    # Distinct models with similar MACs (within 6%): does the one with SIMD-friendly widths run faster?
    uniq: dict[int, dict] = {}
    for row in rows[:-1]:
        uniq.setdefault(row["model"], row)
    pairs = []
    items = sorted(uniq.values(), key=lambda r: r["macs"])
    for i, a in enumerate(items):
        for b in items[i + 1 :]:
            if b["macs"] / a["macs"] > 1.06:
                break
            ratio = statistics.median(
                x / y for x, y in zip(b["round_medians"], a["round_medians"], strict=True)
            )
            pairs.append(
                [
                    f"m{a['model']:02d} {a['kept']}",
                    f"m{b['model']:02d} {b['kept']}",
                    f"{b['macs'] / a['macs']:.3f}",
                    f"{ratio:.3f}",
                    "B faster despite more MACs"
                    if ratio < 0.98
                    else "A faster"
                    if ratio > 1.02
                    else "~equal",
                ]
            )
    lines += ["", f"### {model_name}: distinct models with similar MACs (B within 6% above A), paired", ""]
    if pairs:
        lines.append(table(["A (fewer MACs)", "B", "MACs B/A", "latency B/A", "result"], pairs, align_left=2))
        lines.append("")
        lines.append(
            "latency B/A = median over rounds of B's round median / A's (+-2% = ~equal): at equal MACs, "
            "where the channels are removed and how the widths fit the vector units decide."
        )
    else:
        lines.append("no two distinct models within 6% of each other's MACs")
    return "\n".join(lines), notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 x models rounds of 20 iterations (a smoke run)")
    ap.add_argument("--models", default="resnet20,resnet56")
    ap.add_argument(
        "--rounds", type=int, default=None, help="default: 2 x the number of models compared (--quick 1 x)"
    )
    ap.add_argument(
        "--iterations", type=int, default=None, help="timed calls per model per round (default 50)"
    )
    ap.add_argument("--warmup", type=int, default=50)
    args = ap.parse_args(argv)
    args.iterations = args.iterations or (20 if args.quick else 50)
    args.round_factor = 1 if args.quick else 2
    print(
        machine_header("pruneflow benchmark: MACs against measured latency of thinned CIFAR ResNets", argv),
        flush=True,
    )

    import torch

    # One torch thread while planning/exporting: on a small shared machine the default (all cores) makes
    # batch-1 forwards very slow as soon as another process is busy. Does not affect the OpenVINO timing.
    torch.set_num_threads(1)
    print(
        f"configs:  {len(configurations())} per model: dense, uniform {', '.join(f'{s:g}' for s in UNIFORM)} "
        f"and each of {', '.join(STAGES)} alone at {ALONE:g} (inner conv `layerN.*.conv1`, l1), "
        f"each with round_to none/8/16; input {INPUT}\n",
        flush=True,
    )

    t0 = time.perf_counter()
    outputs = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        text, _notes = run_model(name, args, lambda s: print(s, flush=True))
        outputs.append(text)
    for text in outputs:
        print("\n" + text)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load avg: {load_avg()} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
