"""Sensitivity profiles: what pruning one coupled set of layers alone costs in Top-1 and saves in latency.

The coupled sets come from the dependency graph (:func:`pruneflow.prune.coupled_sets`): the layers of one
set must lose the same filters, so a set is the smallest thing that can be pruned. For each set and each
sparsity of the grid, one rapid trial prunes that set alone, thins it, recalibrates BatchNorm and exports
it (:func:`pruneflow.stages.prune_to_export`'s stages, Top-1 on the validation split). Then every exported
model and the dense one are measured in ONE interleaved benchmark run (:func:`pruneflow.bench.compare`),
so the latency saved is a ratio measured side by side, not across runs.

The profile is a JSON document (:data:`PROFILE_VERSION`): per set its layers and per sparsity the
recalibrated Top-1, its drop from the dense model's and the latency saved. ``space: auto`` in a sweep reads
it (:mod:`pruneflow.auto_space`). Torch is imported inside the functions only.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pruneflow.constants import ID_PATTERN, MAX_SPARSITY
from pruneflow.spec import SpecError, TrialSpec, format_validation_error

__all__ = ["DEFAULT_GRID", "PROFILE_VERSION", "SensitivitySpec", "format_profile", "load_sensitivity",
           "measure_latency", "measure_points", "parse_sensitivity", "plot_profile", "record_points",
           "run_sensitivity", "save_profile", "write_profile"]

DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
PROFILE_VERSION = 1
Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


class SensitivitySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("sensitivity", pattern=ID_PATTERN, max_length=80, description="name of the profile: the "
                      "study of its points and the prefix of their trial ids")
    trial: dict[str, Any] = Field(default_factory=dict, description="trial spec every point starts from (model, "
                                  "dataset, baseline, benchmark, artifacts, db); its pruning groups must be empty")
    sparsities: list[float] = Field(list(DEFAULT_GRID), min_length=1, description="the sparsity grid each set is "
                                    f"pruned at, each in [0, {MAX_SPARSITY}]")
    sets: list[str] = Field(["*"], min_length=1, description="glob patterns over layer names: only the coupled sets "
                            "with a layer matching one of them are profiled")

    @field_validator("sparsities")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        bad = [s for s in v if not 0 < s <= MAX_SPARSITY]
        if bad:
            raise ValueError(f"{bad} outside (0, {MAX_SPARSITY}] (allowed: fractions of filters removed; the dense "
                             "model is measured anyway)")
        fine = [s for s in v if abs(s * 1000 - round(s * 1000)) > 1e-6]
        if fine:
            raise ValueError(f"{fine}: at most 3 decimals (a point's id names its sparsity in thousandths)")
        return sorted({round(float(s), 3) for s in v})

    def trial_spec(self) -> TrialSpec:
        """The base trial, validated: a rapid trial (0 fine-tuning epochs) with no pruning groups."""
        spec = TrialSpec.model_validate(self.trial)
        if spec.pruning.groups or spec.pruning.distiller_schedule:
            raise SpecError("trial.pruning.groups: a sensitivity run prunes each coupled set alone; leave groups "
                            "and distiller_schedule empty")
        if spec.finetune.epochs:
            raise SpecError(f"trial.finetune.epochs: {spec.finetune.epochs}; a sensitivity point is a rapid trial "
                            "(allowed: 0)")
        return spec


def parse_sensitivity(data: dict[str, Any]) -> SensitivitySpec:
    if not isinstance(data, dict):
        raise SpecError(f"sensitivity: expected a mapping, got {type(data).__name__}")
    try:
        spec = SensitivitySpec.model_validate(data)
        spec.trial_spec()
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc).replace("invalid trial spec", "invalid sensitivity spec")
                        ) from None
    return spec


def load_sensitivity(path: str | Path) -> SensitivitySpec:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"sensitivity spec not found: {path}")
    return parse_sensitivity(yaml.safe_load(path.read_text()) or {})


def _point_id(name: str, index: int, sparsity: float) -> str:
    return f"{name}-set{index:02d}-s{round(sparsity * 1000):03d}"


def _run_point(spec: TrialSpec, progress: Progress) -> dict:
    """The torch stages of one point; exported even at chance, since its latency belongs in the profile."""
    from pruneflow import stages

    out = {stage: getattr(stages, stage)(spec, progress) for stage in stages.TORCH_STAGES}
    return {"top1": out["retrain"]["top1"], "at_chance": bool(out["retrain"]["abandoned"]),
            "model": str(spec.trial_dir() / "model.xml")}


def measure_points(sens: SensitivitySpec, progress: Progress = _quiet) -> dict:
    """The torch half: the dense model and every (set, sparsity) point pruned, thinned, recalibrated and
    exported. Returns what :func:`measure_latency` needs (JSON-able: it travels through XCom)."""
    from pruneflow import stages
    from pruneflow.models import build_model
    from pruneflow.prune import coupled_sets

    t0 = time.perf_counter()
    base = stages.resolve_spec(TrialSpec.model_validate({**sens.trial_spec().model_dump(mode="json"),
                                                         "trial_id": f"{sens.name}-dense", "name": sens.name,
                                                         "study": sens.name}))
    plan = stages.check_plan(base)  # data set, model: before any work
    data = stages._dataset(base)
    model = build_model(base.model.name, data.in_channels, data.num_classes, **base.model.kwargs)
    # numbered among all sets of the model, so a set keeps its name whatever ``sets`` selects
    sets = {i: s for i, s in enumerate(coupled_sets(model, plan["input_shape"]))
            if any(fnmatch.fnmatchcase(layer, pat) for layer in s for pat in sens.sets)}
    if not sets:
        raise SpecError(f"sets: {sens.sets} match no prunable layer of {base.model.name}")
    stages.ensure_baseline(base, progress)
    n = len(sets) * len(sens.sparsities)
    progress(f"sensitivity {sens.name}: {len(sets)} coupled sets x {len(sens.sparsities)} sparsities = {n} points")
    dense = _run_point(base, progress)
    points = []
    for i, layers in sets.items():
        for s in sens.sparsities:
            pid = _point_id(sens.name, i, s)
            group = {"name": f"set{i:02d}", "patterns": list(layers), "sparsity": s}
            spec = TrialSpec.model_validate({**base.model_dump(mode="json"), "trial_id": pid,
                                             "pruning": {**base.pruning.model_dump(mode="json"), "groups": [group]}})
            progress(f"point {len(points) + 1}/{n}: set{i:02d} ({len(layers)} layer(s)) at sparsity {s}")
            points.append({"set": f"set{i:02d}", "layers": list(layers), "sparsity": s, "label": pid,
                           **_run_point(spec, progress)})
    return {"name": sens.name, "model": base.model.name, "model_kwargs": base.model.kwargs,
            "dataset": base.dataset.model_dump(mode="json"), "baseline": base.baseline.checkpoint,
            "input_shape": plan["input_shape"], "benchmark": base.benchmark.model_dump(mode="json"),
            "sparsities": sens.sparsities, "dense": dense, "points": points,
            "points_s": round(time.perf_counter() - t0, 1)}


def measure_latency(measured: dict, progress: Progress = _quiet, worker: dict | None = None) -> dict:
    """The torch-free half, on the device: every exported model and the dense one in ONE interleaved
    benchmark run; each point's measurement goes to its trial folder's latency.json (``worker`` as in
    :func:`pruneflow.stages.benchmark`). Returns the profile."""
    from pruneflow.bench import BenchmarkOptions, compare
    from pruneflow.cpu_pause import paused
    from pruneflow.stages import write_latency

    t0 = time.perf_counter()
    bench = measured["benchmark"]
    options = BenchmarkOptions.model_validate({k: v for k, v in bench.items() if k != "target"})
    dense, points = measured["dense"], measured["points"]
    progress(f"benchmark: {len(points) + 1} models, {options.rounds} rounds interleaved in one run")
    cmp = compare([dense["model"]] + [p["model"] for p in points], options,
                  labels=["dense"] + [p["label"] for p in points], progress=progress,
                  isolation=lambda: paused(say=progress))
    for m, path in zip(cmp["models"], [dense["model"]] + [p["model"] for p in points], strict=True):
        write_latency(Path(path).parent, {k: v for k, v in m.items() if k != "label"}, worker)
    latency = {m["label"]: m["latency_ms"]["median"] for m in cmp["models"]}
    dense_ms = latency["dense"]
    sets: dict[str, dict] = {}
    for p in points:
        ms = latency[p["label"]]
        sets.setdefault(p["set"], {"set": p["set"], "layers": p["layers"], "points": []})["points"].append({
            "sparsity": p["sparsity"], "top1": round(p["top1"], 3), "top1_drop": round(dense["top1"] - p["top1"], 3),
            "at_chance": p["at_chance"], "latency_ms": round(ms, 5), "latency_saved_ms": round(dense_ms - ms, 5),
            "latency_saved_pct": round(100 * (dense_ms - ms) / dense_ms, 3)})
    return {"version": PROFILE_VERSION, "name": measured["name"], "model": measured["model"],
            "model_kwargs": measured["model_kwargs"], "dataset": measured["dataset"],
            "baseline": measured["baseline"], "input_shape": measured["input_shape"],
            "device": options.device, "backend": options.backend, "precision": options.precision,
            "sparsities": measured["sparsities"],
            "dense": {"top1": round(dense["top1"], 3), "latency_ms": round(dense_ms, 5)},
            "benchmark": {"rounds": options.rounds, "iterations": options.iterations,
                          "round_median_cv": {m["label"]: m.get("round_median_cv") for m in cmp["models"]}},
            "sets": list(sets.values()),
            "duration_s": {"points": measured["points_s"], "benchmark": round(time.perf_counter() - t0, 1)}}


def record_points(measured: dict, progress: Progress = _quiet) -> None:
    """Record the dense model and every point as trials of the study named after the profile, in the
    trial's results DB (each with its latency from the interleaved run; a point at chance ``abandoned``)."""
    from pruneflow import stages

    for model in [measured["dense"]["model"]] + [p["model"] for p in measured["points"]]:
        spec = TrialSpec.model_validate_json((Path(model).parent / "spec.json").read_text())
        stages.record(spec, _quiet)
    progress(f"recorded {len(measured['points']) + 1} trials of study {measured['name']}")


