"""The stages of a pruning trial, each a function of (spec, progress) -> small JSON-able dict.

Every stage reads what earlier stages wrote into the trial folder and writes its own files
there; only paths and a few numbers are returned — that is what travels through Airflow XCom.
Heavy libraries are imported inside the stages: the benchmark stage must run without torch.

    prepare -> prune -> thinnify -> retrain -> export -> benchmark -> record
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from pruneflow.artifacts import ArtifactError
from pruneflow.spec import SpecError, TrialSpec
from pruneflow.workspace import artifact_location, stage_workspace

Progress = Callable[[str], None]
STAGES = ("prune", "thinnify", "retrain", "export", "benchmark", "record")


class TrialFailed(RuntimeError):
    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


def _quiet(_msg: str) -> None:
    pass


def _read(trial_dir: Path, name: str) -> dict:
    path = trial_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the earlier stages of this trial first")
    return json.loads(path.read_text())


def _write(trial_dir: Path, name: str, data: dict) -> Path:
    path = trial_dir / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
    return path


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("pruneflow", "torch", "torch-pruning", "openvino", "onnx", "onnxruntime", "numpy", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def host_info() -> dict:
    return {"host": socket.gethostname(), "cpu_count": os.cpu_count(), "machine": platform.machine()}


def group_requests(spec: TrialSpec):
    """The trial's pruning groups, with a Distiller schedule's pruners appended as groups."""
    from pruneflow.prune import GroupRequest

    reqs = [GroupRequest(g.name, list(g.patterns), g.sparsity, g.criterion or spec.pruning.criterion)
            for g in spec.pruning.groups]
    if spec.pruning.distiller_schedule:
        from pruneflow.distiller import load_schedule

        sched = load_schedule(spec.pruning.distiller_schedule)
        reqs += [GroupRequest(g.name, list(g.layers), g.sparsity, g.criterion) for g in sched.groups]
    return reqs


def _dataset(spec: TrialSpec):
    from pruneflow.data import load_dataset_cached

    return load_dataset_cached(spec.dataset)


#: What each stage writes into the trial folder. A stage removes its own files and those of every later
#: stage before it runs, so an attempt never records what an earlier attempt left behind.
STAGE_FILES = {
    "prepare": ("spec.json",),
    "prune": ("plan.json", "masked_metrics.json"),
    "thinnify": ("thin.json", "thinned.pt"),
    "retrain": ("epochs.json", "finetuned.pt"),
    "export": ("model.onnx", "model.onnx.data", "model.xml", "model.bin", "parity.json", "reference.npz"),
    "benchmark": ("latency.json",),
    "record": ("result.json", "error.json"),
}


def _start_stage(trial_dir: Path, stage: str) -> None:
    order = list(STAGE_FILES)
    for later in order[order.index(stage):]:
        for name in STAGE_FILES[later]:
            (trial_dir / name).unlink(missing_ok=True)


def resolve_spec(spec: TrialSpec) -> TrialSpec:
    """The spec with its trial id and its baseline checkpoint resolved: no checkpoint or a name means the
    named baseline in the baselines folder (:mod:`pruneflow.settings`), trained on first use. With an
    object-store artifact root the trial folder is this host's scratch folder, whatever host resolved
    the spec first (the files travel through the store, :mod:`pruneflow.workspace`)."""
    from pruneflow import settings

    spec = spec.with_id()
    if settings.artifact_store_url():
        spec = spec.model_copy(update={"artifacts": settings.artifacts_root()})
    value = spec.baseline.checkpoint
    if value and settings.is_baseline_path(value):
        return spec
    try:
        ckpt = settings.resolve_baseline(value, spec.model.name, spec.dataset.name, spec.dataset.image_size,
                                         spec.model.kwargs)
    except ValueError as exc:
        raise SpecError(f"baseline.checkpoint: {exc}") from None
    return spec.model_copy(update={"baseline": spec.baseline.model_copy(update={"checkpoint": ckpt})})


def check_plan(spec: TrialSpec) -> dict:
    """Before any training: the data set loads, the model builds and every pruning glob matches a layer.
    Raises SpecError naming what is wrong."""
    from pruneflow.models import build_model
    from pruneflow.prune import resolve_groups

    try:
        data = _dataset(spec)
        model = build_model(spec.model.name, data.in_channels, data.num_classes, **spec.model.kwargs)
        shape = list(spec.model.input_shape or data.input_shape)
        targets = resolve_groups(model, shape, group_requests(spec), spec.pruning.ignored_layers)
        from pruneflow.recalibrate import calibration_images

        rc = spec.pruning.bn_recalibration
        calibration_images(data.train[0], rc.images(len(data.train[0])), spec.seed)  # within the split
    except (ValueError, TypeError) as exc:  # DatasetError, PlanError, ScheduleError, unknown model / kwargs
        raise SpecError(f"invalid trial: {exc}") from None
    return {"model": spec.model.name, "dataset": data.name, "input_shape": shape, "layers": len(targets),
            "groups": len(group_requests(spec))}


def _baseline_info(ckpt: Path) -> dict:
    meta = ckpt.with_name("baseline.json")
    info = json.loads(meta.read_text()) if meta.is_file() else {}
    return {"checkpoint": str(ckpt), "trained": False, "val_top1": info.get("val_top1")}


def ensure_baseline(spec: TrialSpec, progress: Progress = _quiet) -> dict:
    """Make sure the spec's baseline checkpoint exists: a *named* baseline (one in the baselines folder) is
    trained the first time it is asked for; a missing explicit path fails. Concurrent trials asking for the
    same new baseline train it once (a file lock), and it appears atomically (trained in a temporary
    folder, then renamed). Torch is imported only to train."""
    from pruneflow import settings

    ckpt = Path(spec.baseline.checkpoint)
    if ckpt.is_file():
        return _baseline_info(ckpt)
    if not settings.is_named_baseline(str(ckpt)):
        raise SpecError(
            f"baseline.checkpoint: {ckpt}: checkpoint not found; give a baseline name (trained into "
            f"{settings.baselines_root()} on first use) or train one with `pruneflow baseline --out DIR`")
    from filelock import FileLock

    ckpt.parent.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(ckpt.parent) + ".lock"):  # a second trial waits here, then finds the baseline
        if ckpt.is_file():
            return _baseline_info(ckpt)
        return _train_named_baseline(spec, ckpt, progress)


def _train_named_baseline(spec: TrialSpec, ckpt: Path, progress: Progress) -> dict:
    import shutil

    from pruneflow.baseline import train_baseline

    final = ckpt.parent
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    b = spec.baseline
    progress(f"baseline: training {spec.model.name} on {spec.dataset.name} for {b.epochs} epoch(s) -> {final}")
    try:
        metrics = train_baseline(spec.model.name, spec.dataset, b.epochs, tmp, model_kwargs=spec.model.kwargs,
                                 lr=b.lr, seed=spec.seed, progress=lambda m: progress(f"baseline: {m}"))
        metrics["checkpoint"] = str(ckpt)
        (tmp / "baseline.json").write_text(json.dumps(metrics, indent=2))
        if final.exists():  # an incomplete folder without baseline.pt: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"baseline: val Top-1 {metrics['val_top1']:.2f}%, test Top-1 {metrics['test_top1']:.2f}%")
    return {"checkpoint": str(ckpt), "trained": True, "val_top1": metrics["val_top1"],
            "test_top1": metrics["test_top1"], "epochs": b.epochs}


def _load_baseline(spec: TrialSpec):
    """The baseline model and the data set, checked to fit each other."""
    from pruneflow.checkpoint import load_checkpoint

    if not spec.baseline.checkpoint:
        raise SpecError("baseline.checkpoint: not resolved; call resolve_spec() first")
    model, payload = load_checkpoint(spec.baseline.checkpoint)
    data = _dataset(spec)
    ref = payload["model"]
    if ref["name"] != spec.model.name:
        raise SpecError(f"model.name: {spec.model.name!r} but the baseline {spec.baseline.checkpoint} is {ref['name']!r}")
    shape = list(spec.model.input_shape or data.input_shape)
    if (ref["in_channels"], ref["num_classes"]) != (data.in_channels, data.num_classes) or shape != payload["input_shape"]:
        raise SpecError(
            f"dataset: gives input {shape} and {data.num_classes} classes, but the baseline was trained for "
            f"input {payload['input_shape']} and {ref['num_classes']} classes"
        )
    return model, payload, data


def prepare(spec: TrialSpec, progress: Progress = _quiet) -> dict:
    """Check the spec against the world (baseline exists and fits), create the folder, mark running."""
    from pruneflow.store import ResultsStore

    spec = spec.with_id()
    trial_dir = spec.trial_dir()
    trial_dir.mkdir(parents=True, exist_ok=True)
    _start_stage(trial_dir, "prepare")
    _load_baseline(spec)
    group_requests(spec)  # a Distiller schedule that cannot be read fails here, before any work
    (trial_dir / "spec.json").write_text(spec.model_dump_json(indent=2))
    store = ResultsStore(spec.db)
    try:
        store.upsert_trial(
            spec.trial_id, name=spec.name, study=spec.study, status="running", reason=None,
            model=spec.model.name, dataset=spec.dataset.name, artifact_dir=artifact_location(spec),
            spec_json=spec.model_dump(mode="json"), versions_json=versions(), host=host_info()["host"],
        )
    finally:
        store.close()
    progress(f"trial {spec.trial_id}: folder {trial_dir}")
    return {"trial_id": spec.trial_id, "trial_dir": str(trial_dir)}


def prune(spec: TrialSpec, progress: Progress = _quiet) -> dict:
    import torch

    from pruneflow.prune import make_plan, masked_copy
    from pruneflow.train import evaluate

    trial_dir = spec.trial_dir()
    _start_stage(trial_dir, 'prune')
    model, payload, data = _load_baseline(spec)
    torch.manual_seed(spec.seed)
    reqs = group_requests(spec)
    calib = None
    if any(r.criterion == "taylor" for r in reqs):
        x, y = data.train
        calib = (x[:128], y[:128])
    plan = make_plan(model, payload["input_shape"], reqs, spec.pruning.round_to, spec.pruning.ignored_layers,
                     calib=calib, seed=spec.seed)
    masked = masked_copy(model, plan)
    top1, loss = evaluate(masked, *data.val)
    base = payload["meta"]
    if "val_top1" in base and base.get("dataset") == spec.dataset.model_dump():
        base_top1, base_loss = base["val_top1"], base["val_loss"]
    else:
        base_top1, base_loss = evaluate(model, *data.val)
    _write(trial_dir, "plan.json", plan)
    metrics = {"top1": top1, "loss": loss, "baseline_top1": base_top1, "baseline_loss": base_loss,
               "chance_top1": 100.0 / data.num_classes}
    _write(trial_dir, "masked_metrics.json", metrics)
    summary = ", ".join(f"{g['name']} {g['achieved_sparsity']:.2f}" for g in plan["groups"]) or "dense"
    progress(f"prune: {summary}; Top-1 pruned {top1:.2f}% (baseline {base_top1:.2f}%)")
    return {"plan": str(trial_dir / "plan.json"), "top1_masked": top1, "loss_masked": loss,
            "groups": {g["name"]: g["achieved_sparsity"] for g in plan["groups"]}}


def _recalibrate(spec: TrialSpec, plan: dict, model, data) -> dict:
    """Re-estimate the BatchNorm statistics of a thinned model in place (see :mod:`pruneflow.recalibrate`),
    once, in thinnify: its Top-1 before any fine-tuning is the trial's recalibrated Top-1."""
    from pruneflow.recalibrate import calibration_images, recalibrate

    if not any(layer.get("removed") for layer in plan.get("layers", [])):
        return {"bn_layers": None, "samples": 0, "skipped": "nothing was pruned"}
    rc = spec.pruning.bn_recalibration
    images = calibration_images(data.train[0], rc.images(len(data.train[0])), spec.seed)
    return recalibrate(model, images, rc.batch_size)


