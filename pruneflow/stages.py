"""The stages of a pruning trial, each a function of (spec, progress) -> small JSON-able dict.

Every stage reads what earlier stages wrote into the trial folder and writes its own files
there; only paths and a few numbers are returned — that is what travels through Airflow XCom.
Heavy libraries are imported inside the stages: the benchmark stage must run without torch.

    prepare -> prune -> thinnify -> retrain -> export -> benchmark -> record
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import socket
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from pruneflow.spec import SpecError, TrialSpec

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


#: Folder of the on-disk data set cache, or None (the default: no disk cache). Set with
#: :func:`dataset_cache`; the Airflow tasks use one so that each task process does not import
#: scikit-learn and resize the data set again (about 1-2 s of CPU a task).
_DATASET_CACHE_DIR: Path | None = None
#: Data sets whose content follows from their spec and the installed packages alone (no user folder
#: that could change under the cache): only these are cached on disk.
_DISK_CACHEABLE = ("digits",)


@contextlib.contextmanager
def dataset_cache(folder: str | Path | None):
    """Within the block, built-in data sets are cached on disk in ``folder`` (None: not cached), keyed by
    their spec, the source of :mod:`pruneflow.data` and the versions of the packages that build them, so
    a changed loader or package never serves stale tensors. Restores the previous setting after it."""
    global _DATASET_CACHE_DIR
    before = _DATASET_CACHE_DIR
    _DATASET_CACHE_DIR = Path(folder) if folder else None
    try:
        yield
    finally:
        _DATASET_CACHE_DIR = before


def _dataset_cache_file(dataset: dict) -> Path | None:
    if _DATASET_CACHE_DIR is None or dataset.get("name") not in _DISK_CACHEABLE:
        return None
    import hashlib

    from pruneflow import data as data_module

    h = hashlib.sha256(json.dumps(dataset, sort_keys=True).encode())
    h.update(Path(data_module.__file__).read_bytes())
    for pkg in ("torch", "numpy", "scikit-learn"):
        try:
            h.update(f"{pkg}={metadata.version(pkg)}".encode())
        except metadata.PackageNotFoundError:
            pass
    return _DATASET_CACHE_DIR / f"{dataset['name']}-{h.hexdigest()[:20]}.pt"


def _load_dataset_disk_cached(dataset: dict):
    from pruneflow.data import DataSplits, load_dataset

    path = _dataset_cache_file(dataset)
    if path is not None and path.is_file():
        import torch

        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            return DataSplits(**{**payload, "train": tuple(payload["train"]), "val": tuple(payload["val"]),
                                 "test": tuple(payload["test"]), "mean": tuple(payload["mean"]),
                                 "std": tuple(payload["std"])})
        except Exception:  # unreadable (a torn or foreign file): load from the source and rewrite it
            pass
    data = load_dataset(dataset)
    if path is not None:
        import dataclasses

        import torch

        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({f.name: getattr(data, f.name) for f in dataclasses.fields(data)}, tmp)
            tmp.replace(path)  # atomic: a concurrent reader sees the old file, the new one or none
        except OSError:
            tmp.unlink(missing_ok=True)
    return data


@functools.lru_cache(maxsize=4)
def _dataset_cached(dataset_json: str, cache_dir: Path | None):
    return _load_dataset_disk_cached(json.loads(dataset_json))


def _dataset(spec: TrialSpec):
    """The trial's data set, loaded once per process (stages of an in-process trial share it), and once
    per machine for the built-in ones within :func:`dataset_cache`."""
    return _dataset_cached(spec.dataset.model_dump_json(), _DATASET_CACHE_DIR)


def _load_baseline(spec: TrialSpec):
    """The baseline model and the data set, checked to fit each other."""
    from pruneflow.checkpoint import load_checkpoint

    if spec.baseline is None:
        raise SpecError("baseline.checkpoint: required; train one with `pruneflow baseline --out DIR`")
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
    _load_baseline(spec)
    group_requests(spec)  # a Distiller schedule that cannot be read fails here, before any work
    (trial_dir / "spec.json").write_text(spec.model_dump_json(indent=2))
    store = ResultsStore(spec.db)
    try:
        store.upsert_trial(
            spec.trial_id, name=spec.name, study=spec.study, status="running", reason=None,
            model=spec.model.name, dataset=spec.dataset.name, artifact_dir=str(trial_dir.resolve()),
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
    progress(f"prune: {summary}; masked Top-1 {top1:.2f}% (baseline {base_top1:.2f}%)")
    return {"plan": str(trial_dir / "plan.json"), "top1_masked": top1, "loss_masked": loss,
            "groups": {g["name"]: g["achieved_sparsity"] for g in plan["groups"]}}


def thinnify(spec: TrialSpec, progress: Progress = _quiet, tolerance: float = 1e-4) -> dict:
    import torch

    from pruneflow.checkpoint import save_checkpoint
    from pruneflow.prune import count_params_and_macs, masked_copy, max_output_difference, thin

    trial_dir = spec.trial_dir()
    model, payload, data = _load_baseline(spec)
    plan = _read(trial_dir, "plan.json")
    shape = payload["input_shape"]
    thinned, history = thin(model, plan)
    masked = masked_copy(model, plan)
    x = data.val[0][:64]
    diff = max_output_difference(masked, thinned, x)
    if not diff <= tolerance:
        raise RuntimeError(f"thinned model differs from the masked model by {diff:.3g} (tolerance {tolerance})")
    params_before, macs_before = count_params_and_macs(model, shape)
    params_after, macs_after = count_params_and_macs(thinned, shape)
    ckpt = save_checkpoint(trial_dir / "thinned.pt", thinned, payload["model"], shape, history,
                           meta={"baseline": spec.baseline.checkpoint})
    baseline_size = Path(spec.baseline.checkpoint).stat().st_size
    info = {
        "max_abs_diff": diff, "tolerance": tolerance, "params_before": params_before, "params_after": params_after,
        "macs_before": macs_before, "macs_after": macs_after, "checkpoint_bytes_before": baseline_size,
        "checkpoint_bytes_after": ckpt.stat().st_size, "checkpoint": str(ckpt),
        "check_batch": int(x.shape[0]), "torch_threads": torch.get_num_threads(),
    }
    _write(trial_dir, "thin.json", info)
    progress(f"thinnify: params {params_before:,} -> {params_after:,}, MACs {macs_before:,} -> {macs_after:,}, "
             f"max |thinned - masked| {diff:.2e}")
    return {"checkpoint": str(ckpt), "params_after": params_after, "macs_after": macs_after, "max_abs_diff": diff}


def retrain(spec: TrialSpec, progress: Progress = _quiet, extra_rule: Callable[[dict], str | None] | None = None) -> dict:
    """Fine-tune for spec.finetune.epochs (0 = rapid). A network stuck at chance is abandoned.

    extra_rule(metrics) may stop the trial early too (a sweep's pruner); it returns a reason."""
    from pruneflow.checkpoint import load_checkpoint, save_checkpoint
    from pruneflow.train import TrainOptions, chance_rule, evaluate, train

    trial_dir = spec.trial_dir()
    model, payload = load_checkpoint(trial_dir / "thinned.pt")
    data = _dataset(spec)
    ft = spec.finetune
    history: list[dict] = []
    reason = None
    if extra_rule is None and spec.sweep and spec.study and spec.sweep.early_stopping.rule == "median":
        from pruneflow.early_stop import median_rule

        es = spec.sweep.early_stopping
        extra_rule = median_rule(spec.db, spec.study, spec.trial_id, es.n_startup_trials, es.n_warmup_steps)
    if ft.epochs > 0:
        chance = chance_rule(data.num_classes, ft.chance_patience, ft.chance_margin)

        def on_epoch(m: dict) -> str | None:
            return chance(m) or (extra_rule(m) if extra_rule else None)

        history, reason = train(
            model, data.train, data.val,
            TrainOptions(epochs=ft.epochs, optimizer=ft.optimizer, lr=ft.lr, batch_size=ft.batch_size,
                         momentum=ft.momentum, weight_decay=ft.weight_decay, seed=spec.seed),
            on_epoch=on_epoch, progress=lambda s: progress(f"retrain: {s}"),
        )
        ckpt = save_checkpoint(trial_dir / "finetuned.pt", model, payload["model"], payload["input_shape"],
                               payload["pruning_history"], meta=payload["meta"])
    else:
        ckpt = trial_dir / "thinned.pt"
    top1, loss = evaluate(model, *data.val)
    test_top1, test_loss = evaluate(model, *data.test)
    result = {"epochs": history, "epochs_requested": ft.epochs, "epochs_run": len(history), "top1": top1,
              "loss": loss, "test_top1": test_top1, "test_loss": test_loss, "checkpoint": str(ckpt),
              "abandoned": reason is not None, "reason": reason}
    _write(trial_dir, "epochs.json", result)
    if reason:
        progress(f"retrain: abandoned — {reason}")
    else:
        progress(f"retrain: {len(history)} epoch(s), Top-1 {top1:.2f}%")
    return {"checkpoint": str(ckpt), "top1": top1, "abandoned": reason is not None, "reason": reason}


def export(spec: TrialSpec, progress: Progress = _quiet) -> dict:
    from pruneflow.checkpoint import load_checkpoint
    from pruneflow.export import ParityError, check_parity, export_onnx, export_openvino, save_reference

    trial_dir = spec.trial_dir()
    ckpt = _read(trial_dir, "epochs.json")["checkpoint"]
    model, payload = load_checkpoint(ckpt)
    shape = payload["input_shape"]
    onnx_path = export_onnx(model, shape, trial_dir / "model.onnx", spec.export.opset, spec.export.exporter)
    xml_path = export_openvino(onnx_path, trial_dir / "model.xml", shape, spec.export.compress_to_fp16)
    data = _dataset(spec)
    inputs = data.val[0][: spec.export.parity_samples]
    parity = check_parity(model, onnx_path, xml_path, inputs, spec.export.parity_atol)
    _write(trial_dir, "parity.json", parity)
    save_reference(trial_dir / "reference.npz", inputs, model)
    worst = max(parity["onnxruntime_max_abs_diff"], parity["openvino_max_abs_diff"])
    if not parity["passed"]:
        raise ParityError(
            f"export parity failed: max |ONNX Runtime - torch| {parity['onnxruntime_max_abs_diff']:.3g}, "
            f"max |OpenVINO - torch| {parity['openvino_max_abs_diff']:.3g} > export.parity_atol {spec.export.parity_atol:g}"
        )
    progress(f"export: {onnx_path.name} + {xml_path.name}, parity max diff {worst:.2e}")
    return {"onnx": str(onnx_path), "openvino": str(xml_path), "parity_max_abs_diff": worst}


def benchmark(spec: TrialSpec, progress: Progress = _quiet) -> dict:
    """Torch-free: reads the exported model and the reference outputs, measures, writes latency.json."""
    import numpy as np

    from pruneflow.bench import measure

    trial_dir = spec.trial_dir()
    opts = spec.benchmark
    model_path = trial_dir / ("model.xml" if opts.backend == "openvino" else "model.onnx")
    ref = np.load(trial_dir / "reference.npz")
    result = measure(model_path, opts, check=(ref["input"], ref["output"]), check_atol=spec.export.parity_atol,
                     progress=lambda s: progress(f"benchmark: {s}"))
    _write(trial_dir, "latency.json", result)
    lat = result["latency_ms"]
    progress(f"benchmark: median {lat['median']:.3f} ms (p90 {lat['p90']:.3f}, CV of round medians "
             f"{100 * result['round_median_cv']:.1f}%) on {opts.backend}/{opts.device}")
    return {"latency_median_ms": lat["median"], "latency_p90_ms": lat["p90"], "round_median_cv": result["round_median_cv"]}


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
    lat = res.get("latency", {})
    fields = dict(
        name=spec.name, study=spec.study, status=status, reason=reason, model=spec.model.name,
        dataset=spec.dataset.name, artifact_dir=str(trial_dir.resolve()), spec_json=spec.model_dump(mode="json"),
        versions_json=versions(), host=host_info()["host"], sparsities_json=sparsities,
        params_before=thin_res.get("params_before"), params_after=thin_res.get("params_after"),
        macs_before=thin_res.get("macs_before"), macs_after=thin_res.get("macs_after"),
        top1_masked=res.get("masked", {}).get("top1"), loss_masked=res.get("masked", {}).get("loss"),
        top1_final=retrain_res.get("top1"), loss_final=retrain_res.get("loss"),
        epochs_run=retrain_res.get("epochs_run"),
        latency_median_ms=lat.get("latency_ms", {}).get("median"), latency_p90_ms=lat.get("latency_ms", {}).get("p90"),
        latency_cv=lat.get("round_median_cv"),
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
               "top1_final": fields["top1_final"], "latency_median_ms": fields["latency_median_ms"],
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


def run_trial(spec: TrialSpec, progress: Progress = _quiet) -> dict:
    """All stages in-process. Raises TrialFailed (after recording the failure) if a stage fails."""
    spec = spec.with_id()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prepare(spec, progress)
    timings["prepare"] = time.perf_counter() - t0
    stage = "prune"
    try:
        for stage in STAGES[:-1]:
            t = time.perf_counter()
            out = globals()[stage](spec, progress)
            timings[stage] = time.perf_counter() - t
            if stage == "retrain" and out["abandoned"]:
                break
        stage = "record"
        t = time.perf_counter()
        summary = record(spec, progress)
        timings["record"] = time.perf_counter() - t
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        mark_failed(spec, stage, reason)
        _write(spec.trial_dir(), "error.json", {"stage": stage, "reason": reason, "type": type(exc).__name__})
        raise TrialFailed(stage, reason) from exc
    summary["timings_s"] = timings
    summary["total_s"] = time.perf_counter() - t0
    _write(spec.trial_dir(), "result.json", summary)
    return summary