def run_sensitivity(sens: SensitivitySpec, progress: Progress = _quiet) -> dict:
    """Both halves in this process (:func:`measure_points`, then :func:`measure_latency`), then
    :func:`record_points`. Returns the profile."""
    measured = measure_points(sens, progress)
    profile = measure_latency(measured, progress)
    record_points(measured, progress)
    return profile


def format_profile(profile: dict) -> str:
    """The profile as a text table: one row per set and sparsity."""
    from pruneflow.table import format_cells

    rows = [[s["set"], len(s["layers"]), s["layers"][0], f"{p['sparsity']:.2f}", f"{p['top1']:.2f}",
             f"{p['top1_drop']:+.2f}", f"{p['latency_ms']:.4f}", f"{p['latency_saved_pct']:.1f}"]
            for s in profile["sets"] for p in s["points"]]
    head = (f"sensitivity {profile['name']}: {profile['model']} on {profile['dataset']['name']}, "
            f"{profile['device']} {profile['precision']}; dense Top-1 {profile['dense']['top1']:.2f}%, "
            f"latency {profile['dense']['latency_ms']:.4f} ms")
    return head + "\n" + format_cells(["set", "layers", "first layer", "sparsity", "Top-1 %", "drop", "latency ms",
                                       "saved %"], [[str(c) for c in r] for r in rows],
                                      ["left", "right", "left"] + ["right"] * 5)