def thinnify(spec: TrialSpec, progress: Progress = _quiet) -> dict:
    """Remove the planned filters for real; the thinned model must compute the masked model's function
    (:data:`pruneflow.bench.output_check.THIN_ATOL` + ``THIN_RTOL`` x max |masked output|, argmax agreeing);
    thin.json's ``check`` records the comparison."""
    import torch

    from pruneflow.bench.output_check import THIN_ATOL, THIN_RTOL, compare_outputs, describe
    from pruneflow.checkpoint import save_checkpoint
    from pruneflow.prune import ThinningError, count_params_and_macs, masked_copy, thin

    trial_dir = spec.trial_dir()
    _start_stage(trial_dir, 'thinnify')
    model, payload, data = _load_baseline(spec)
    plan = _read(trial_dir, "plan.json")
    shape = payload["input_shape"]
    thinned, history = thin(model, plan)
    masked = masked_copy(model, plan)
    x = data.val[0][:64]
    with torch.no_grad():
        check = compare_outputs(thinned(x).numpy(), masked(x).numpy(), atol=THIN_ATOL, rtol=THIN_RTOL)
    diff = check["max_abs_diff"]
    if not check["passed"]:
        raise ThinningError(f"thinned model differs from the masked model: {describe(check)}")
    recal = _recalibrate(spec, plan, thinned, data)  # after the check: both were compared as pruned
    params_before, macs_before = count_params_and_macs(model, shape)
    params_after, macs_after = count_params_and_macs(thinned, shape)
    ckpt = save_checkpoint(trial_dir / "thinned.pt", thinned, payload["model"], shape, history,
                           meta={"baseline": spec.baseline.checkpoint, "recalibration": recal})
    baseline_size = Path(spec.baseline.checkpoint).stat().st_size
    info = {
        "max_abs_diff": diff, "tolerance": check["tolerance"], "check": check, "params_before": params_before, "params_after": params_after,
        "macs_before": macs_before, "macs_after": macs_after, "checkpoint_bytes_before": baseline_size,
        "checkpoint_bytes_after": ckpt.stat().st_size, "checkpoint": str(ckpt),
        "check_batch": int(x.shape[0]), "torch_threads": torch.get_num_threads(), "recalibration": recal,
    }
    _write(trial_dir, "thin.json", info)
    progress(f"thinnify: params {params_before:,} -> {params_after:,}, MACs {macs_before:,} -> {macs_after:,}, "
             f"max |thinned - masked| {diff:.2e} ({check['relative_diff']:.1e} of the outputs' scale)")
    return {"checkpoint": str(ckpt), "params_after": params_after, "macs_after": macs_after, "max_abs_diff": diff}


