"""A prune_trial DAG run's flat, form-friendly conf, generated from the trial spec, and its limits.

Every field of :class:`pruneflow.spec.TrialSpec` is one conf key: its default, bounds, allowed values
and description come from the spec; this module only names the keys (``finetune.lr`` -> ``lr``),
groups them into the trigger form's sections, and maps a conf back onto a spec. Adding a field to the
spec adds it to the conf and the form with no other edit (a field without an entry in :data:`_NAMES`
is named ``<parent>_<field>``).

A conf is user input. :class:`ConfLimits` — what the deployment configured (:mod:`pruneflow.settings`) —
decides which models a conf may build and which paths and results DBs it may name; ``spec_overrides``
cannot lift them. The CLI, run by a user on their own machine, applies no such limits.

Pure Python: no Airflow, no torch (the spec imports neither).
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from pruneflow import settings
from pruneflow.constants import MAX_SPARSITY, MODEL_NAMES
from pruneflow.spec import SpecError, TrialSpec, error_message

TRIAL, DATA, PRUNING, FINETUNE, BENCH, STORAGE = (
    "Trial", "Model and data", "Pruning", "Fine-tuning and export", "Benchmark", "Storage and advanced")

_SECTION_OF = {"name": TRIAL, "trial_id": TRIAL, "study": TRIAL, "seed": TRIAL, "model": DATA, "dataset": DATA,
               "baseline": DATA, "pruning": PRUNING, "finetune": FINETUNE, "export": FINETUNE,
               "benchmark": BENCH, "sweep": STORAGE, "artifacts": STORAGE, "db": STORAGE}

#: Conf key and form title of the spec fields that have a short name; every other field is
#: ``<parent>_<field>``, titled after its name.
_NAMES: dict[tuple[str, ...], tuple[str, str]] = {
    ("name",): ("name", "Trial name"),
    ("trial_id",): ("trial_id", "Trial id"),
    ("study",): ("study", "Study"),
    ("seed",): ("seed", "Seed"),
    ("model", "name"): ("model", "Model"),
    ("model", "kwargs"): ("model_kwargs", "Model keyword arguments"),
    ("model", "input_shape"): ("input_shape", "Input shape"),
    ("dataset", "name"): ("dataset", "Data set"),
    ("dataset", "path"): ("data_path", "Data path"),
    ("dataset", "image_size"): ("image_size", "Image size"),
    ("dataset", "images_per_epoch"): ("images_per_epoch", "Training images per epoch"),
    ("dataset", "augment", "crop_padding"): ("augment_crop_padding", "Augment: random-crop padding"),
    ("dataset", "augment", "hflip"): ("augment_hflip", "Augment: horizontal flip"),
    ("baseline", "checkpoint"): ("baseline", "Baseline"),
    ("baseline", "epochs"): ("baseline_epochs", "Baseline epochs"),
    ("baseline", "lr"): ("baseline_lr", "Baseline learning rate"),
    ("pruning", "groups"): ("groups", "Pruning groups"),
    ("pruning", "criterion"): ("criterion", "Criterion"),
    ("pruning", "round_to"): ("round_to", "Round to"),
    ("pruning", "ignored_layers"): ("ignored_layers", "Ignored layers"),
    ("pruning", "distiller_schedule"): ("distiller_schedule", "Distiller schedule"),
    ("pruning", "bn_recalibration", "samples"): ("bn_recalibration_samples", "BatchNorm recalibration images"),
    ("pruning", "bn_recalibration", "batch_size"): ("bn_recalibration_batch_size", "Recalibration batch size"),
    ("finetune", "epochs"): ("epochs", "Fine-tuning epochs"),
    ("finetune", "lr"): ("lr", "Learning rate"),
    ("finetune", "optimizer"): ("optimizer", "Optimizer"),
    ("export", "parity_rtol"): ("parity_rtol", "Export parity tolerance (relative)"),
    ("export", "parity_atol"): ("parity_atol", "Export parity tolerance (absolute floor)"),
    ("benchmark", "backend"): ("backend", "Backend"),
    ("benchmark", "device"): ("device", "Device"),
    ("benchmark", "precision"): ("precision", "Inference precision"),
    ("benchmark", "threads"): ("threads", "Threads"),
    ("benchmark", "hint"): ("hint", "Performance hint"),
    ("benchmark", "warmup"): ("warmup", "Warm-up calls"),
    ("benchmark", "rounds"): ("rounds", "Rounds"),
    ("benchmark", "iterations"): ("iterations", "Iterations per round"),
    ("benchmark", "seed"): ("benchmark_seed", "Benchmark input seed"),
    ("benchmark", "target"): ("bench_target", "Benchmark target"),
    ("artifacts",): ("artifacts", "Artifact root"),
    ("db",): ("db", "Results DB"),
    ("sweep",): ("sweep", "Sweep link"),
}

#: Spec fields whose nested model is one conf key (a JSON object), not one key per field.
_WHOLE = {("sweep",)}

#: Where the conf's default is the deployment's, not the spec's (None = "use the deployment's").
_DEPLOYMENT_DEFAULTS = {
    ("trial_id",): "empty: derived from the DAG run id, so the tasks of a run (and any re-run) share it",
    ("baseline", "checkpoint"): "the baselines folder is PRUNEFLOW_BASELINES",
    ("artifacts",): "empty: PRUNEFLOW_ARTIFACTS",
    ("db",): "empty: PRUNEFLOW_DB; otherwise one of the URLs the deployment allows (PRUNEFLOW_ALLOWED_DBS)",
    ("dataset", "path"): "on the workers, under a folder of PRUNEFLOW_DATA_ROOTS",
    ("pruning", "distiller_schedule"): "on the workers, under a folder of PRUNEFLOW_DATA_ROOTS",
}

#: A form's default trial prunes something: the inner convolution of every residual block at 0.5.
DEFAULT_GROUPS: list[dict[str, Any]] = [
    {"name": f"layer{i}", "patterns": [f"layer{i}.*.conv1"], "sparsity": 0.5} for i in (1, 2, 3)
]
_FORM_DEFAULTS: dict[tuple[str, ...], Any] = {("pruning", "groups"): DEFAULT_GROUPS, ("artifacts",): None,
                                              ("db",): None}

#: Conf keys that are not spec fields.
EXTRA_KEYS: dict[str, dict[str, Any]] = {
    "sparsities": {
        "default": {}, "title": "Per-group sparsities", "section": PRUNING,
        "description": 'Override the sparsity of groups by name, e.g. {"layer3": 0.75}.',
        "schema": {"type": ["object", "null"],
                   "additionalProperties": {"type": "number", "minimum": 0, "maximum": MAX_SPARSITY}},
    },
    "spec_overrides": {
        "default": {}, "title": "Spec overrides", "section": STORAGE,
        "description": 'Any trial-spec field as nested JSON, merged last, e.g. {"finetune": {"batch_size": 32}}. '
                       "It cannot lift the deployment's limits on models, paths and results DBs.",
        "schema": {"type": ["object", "null"]},
    },
}


@dataclass(frozen=True)
class ConfKey:
    """One key of the flat conf: a spec field (``path``), or an extra key (``path`` empty)."""

    key: str
    path: tuple[str, ...]
    section: str
    title: str
    description: str
    default: Any
    schema: dict[str, Any]


# ------------------------------------------------------------------------------- schema from the spec

def _deref(node: Any, defs: dict) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return _deref(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _deref(v, defs) for k, v in node.items() if k != "title"}
    if isinstance(node, list):
        return [_deref(v, defs) for v in node]
    return node


def _unwrap_optional(s: dict) -> dict:
    """``anyOf [X, null]`` -> X with ``null`` among its types (the form's way of saying "optional")."""
    alts = s.get("anyOf")
    if not alts:
        return s
    non_null = [a for a in alts if a.get("type") != "null"]
    if len(non_null) != 1 or len(alts) != 2 or "type" not in non_null[0]:
        return s
    out = {k: v for k, v in s.items() if k != "anyOf"} | non_null[0]
    out["type"] = [non_null[0]["type"], "null"]
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def _model_of(annotation: Any) -> type[BaseModel] | None:
    import typing

    candidates = [annotation, *typing.get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _leaves(model: type[BaseModel], schema: dict, prefix: tuple[str, ...], whole):
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        sub_model = _model_of(field.annotation)
        sub_schema = _unwrap_optional(schema["properties"][name])
        if sub_model is not None and path not in whole and "properties" in sub_schema:
            yield from _leaves(sub_model, sub_schema, path, whole)
        else:
            yield path, field, sub_schema


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return copy.deepcopy(value)


def _form_schema(schema: dict, default: Any) -> dict:
    s = {k: v for k, v in schema.items() if k not in ("default", "description", "title")}
    if default is None or default == [] or default == {}:  # optional: the form must not mark it required
        types = s.get("type")
        if isinstance(types, str):
            s["type"] = [types, "null"]
        elif types is None and "anyOf" not in s:
            s["type"] = ["object", "array", "string", "number", "boolean", "null"]
    types = s.get("type")
    if "pattern" in s and isinstance(types, list) and "null" in types:
        s["pattern"] = f"^$|{s['pattern']}"  # a cleared form field comes as "": not set
    return s


def generate_keys(model: type[BaseModel], names: dict[tuple[str, ...], tuple[str, str]],
                  section_of: dict[str, str], form_defaults: dict[tuple[str, ...], Any] | None = None,
                  whole: set[tuple[str, ...]] | frozenset = frozenset(), notes: dict[tuple[str, ...], str] | None = None,
                  skip: set[tuple[str, ...]] | frozenset = frozenset()) -> list[ConfKey]:
    """One conf key per leaf field of ``model`` (nested models are walked, except those in ``whole``):
    schema, default and description from the model; key and title from ``names`` (else ``<parent>_<field>``
    and the field's name); ``notes`` are appended to the description; ``form_defaults`` replace a default."""
    form_defaults, notes = form_defaults or {}, notes or {}
    root = model.model_json_schema()
    schema = _deref({k: v for k, v in root.items() if k != "$defs"}, root.get("$defs", {}))
    out = []
    for path, field, field_schema in _leaves(model, schema, (), whole):
        if path in skip:
            continue
        key, title = names.get(path) or ("_".join(path), path[-1].replace("_", " ").capitalize())
        default = form_defaults[path] if path in form_defaults else _jsonable(
            field.get_default(call_default_factory=True))
        description = (field.description or "").rstrip(".")
        if path in notes:
            description = f"{description}; {notes[path]}" if description else notes[path]
        if description:
            description = description[:1].upper() + description[1:] + "."
        out.append(ConfKey(key, path, section_of[path[0]], title, description, default,
                           _form_schema(field_schema, default)))
    return out


def check_unique(keys: list[ConfKey]) -> tuple[ConfKey, ...]:
    names = [k.key for k in keys]
    dupes = sorted({k for k in names if names.count(k) > 1})
    if dupes:
        raise RuntimeError(f"conf keys named twice: {dupes}: give the fields distinct names")
    return tuple(keys)


@functools.lru_cache(maxsize=1)
def conf_keys() -> tuple[ConfKey, ...]:
    """Every key of the flat conf, in form order: the spec's fields, then :data:`EXTRA_KEYS`."""
    notes = {**_DEPLOYMENT_DEFAULTS, ("model", "name"): "from a DAG conf only a registry model or a user model "
             "the deployment allows (PRUNEFLOW_ALLOWED_MODELS)"}
    keys = generate_keys(TrialSpec, _NAMES, _SECTION_OF, _FORM_DEFAULTS, _WHOLE, notes)
    keys += [ConfKey(k, (), v["section"], v["title"], v["description"], v["default"], v["schema"])
             for k, v in EXTRA_KEYS.items()]
    return check_unique(keys)


def defaults() -> dict[str, Any]:
    """Every conf key with its default."""
    return {k.key: copy.deepcopy(k.default) for k in conf_keys()}


def form_fields(limits: ConfLimits | None = None) -> list[ConfKey]:
    """The conf keys with the deployment's allowed models as the ``model`` key's allowed values, so an
    unknown model is refused by the Param schema itself (HTTP 400 from the REST API)."""
    limits = limits or ConfLimits.from_settings()
    out = []
    for k in conf_keys():
        if k.path == ("model", "name"):
            k = ConfKey(**{**k.__dict__, "schema": {**k.schema, "enum": [*MODEL_NAMES, *limits.models]}})
        out.append(k)
    return out


# ---------------------------------------------------------------------------------------- limits

@dataclass(frozen=True)
class ConfLimits:
    """What a DAG conf may name: the deployment's choice, never the conf's."""

    models: tuple[str, ...] = ()  # user models (package.module:factory) beside the registry's
    data_roots: tuple[str, ...] = ()  # data sets and Distiller schedules lie under these
    artifact_roots: tuple[str, ...] = ()
    baseline_roots: tuple[str, ...] = ()  # baseline checkpoints lie under these
    dbs: tuple[str, ...] = ()  # results DB URLs

    @classmethod
    def from_settings(cls) -> ConfLimits:
        artifacts = settings.artifacts_root()
        return cls(models=tuple(settings.allowed_models()), data_roots=tuple(settings.data_roots()),
                   artifact_roots=(artifacts,), baseline_roots=(settings.baselines_root(), artifacts),
                   dbs=tuple(settings.allowed_dbs()))


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    real = os.path.realpath(path)  # a symlink is judged by where it points
    return any(os.path.commonpath([real, os.path.realpath(r)]) == os.path.realpath(r) for r in roots)


def _get(d: dict, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def limit_errors(spec: dict[str, Any], limits: ConfLimits) -> list[str]:
    """What the spec dict names beyond the limits, as ``conf_key: reason`` lines (empty: within them)."""
    errors = []
    model = _get(spec, ("model", "name"))
    if isinstance(model, str) and model not in MODEL_NAMES and model not in limits.models:
        allowed = ", ".join(limits.models) or "none"
        errors.append(f"model: {model!r} is not allowed: a DAG conf names a registry model ({', '.join(MODEL_NAMES)}) "
                      f"or a user model the deployment allows (PRUNEFLOW_ALLOWED_MODELS: {allowed})")
    for path, roots, what in ((("dataset", "path"), limits.data_roots, "PRUNEFLOW_DATA_ROOTS"),
                              (("pruning", "distiller_schedule"), limits.data_roots, "PRUNEFLOW_DATA_ROOTS"),
                              (("artifacts",), limits.artifact_roots, "PRUNEFLOW_ARTIFACTS"),
                              (("baseline", "checkpoint"), limits.baseline_roots,
                               "PRUNEFLOW_BASELINES or PRUNEFLOW_ARTIFACTS")):
        value = _get(spec, path)
        if value is None:
            continue
        if not isinstance(value, str) or "://" in value or not os.path.isabs(value) or not _inside(value, roots):
            errors.append(f"{_conf_key(path)}: {value!r} is outside the folders the deployment allows ({what}: "
                          f"{', '.join(roots) or 'none'})")
    db = _get(spec, ("db",))
    if db is not None and db not in limits.dbs:
        errors.append("db: not a results DB the deployment allows (PRUNEFLOW_DB, PRUNEFLOW_ALLOWED_DBS); leave it "
                      "empty for the deployment's")
    return errors


# ------------------------------------------------------------------------------------ conf -> spec

def _set(d: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        d = d.setdefault(p, {})
    d[path[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _conf_key(loc: tuple) -> str:
    """The conf key a spec field location comes from (to name it in an error)."""
    best = None
    for k in conf_keys():
        if k.path and tuple(loc[: len(k.path)]) == k.path and (best is None or len(k.path) > len(best.path)):
            best = k
    if best is None:
        return "spec_overrides." + ".".join(str(p) for p in loc) if loc else "conf"
    rest = loc[len(best.path):]
    return best.key + "".join(f".{p}" for p in rest)


def _by_key() -> dict[str, ConfKey]:
    return {k.key: k for k in conf_keys()}


def spec_dict_from_conf(conf: dict[str, Any] | None, run_id: str | None = None,
                        limits: ConfLimits | None = None) -> dict[str, Any]:
    """The TrialSpec as a plain dict (not validated yet), within ``limits`` (default: the deployment's).
    Raises SpecError naming every bad conf key."""
    keys = _by_key()
    conf = dict(conf or {})
    errors = [f"{k}: unknown conf key (known: {', '.join(keys)})" for k in conf if k not in keys]
    c = defaults() | {k: v for k, v in conf.items() if k in keys}
    for name, k in keys.items():
        nullable = isinstance(k.schema.get("type"), list) and "null" in k.schema["type"]
        if isinstance(c[name], str) and not c[name].strip() and nullable:
            c[name] = None  # a cleared form field
        if c[name] is None and isinstance(k.default, list | dict):
            c[name] = type(k.default)()
    for name in ("sparsities", "spec_overrides", "model_kwargs"):
        if not isinstance(c[name], dict):
            errors.append(f"{name}: expected a JSON object, got {type(c[name]).__name__}")
            c[name] = {}
    for name in ("groups", "ignored_layers"):
        if not isinstance(c[name], list):
            errors.append(f"{name}: expected a JSON list, got {type(c[name]).__name__}")
            c[name] = []

    groups = [dict(g) if isinstance(g, dict) else g for g in c["groups"]]
    names = [g.get("name") for g in groups if isinstance(g, dict)]
    for gname, sparsity in c["sparsities"].items():
        if gname not in names:
            errors.append(f"sparsities.{gname}: no group named {gname!r} (groups: {', '.join(map(str, names))})")
        for g in groups:
            if isinstance(g, dict) and g.get("name") == gname:
                g["sparsity"] = sparsity
    for g in groups:  # an explicit null criterion means "the trial's criterion": drop it
        if isinstance(g, dict) and g.get("criterion", "") is None:
            del g["criterion"]
    c["groups"] = groups

    spec: dict[str, Any] = {}
    for name, k in keys.items():
        if k.path and not (c[name] is None and k.path in _DEPLOYMENT_DEFAULTS):
            _set(spec, k.path, c[name])
    spec["trial_id"] = c["trial_id"] or (settings.safe_id(run_id) if run_id else None)
    try:
        spec.setdefault("baseline", {})["checkpoint"] = settings.resolve_baseline(
            c["baseline"], str(c["model"]), str(c["dataset"]), c["image_size"],
            c["model_kwargs"] if isinstance(c["model_kwargs"], dict) else None)
    except ValueError as exc:
        errors.append(f"baseline: {exc}")
    for path, name in ((("dataset", "path"), "data_path"), (("pruning", "distiller_schedule"), "distiller_schedule")):
        if isinstance(c[name], str):
            _set(spec, path, settings.under_home(c[name]))
    spec["artifacts"] = settings.under_home(c["artifacts"]) if isinstance(c["artifacts"], str) \
        else settings.artifacts_root()
    spec["db"] = settings.sqlite_absolute(c["db"]) if isinstance(c["db"], str) else settings.results_db()
    spec = _merge(spec, c["spec_overrides"])
    errors += limit_errors(spec, limits or ConfLimits.from_settings())
    if errors:
        raise SpecError("invalid trial conf:\n  " + "\n  ".join(errors))
    return spec


def spec_from_conf(conf: dict[str, Any] | None, run_id: str | None = None,
                   limits: ConfLimits | None = None) -> TrialSpec:
    """Map a prune_trial DAG run's conf onto a validated TrialSpec, within the deployment's limits.

    Missing keys take their defaults; the trial id is the conf's ``trial_id`` or, when it has none, derived
    from ``run_id`` (:func:`pruneflow.settings.safe_id`). Raises :class:`SpecError` naming every bad conf key
    (and the spec field it maps to)."""
    data = spec_dict_from_conf(conf, run_id, limits)
    try:
        return TrialSpec.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if p not in ("function-after", "function-before"))
            spec_field = ".".join(str(p) for p in loc) or "spec"
            lines.append(f"{_conf_key(loc)}: {error_message(err)} (spec field {spec_field})")
        raise SpecError("invalid trial conf:\n  " + "\n  ".join(lines)) from None


def conf_from_spec(spec: TrialSpec) -> dict[str, Any]:
    """The flat conf that runs exactly this spec (every key set): ``spec_from_conf`` of it gives the spec back."""
    data = spec.model_dump(mode="json")
    return {k.key: copy.deepcopy(_get(data, k.path)) for k in conf_keys() if k.path}


def markdown_table(keys: tuple[ConfKey, ...] | list[ConfKey]) -> str:
    """The conf keys as the README's table: key, spec field, default, what it is."""
    import json

    rows = ["| conf key | spec field | default | |", "|---|---|---|---|"]
    for k in keys:
        default = json.dumps(k.default) if k.default not in (None, [], {}) else ""
        if len(default) > 40:
            default = "(see the form)"
        text = k.description.replace("|", "\\|")
        rows.append(f"| `{k.key}` | {'`' + '.'.join(k.path) + '`' if k.path else ''} | "
                    f"{'`' + default + '`' if default else ''} | {text} |")
    return "\n".join(rows)