def plot_profile(profile: dict, out: Path) -> Path:
    """Top-1 drop against latency saved, one line per set; written as ``<out>/sensitivity.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.grid(alpha=0.3)
    for s in profile["sets"]:
        pts = s["points"]
        ax.plot([p["latency_saved_pct"] for p in pts], [p["top1_drop"] for p in pts], marker="o", ms=3,
                label=f"{s['set']} ({s['layers'][0]})")
    ax.set_xlabel("latency saved (% of the dense model)")
    ax.set_ylabel("Top-1 drop (points, recalibrated)")
    ax.set_title(f"sensitivity {profile['name']}: each coupled set pruned alone")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sensitivity.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write_profile(profile: dict, out: Path) -> dict[str, str]:
    """profile.json, profile.txt (the table) and sensitivity.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(profile, indent=2))
    (out / "profile.txt").write_text(format_profile(profile) + "\n")
    return {"json": str(out / "profile.json"), "table": str(out / "profile.txt"),
            "plot": str(plot_profile(profile, out))}


def save_profile(profile: dict, db: str, out: Path) -> dict[str, str]:
    """:func:`write_profile` into ``out``, and the profile into the results DB ``db`` under its name."""
    from pruneflow.store import ResultsStore

    files = write_profile(profile, out)
    store = ResultsStore(db)
    try:
        store.upsert_sensitivity(profile)
    finally:
        store.close()
    return files