def retrain(spec: TrialSpec, progress: Progress = _quiet, extra_rule: Callable[[dict], str | None] | None = None) -> dict:
    """Fine-tune for spec.finetune.epochs (0 = rapid). A network stuck at chance is abandoned.

    extra_rule(metrics) may stop the trial early too (a sweep's pruner); it returns a reason."""
    from pruneflow.checkpoint import load_checkpoint, save_checkpoint
    from pruneflow.train import TrainOptions, chance_rule, evaluate, train

    trial_dir = spec.trial_dir()
    _start_stage(trial_dir, 'retrain')
    model, payload = load_checkpoint(trial_dir / "thinned.pt")
    data = _dataset(spec)
    ft = spec.finetune
    history: list[dict] = []
    reason = None
    if extra_rule is None and spec.sweep and spec.study and spec.sweep.early_stopping.rule == "median":
        from pruneflow.early_stop import median_rule

        es = spec.sweep.early_stopping
        extra_rule = median_rule(spec.db, spec.study, spec.trial_id, es.n_startup_trials, es.n_warmup_steps)
    start = None  # Top-1 and loss of the thinned (recalibrated) model, before any fine-tuning
    if ft.epochs > 0:
        start = evaluate(model, *data.val)
        chance = chance_rule(data.num_classes, ft.chance_patience, ft.chance_margin)

        def on_epoch(m: dict) -> str | None:
            return chance(m) or (extra_rule(m) if extra_rule else None)

        history, reason = train(
            model, data.train, data.val,
            TrainOptions(epochs=ft.epochs, optimizer=ft.optimizer, lr=ft.lr, batch_size=ft.batch_size,
                         momentum=ft.momentum, weight_decay=ft.weight_decay, seed=spec.seed,
                         **spec.dataset.train_options()),
            on_epoch=on_epoch, progress=lambda s: progress(f"retrain: {s}"),
        )
        ckpt = save_checkpoint(trial_dir / "finetuned.pt", model, payload["model"], payload["input_shape"],
                               payload["pruning_history"], meta=payload["meta"])
    else:
        ckpt = trial_dir / "thinned.pt"
    top1, loss = evaluate(model, *data.val)
    recalibrated = bool((payload["meta"].get("recalibration") or {}).get("samples"))
    if ft.epochs == 0 and recalibrated:
        # a rapid trial's estimate is its recalibrated Top-1: at chance, export and benchmark are not worth it,
        # unless promotion stages will fine-tune it (the smallest configurations start at chance and recover)
        at_chance = chance_rule(data.num_classes, 0, ft.chance_margin)({"epoch": 0, "val_top1": top1})
        if at_chance and spec.sweep and spec.sweep.keep_at_chance:
            progress(f"retrain: recalibrated Top-1 {top1:.2f}% is at chance; kept for the sweep's promotion stages")
        elif at_chance:
            reason = f"rapid trial: recalibrated {at_chance.replace('validation ', '').replace(' after 0 epoch(s)', '')}"
    test_top1, test_loss = evaluate(model, *data.test)
    start = start or (top1, loss)
    result = {"epochs": history, "epochs_requested": ft.epochs, "epochs_run": len(history), "top1": top1,
              "top1_start": start[0], "loss_start": start[1], "recalibrated": recalibrated,
              "loss": loss, "test_top1": test_top1, "test_loss": test_loss, "checkpoint": str(ckpt),
              "abandoned": reason is not None, "reason": reason}
    _write(trial_dir, "epochs.json", result)
    if reason:
        progress(f"retrain: abandoned — {reason}")
    else:
        progress(f"retrain: {len(history)} epoch(s), Top-1 {top1:.2f}%")
    return {"checkpoint": str(ckpt), "top1": top1, "abandoned": reason is not None, "reason": reason}


