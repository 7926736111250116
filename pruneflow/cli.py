"""The `pruneflow` command line. Heavy imports stay inside the commands (`bench` never imports torch)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from pruneflow.constants import DATASETS

DEFAULT_DB = "sqlite:///out/pruneflow.db"


class _Progress:
    """Stage messages on stderr with the elapsed time, so stdout stays clean for --json."""

    def __init__(self, quiet: bool = False):
        self.t0 = time.perf_counter()
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _fail(msg: str, code: int = 2) -> int:
    print(f"pruneflow: error: {msg}", file=sys.stderr)
    return code


def _kv(items: list[str] | None) -> dict:
    """key=value pairs; values are parsed as YAML scalars (numbers, booleans, lists)."""
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def cmd_baseline(args) -> int:
    from pruneflow.baseline import train_baseline
    from pruneflow.data import DatasetSpec

    ds = {"name": args.dataset, "image_size": args.image_size, "images_per_epoch": args.images_per_epoch,
          "augment": {"crop_padding": args.crop_padding, "hflip": args.hflip}}
    if args.data_path:
        ds["path"] = args.data_path
    metrics = train_baseline(args.model, DatasetSpec(**ds), args.epochs, args.out, model_kwargs=_kv(args.model_kwarg),
                             lr=args.lr, batch_size=args.batch_size, seed=args.seed, progress=_Progress())
    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    else:
        print(f"baseline {args.model} on {args.dataset}: val Top-1 {metrics['val_top1']:.2f}%, "
              f"test Top-1 {metrics['test_top1']:.2f}%, {metrics['params']:,} params, {metrics['macs']:,} MACs")
        print(f"checkpoint: {metrics['checkpoint']}")
    return 0


def _trial_table(rows: list[dict]) -> str:
    from pruneflow.table import format_table

    groups = sorted({g for r in rows for g in (r.get("sparsities") or {})})
    out = []
    for r in rows:
        row = dict(r)
        for g in groups:
            s = (r.get("sparsities") or {}).get(g)
            row[f"g:{g}"] = f"{s['achieved']:.2f}" if s else "-"
        out.append(row)
    cols = [("trial_id", "trial"), ("status", "status")] + [(f"g:{g}", g) for g in groups] + [
        ("params", "params"), ("macs", "MACs"), ("top1_masked", "Top-1 pruned"),
        ("top1_recalibrated", "Top-1 recal."), ("top1_final", "Top-1 final"), ("top1_source", "final is"),
        ("latency_median_ms", "median ms"), ("latency_cv", "CV")]
    if any(r.get("latency_predicted_ms") is not None for r in rows):
        cols.append(("latency_predicted_ms", "predicted ms"))
    fmt = {"latency_cv": lambda v: "-" if v is None else f"{100 * v:.1f}%",
           "top1_masked": lambda v: "-" if v is None else f"{v:.2f}",
           "top1_recalibrated": lambda v: "-" if v is None else f"{v:.2f}",
           "top1_final": lambda v: "-" if v is None else f"{v:.2f}",
           "latency_median_ms": lambda v: "-" if v is None else f"{v:.3f}",
           "latency_predicted_ms": lambda v: "-" if v is None else f"{v:.3f}"}
    return format_table(out, cols, fmt)


def cmd_trial(args) -> int:
    from pruneflow.spec import load_spec
    from pruneflow.stages import TrialFailed, run_trial

    spec = load_spec(args.spec)
    overrides = {k: v for k, v in (("db", args.db), ("artifacts", args.artifacts), ("trial_id", args.trial_id)) if v}
    if overrides:
        spec = spec.model_validate({**spec.model_dump(), **overrides})
    try:
        summary = run_trial(spec, _Progress())
    except TrialFailed as exc:
        if args.json:
            print(json.dumps({"status": "failed", "stage": exc.stage, "reason": exc.reason}))
        return _fail(f"trial failed in {exc}", 1)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(_trial_table([summary]))
        if summary.get("reason"):
            print(f"reason: {summary['reason']}")
        print(f"artifacts: {summary['trial_dir']}")
    return 0


def cmd_conf(args) -> int:
    if args.sweep:
        from pruneflow.sweep_conf import sweep_conf_keys as keys
    else:
        from pruneflow.trial_conf import conf_keys as keys
    from pruneflow.trial_conf import markdown_table

    print(markdown_table(keys()))
    return 0


def cmd_inspect(args) -> int:
    from pruneflow.data import DatasetSpec, load_dataset
    from pruneflow.inspect_plan import inspect_plan
    from pruneflow.models import build_model
    from pruneflow.prune import GroupRequest
    from pruneflow.spec import load_spec
    from pruneflow.table import format_table

    groups: list[GroupRequest] = []
    round_to, ignored, kwargs = None, [], _kv(args.model_kwarg)
    ds = DatasetSpec(name=args.dataset, image_size=args.image_size, path=args.data_path)
    model_name = args.model
    if args.spec:
        spec = load_spec(args.spec)
        from pruneflow.stages import group_requests

        groups = group_requests(spec)
        round_to, ignored, ds = spec.pruning.round_to, spec.pruning.ignored_layers, spec.dataset
        model_name = args.model or spec.model.name
        kwargs = {**spec.model.kwargs, **kwargs}
    if args.distiller_schedule:
        from pruneflow.distiller import load_schedule

        sched = load_schedule(args.distiller_schedule)
        for w in sched.warnings:
            print(f"warning: {w}", file=sys.stderr)
        groups += [GroupRequest(g.name, list(g.layers), g.sparsity, g.criterion) for g in sched.groups]
    if not model_name:
        return _fail("--model is required (or --spec with a model)")
    data = load_dataset(ds)
    model = build_model(model_name, data.in_channels, data.num_classes, **kwargs)
    report = inspect_plan(model, list(data.input_shape), groups, round_to, ignored)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(format_table(report["layers"], [
        ("layer", "layer"), ("group", "group"), ("coupled_to", "coupled to"), ("target_sparsity", "target"),
        ("out_before", "out"), ("out_after", "out after"), ("in_before", "in"), ("in_after", "in after"),
        ("params_before", "params"), ("params_after", "params after"), ("macs_before", "MACs"),
        ("macs_after", "MACs after")]))
    t = report["total"]
    print(f"\ntotal: params {t['params_before']:,} -> {t['params_after']:,} "
          f"({t['params_after'] / t['params_before']:.3f}x), MACs {t['macs_before']:,} -> {t['macs_after']:,} "
          f"({t['macs_after'] / t['macs_before']:.3f}x)")
    return 0


def cmd_bench(args) -> int:
    from pruneflow.bench import BenchmarkOptions, format_result, measure

    fields = {k: getattr(args, k) for k in ("backend", "device", "precision", "threads", "hint", "warmup",
                                             "rounds", "iterations") if getattr(args, k) is not None}
    opts = BenchmarkOptions(**fields)
    result = measure(args.model, opts, progress=_Progress())
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


def cmd_trials(args) -> int:
    from pruneflow.store import ResultsStore

    store = ResultsStore(args.db)
    rows = store.list_trials(study=args.study, status=args.status)
    store.close()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no trials in {args.db}")
        return 0
    for r in rows:
        r["sparsities"] = {k: v for k, v in (r.get("sparsities_json") or {}).items()}
        r["params"], r["macs"] = r.get("params_after"), r.get("macs_after")
    print(_trial_table(rows))
    return 0


def cmd_sensitivity(args) -> int:
    from pathlib import Path

    from pruneflow.sensitivity import format_profile, load_sensitivity, run_sensitivity, save_profile

    sens = load_sensitivity(args.spec)
    profile = run_sensitivity(sens, _Progress())
    files = save_profile(profile, sens.trial_spec().db, Path(args.out or f"out/sensitivity/{sens.name}"))
    if args.json:
        print(json.dumps({"profile": profile, "files": files}, indent=2))
        return 0
    print(format_profile(profile))
    print(f"profile: {files['json']}  table: {files['table']}  plot: {files['plot']}")
    return 0


def cmd_latency_table(args) -> int:
    from pathlib import Path

    import yaml

    from pruneflow.latency_model import build_table
    from pruneflow.sweep import SweepError, parse_sweep

    path = Path(args.sweep)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    # the table is what latency_model.table will name: the sweep is read without it
    named = data.pop("latency_model", None) if isinstance(data, dict) else None
    target = named.get("table") if isinstance(named, dict) else None
    sweep = parse_sweep(data)
    out = Path(args.out) if args.out else Path(target).parent if target else Path(f"out/latency/{sweep.study}")
    table = build_table(sweep, out, _Progress())
    if args.json:
        print(json.dumps({k: table[k] for k in ("model", "device", "precision", "threads", "dense", "build_s")}
                         | {"shapes": len(table["entries"]), "table": str(out / "table.json")}, indent=2))
        return 0
    print(f"latency table of {table['model']} on {table['backend']}/{table['device']} {table['precision']}, "
          f"{table['threads']} thread(s): {len(table['entries'])} layer shapes over {len(table['groups'])} groups, "
          f"built in {table['build_s']['total']} s")
    print(f"dense model: {table['dense']['measured_ms']:.4f} ms measured, {table['dense']['lut_ms']:.4f} ms summed "
          "from the table (the correction fitted on the sweep's measured trials bridges the two)")
    print(f"table: {out / 'table.json'}  (latency_model: {{table: {out / 'table.json'}}} in the sweep spec)")
    return 0


def cmd_sweep(args) -> int:
    from pruneflow.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.sweep)
    if args.n_trials:
        sweep = sweep.model_copy(update={"n_trials": args.n_trials})
    if sweep.auto is not None:  # the space it chose, to re-run the sweep as it was
        import yaml

        print(f"space: auto chose {len(sweep.space)} group(s) from {sweep.auto.profile}:\n"
              + yaml.safe_dump({"space": [r.model_dump(exclude_none=True) for r in sweep.space]}, sort_keys=False),
              file=sys.stderr)
    summary = run_sweep(sweep, _Progress())
    print(json.dumps(summary, indent=2) if args.json else
          f"study {summary['study']}: {summary['trials']} trials {summary['by_status']}; best {summary['best']}")
    return 0


def cmd_report(args) -> int:
    from pruneflow.report import write_report

    out = args.out or f"out/reports/{args.study}"
    summary = write_report(args.db, args.study, out)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"report: {summary['report']}")
    print(f"trials: {summary['trials']} {summary['by_status']}")
    for b in summary["best"]:
        targets = ", ".join(f"{k} {v:.2f}" for k, v in sorted(b["targets"].items())) or "dense"
        print(f"best: {b['trial_id']}  latency {b['latency_median_ms']:.3f} ms  Top-1 {b['top1_final']:.2f}%  ({targets})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pruneflow", description="Find the fastest accurate pruned version of a CNN.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("baseline", help="train and save a baseline model")
    b.add_argument("--model", default="resnet20")
    b.add_argument("--dataset", default="digits", choices=DATASETS)
    b.add_argument("--data-path", help="folder of the data: cifar10 / imagefolder (required), fashion-mnist "
                   "(default: where Debian's dataset-fashion-mnist puts it)")
    b.add_argument("--image-size", type=int, default=32)
    b.add_argument("--images-per-epoch", type=int, help="a fresh sample of this many training images an epoch")
    b.add_argument("--crop-padding", type=int, default=0, help="augment: random crop after padding this many pixels")
    b.add_argument("--hflip", action="store_true", help="augment: random left-right flips")
    b.add_argument("--epochs", type=int, default=15)
    b.add_argument("--lr", type=float, default=0.05)
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--model-kwarg", action="append", metavar="KEY=VALUE")
    b.add_argument("--out", required=True, help="folder for baseline.pt and baseline.json")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_baseline)

    t = sub.add_parser("trial", help="run one pruning trial in-process: prune, thin, retrain, export, benchmark, record")
    t.add_argument("spec", help="trial spec YAML")
    t.add_argument("--db", help="results DB URL (overrides the spec)")
    t.add_argument("--artifacts", help="artifact root (overrides the spec)")
    t.add_argument("--trial-id", help="trial id (overrides the spec)")
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    t.set_defaults(func=cmd_trial)

    i = sub.add_parser("inspect", help="show what a pruning plan does to a model, layer by layer")
    i.add_argument("--model")
    i.add_argument("--model-kwarg", action="append", metavar="KEY=VALUE")
    i.add_argument("--dataset", default="digits", choices=DATASETS)
    i.add_argument("--data-path")
    i.add_argument("--image-size", type=int, default=32)
    i.add_argument("--spec", help="trial spec YAML whose pruning groups to apply")
    i.add_argument("--distiller-schedule", help="Intel Distiller compression schedule YAML")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    m = sub.add_parser("bench", help="measure the latency of one exported model (.xml or .onnx)")
    m.add_argument("model")
    m.add_argument("--backend", choices=["openvino", "onnxruntime"])
    m.add_argument("--device")
    m.add_argument("--precision", choices=["f32", "f16", "bf16"])
    m.add_argument("--threads", type=int)
    m.add_argument("--hint", choices=["latency", "throughput"])
    m.add_argument("--warmup", type=int)
    m.add_argument("--rounds", type=int)
    m.add_argument("--iterations", type=int)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_bench)

    w = sub.add_parser("sweep", help="run a sweep in-process (Airflow runs it as the prune_sweep DAG)")
    w.add_argument("sweep", help="sweep spec YAML")
    w.add_argument("--n-trials", type=int, help="trials to run now (overrides the spec)")
    w.add_argument("--json", action="store_true")
    w.set_defaults(func=cmd_sweep)

    se = sub.add_parser("sensitivity", help="prune each coupled set of layers alone at a grid of sparsities: "
                        "recalibrated Top-1 and latency saved per set (a profile for space: auto)")
    se.add_argument("spec", help="sensitivity spec YAML: {name, trial: {...}, sparsities: [...]}")
    se.add_argument("--out", help="output folder (default out/sensitivity/NAME)")
    se.add_argument("--json", action="store_true")
    se.set_defaults(func=cmd_sensitivity)

    lt = sub.add_parser("latency-table", help="measure the per-layer latency table of a sweep's space on its "
                        "benchmark device (for latency_model in the sweep spec)")
    lt.add_argument("sweep", help="sweep spec YAML (its model, space and base.benchmark)")
    lt.add_argument("--out", help="output folder (default: the folder latency_model.table names, else "
                    "out/latency/STUDY)")
    lt.add_argument("--json", action="store_true")
    lt.set_defaults(func=cmd_latency_table)

    rp = sub.add_parser("report", help="write a study's HTML report, PNG plots and CSV")
    rp.add_argument("study")
    rp.add_argument("--db", default=DEFAULT_DB, help="results DB URL (holds the study's search state too)")
    rp.add_argument("--out", help="output folder (default out/reports/STUDY)")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=cmd_report)

    from pruneflow.store import STATUSES

    r = sub.add_parser("trials", help="list recorded trials")
    r.add_argument("--db", default=DEFAULT_DB)
    r.add_argument("--study")
    r.add_argument("--status", choices=list(STATUSES))
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_trials)

    c = sub.add_parser("conf", help="the DAG conf keys (prune_trial, or prune_sweep with --sweep) as a table")
    c.add_argument("--sweep", action="store_true", help="prune_sweep's keys instead of prune_trial's")
    c.set_defaults(func=cmd_conf)

    from pruneflow.airflow_cli import add_airflow_parser
    add_airflow_parser(sub)
    from pruneflow.db_cli import add_db_parser
    add_db_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except (ValueError, TypeError, FileNotFoundError) as exc:  # spec, data, model, plan, checkpoint, settings
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            from pruneflow.spec import format_validation_error

            return _fail(format_validation_error(exc))
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())