def export(spec: TrialSpec, progress: Progress = _quiet) -> dict:
    from pruneflow.bench.output_check import describe
    from pruneflow.checkpoint import load_checkpoint
    from pruneflow.export import ParityError, check_parity, export_onnx, export_openvino, save_reference

    trial_dir = spec.trial_dir()
    _start_stage(trial_dir, 'export')
    ckpt = _read(trial_dir, "epochs.json")["checkpoint"]
    model, payload = load_checkpoint(ckpt)
    shape = payload["input_shape"]
    onnx_path = export_onnx(model, shape, trial_dir / "model.onnx", spec.export.opset, spec.export.exporter)
    xml_path = export_openvino(onnx_path, trial_dir / "model.xml", shape, spec.export.compress_to_fp16)
    data = _dataset(spec)
    inputs = data.val[0][: spec.export.parity_samples]
    parity = check_parity(model, onnx_path, xml_path, inputs, spec.export.parity_atol, spec.export.parity_rtol)
    _write(trial_dir, "parity.json", parity)
    save_reference(trial_dir / "reference.npz", inputs, model)
    worst = max(parity["onnxruntime_max_abs_diff"], parity["openvino_max_abs_diff"])
    if not parity["passed"]:
        failed = "; ".join(f"{name}: {describe(c)}" for name, c in parity["checks"].items() if not c["passed"])
        raise ParityError(f"export parity failed (export.parity_atol {spec.export.parity_atol:g}, "
                          f"export.parity_rtol {spec.export.parity_rtol:g}): {failed}")
    rel = max(c["relative_diff"] for c in parity["checks"].values())
    progress(f"export: {onnx_path.name} + {xml_path.name}, parity max diff {worst:.2e} ({rel:.1e} of the outputs' scale)")
    return {"onnx": str(onnx_path), "openvino": str(xml_path), "parity_max_abs_diff": worst}


def write_latency(trial_dir: Path, result: dict, worker: dict | None = None) -> dict:
    """latency.json of a measurement (:func:`pruneflow.bench.measure`, or one model of ``compare``), with
    who measured it (see :func:`benchmark`); returns the result with its ``worker``."""
    import sys

    result["worker"] = {"host": result.get("host"), "queue": None, "env": sys.prefix, "python": sys.executable,
                        "cpu_model": result.get("cpu_model"), **(worker or {})}
    _write(trial_dir, "latency.json", result)
    return result


def benchmark(spec: TrialSpec, progress: Progress = _quiet, worker: dict | None = None) -> dict:
    """Torch-free: reads the exported model and the reference outputs, measures, writes latency.json.
    While it measures (warm-up and timed rounds), the host's registered torch tasks are stopped
    (:mod:`pruneflow.cpu_pause`); latency.json's ``paused_cpu_tasks`` says how many.

    latency.json's ``worker`` says who measured: ``host``, ``queue`` (the Celery queue the task ran on,
    which only the caller knows: the operator passes its ``queue``), ``env`` (the Python environment,
    ``sys.prefix``), ``python`` and ``cpu_model``; ``worker`` given here adds to it or overrides it."""
    import numpy as np

    from pruneflow.bench import measure
    from pruneflow.cpu_pause import paused

    trial_dir = spec.trial_dir()
    _start_stage(trial_dir, "benchmark")
    opts = spec.benchmark
    model_path = trial_dir / ("model.xml" if opts.backend == "openvino" else "model.onnx")
    ref = np.load(trial_dir / "reference.npz")
    say = lambda s: progress(f"benchmark: {s}")  # noqa: E731
    result = measure(model_path, opts, check=(ref["input"], ref["output"]), check_atol=spec.export.parity_atol,
                     check_rtol=spec.export.parity_rtol,
                     progress=say, isolation=lambda: paused(say=say))
    write_latency(trial_dir, result, worker)
    lat = result["latency_ms"]
    tput = result["throughput"]
    extra = (f", {tput['fps']:.1f} fps with {tput['requests']} requests in flight"
             if tput["method"] == "async_queue" else "")
    progress(f"benchmark: median {lat['median']:.3f} ms (p90 {lat['p90']:.3f}, CV of round medians "
             f"{100 * result['round_median_cv']:.1f}%){extra} on {opts.backend}/{opts.device} "
             f"at {result['inference_precision'] or opts.precision}; worker {result['worker']['host']} "
             f"(queue {result['worker']['queue']}, {result['worker']['env']})")
    return {"latency_median_ms": lat["median"], "latency_p90_ms": lat["p90"], "round_median_cv": result["round_median_cv"],
            "throughput_fps": result["throughput_fps"], "inference_precision": result["inference_precision"],
            "worker": result["worker"]}


def collect(trial_dir: Path) -> dict:
    """Everything the stages wrote, as one dict (missing files are skipped: a failed or abandoned trial)."""
    out = {}
    for key, name in (("plan", "plan.json"), ("masked", "masked_metrics.json"), ("thin", "thin.json"),
                      ("retrain", "epochs.json"), ("parity", "parity.json"), ("latency", "latency.json")):
        path = trial_dir / name
        if path.is_file():
            out[key] = json.loads(path.read_text())
    return out


def record(spec: TrialSpec, progress: Progress = _quiet, status: str | None = None, reason: str | None = None) -> dict:
    """Write the trial's results into the results DB (an upsert: recording twice updates)."""
    from pruneflow.store import ResultsStore

    trial_dir = spec.trial_dir()
    res = collect(trial_dir)
    retrain_res = res.get("retrain", {})
    if status is None:
        if retrain_res.get("abandoned"):
            status, reason = "abandoned", retrain_res.get("reason")
        elif "latency" in res:
            status = "succeeded"
        else:
            raise RuntimeError(f"{trial_dir}: no latency.json; the benchmark stage has not run")
    plan = res.get("plan", {})
    sparsities = {g["name"]: {"target": g["target_sparsity"], "achieved": g["achieved_sparsity"]}
                  for g in plan.get("groups", [])}
    thin_res = res.get("thin", {})
    masked = res.get("masked", {})
    recalibrated = bool(retrain_res.get("recalibrated"))
    lat = res.get("latency", {})
    bench_worker = lat.get("worker") or {}  # who measured (pruneflow.stages.benchmark); none before it existed
    fields = dict(
        name=spec.name, study=spec.study, status=status, reason=reason, model=spec.model.name,
        dataset=spec.dataset.name, artifact_dir=artifact_location(spec), spec_json=spec.model_dump(mode="json"),
        versions_json=versions(), host=host_info()["host"], sparsities_json=sparsities,
        params_before=thin_res.get("params_before"), params_after=thin_res.get("params_after"),
        macs_before=thin_res.get("macs_before"), macs_after=thin_res.get("macs_after"),
        top1_masked=masked.get("top1"), loss_masked=masked.get("loss"),
        # the thinned model's Top-1 before fine-tuning; not recalibrated (no BatchNorm, turned off, nothing pruned):
        # the pruned Top-1, and thin.json says why
        top1_recalibrated=retrain_res.get("top1_start") if recalibrated else masked.get("top1"),
        loss_recalibrated=retrain_res.get("loss_start") if recalibrated else masked.get("loss"),
        top1_final=retrain_res.get("top1"), loss_final=retrain_res.get("loss"),
        top1_source=None if "top1" not in retrain_res else "fine-tuned" if retrain_res.get("epochs_run")
        else "recalibrated" if recalibrated else "pruned",
        stage=spec.sweep.stage if spec.sweep else None, parent_trial_id=spec.sweep.parent if spec.sweep else None,
        epochs_run=retrain_res.get("epochs_run"),
        latency_median_ms=lat.get("latency_ms", {}).get("median"), latency_p90_ms=lat.get("latency_ms", {}).get("p90"),
        latency_cv=lat.get("round_median_cv"),
        latency_predicted_ms=spec.sweep.predicted_latency_ms if spec.sweep else None,
        bench_host=bench_worker.get("host"), bench_queue=bench_worker.get("queue"), bench_env=bench_worker.get("env"),
        results_json={k: v for k, v in res.items() if k not in ("plan",)},
    )
    store = ResultsStore(spec.db)
    try:
        store.upsert_trial(spec.trial_id, **fields)
        store.replace_epochs(spec.trial_id, retrain_res.get("epochs", []))
        if lat:
            store.upsert_benchmark(spec.trial_id, lat)
    finally:
        store.close()
    summary = {"trial_id": spec.trial_id, "status": status, "reason": reason, "sparsities": sparsities,
               "params": fields["params_after"], "macs": fields["macs_after"], "top1_masked": fields["top1_masked"],
               "top1_recalibrated": fields["top1_recalibrated"], "top1_final": fields["top1_final"],
               "top1_source": fields["top1_source"], "latency_median_ms": fields["latency_median_ms"],
               "latency_cv": fields["latency_cv"], "trial_dir": str(trial_dir)}
    _write(trial_dir, "result.json", summary)
    progress(f"record: {status} -> {spec.db}")
    return summary


def mark_failed(spec: TrialSpec, stage: str, reason: str) -> None:
    """Record a failed trial with its reason; what earlier stages measured is kept."""
    from pruneflow.store import ResultsStore

    store = ResultsStore(spec.db)
    try:
        store.upsert_trial(spec.trial_id, status="failed", reason=f"{stage}: {reason}", name=spec.name,
                           study=spec.study, spec_json=spec.model_dump(mode="json"))
    finally:
        store.close()


def record_failure(spec: TrialSpec, stage: str, reason: str, error_type: str | None = None,
                   log: Callable[[str], None] = _quiet) -> None:
    """Mark the trial failed in the results DB with the stage and the reason, keeping everything this attempt's
    earlier stages measured (plan, masked Top-1, sizes), and write error.json into the trial folder."""
    trial_dir = spec.trial_dir()
    recorded = False
    if trial_dir.is_dir():
        try:
            record(spec, status="failed", reason=f"{stage}: {reason}")
            recorded = True
        except Exception as exc:  # e.g. a torn file: the status and the reason still get recorded
            log(f"could not record the failed trial's results ({exc}); recording its status only")
        _write(trial_dir, "error.json", {"stage": stage, "reason": reason, "type": error_type})
    if not recorded:
        mark_failed(spec, stage, reason)


def record_conf_failure(conf: dict, run_id: str, stage: str, reason: str) -> str:
    """Record a trial failed whose conf never became a spec (it was invalid): under the conf's trial id
    when that is a valid id, else one derived from the run id, in the deployment's results DB (never a DB
    the conf names). Returns the trial id."""
    from pruneflow import settings
    from pruneflow.constants import ID_RE
    from pruneflow.store import ResultsStore

    def _id(value: object) -> str | None:
        return value if isinstance(value, str) and ID_RE.fullmatch(value) else None

    trial_id = _id(conf.get("trial_id")) or settings.safe_id(run_id)
    store = ResultsStore(settings.results_db())
    try:
        store.upsert_trial(trial_id, status="failed", reason=f"{stage}: {reason}", name=_id(conf.get("name")) or "trial",
                           study=_id(conf.get("study")))
    finally:
        store.close()
    return trial_id


def abandoned_reason(spec: TrialSpec) -> str | None:
    """The reason the retrain stage abandoned this trial, or None (read from its epochs.json)."""
    path = spec.trial_dir() / "epochs.json"
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    return (res.get("reason") or "abandoned") if res.get("abandoned") else None


#: The stages that run torch, in order; a rapid trial runs them in one task (:func:`prune_to_export`).
TORCH_STAGES = ("prepare", *STAGES[:STAGES.index("benchmark")])


def is_rapid(spec: TrialSpec) -> bool:
    """A rapid trial: no fine-tuning epochs (retrain only recalibrates BatchNorm)."""
    return spec.finetune.epochs == 0


def prune_to_export(spec: TrialSpec, progress: Progress = _quiet,
                    started: Callable[[str], None] = _quiet) -> dict:
    """ensure_baseline and :data:`TORCH_STAGES` one after another in this process, stopping after a retrain
    that abandons the trial (export is then not run). ``started(stage)`` is called as each stage begins, so
    the caller knows which stage a failure belongs to. Returns each stage's result, and its time, by name.

    Why one call: a rapid trial's stages take about 2.5 s together, and as one Airflow task each they
    spent most of a trial's time in task hand-overs (``benchmarks/sweep_throughput.py``)."""
    started("ensure_baseline")
    out: dict = {"ensure_baseline": ensure_baseline(spec, progress)}
    timings: dict[str, float] = {}
    for stage in TORCH_STAGES:
        started(stage)
        t = time.perf_counter()
        out[stage] = globals()[stage](spec, progress)
        timings[stage] = round(time.perf_counter() - t, 3)
        if stage == "retrain" and out[stage]["abandoned"]:
            progress(f"trial {spec.trial_id} abandoned in retrain: export is not run")
            break
    out["timings_s"] = timings
    return out


def run_trial(spec: TrialSpec, progress: Progress = _quiet) -> dict:
    """All stages in-process, the named baseline trained first if it does not exist yet (as the DAG does).
    Raises TrialFailed (after recording the failure) if a stage fails."""
    spec = resolve_spec(spec)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ensure_baseline(spec, progress)
    try:
        with stage_workspace(spec, ("prepare",), progress):  # an object-store artifact root: synced per stage
            prepare(spec, progress)  # a SpecError here is the caller's to report: nothing is recorded
    except ArtifactError as exc:
        record_failure(spec, "prepare", str(exc), type(exc).__name__, progress)
        raise TrialFailed("prepare", str(exc)) from exc
    timings["prepare"] = time.perf_counter() - t0
    stage = "prune"
    try:
        for stage in STAGES[:-1]:
            t = time.perf_counter()
            with stage_workspace(spec, (stage,), progress):
                out = globals()[stage](spec, progress)
            timings[stage] = time.perf_counter() - t
            if stage == "retrain" and out["abandoned"]:
                break
        stage = "record"
        t = time.perf_counter()
        with stage_workspace(spec, ("record",), progress):
            summary = record(spec, progress)
        timings["record"] = time.perf_counter() - t
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        record_failure(spec, stage, reason, type(exc).__name__, progress)
        raise TrialFailed(stage, reason) from exc
    summary["timings_s"] = timings
    summary["total_s"] = time.perf_counter() - t0
    _write(spec.trial_dir(), "result.json", summary)
    return summary
