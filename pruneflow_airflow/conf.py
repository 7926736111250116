"""From a DAG run's flat, form-friendly conf to a validated :class:`pruneflow.spec.TrialSpec`.

Pure Python: no Airflow import, and pruneflow's spec (which pulls in torch through the data module)
is imported only inside :func:`spec_from_conf`, so DAG files can import this module at parse time.

Defaults come from configuration so a fresh install runs a rapid trial with nothing prepared:

``PRUNEFLOW_HOME``       project root (default: the folder holding this package)
``PRUNEFLOW_ARTIFACTS``  artifact root (default ``<home>/out/trials``)
``PRUNEFLOW_DB``         results DB SQLAlchemy URL (default ``sqlite:///<home>/out/pruneflow.db``)
``PRUNEFLOW_BASELINES``  folder of named baselines (default ``<home>/out/baselines``)

Relative paths (and relative SQLite URLs) are taken relative to ``<home>``, never to the worker's
current directory, so every task of a run, on any worker, resolves them the same way.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pruneflow.spec import TrialSpec

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@=-]{0,99}$")
_BAD_ID_CHARS = re.compile(r"[^A-Za-z0-9_.@=-]")

CRITERIA = ("l1", "l2", "bn-scale", "taylor", "random")  # == pruneflow.spec.CRITERIA (checked by the tests)
MAX_SPARSITY = 0.95  # == pruneflow.spec.MAX_SPARSITY

DEFAULT_GROUPS: list[dict[str, Any]] = [
    {"name": f"layer{i}", "patterns": [f"layer{i}.*.conv1"], "sparsity": 0.5} for i in (1, 2, 3)
]

#: Every key a prune_trial conf may hold, with its default. The DAG's Params use these defaults.
DEFAULTS: dict[str, Any] = {
    # trial
    "name": "trial",
    "trial_id": None,  # None: derived from the DAG run id
    "study": None,
    "seed": 0,
    # model and data
    "model": "resnet20",
    "model_kwargs": {},
    "dataset": "digits",
    "data_path": None,
    "image_size": 32,
    "baseline": None,  # None: the named baseline "<model>-<dataset>-<image_size>"
    "baseline_epochs": 15,
    # pruning
    "groups": DEFAULT_GROUPS,
    "sparsities": {},
    "criterion": "l1",
    "round_to": None,
    "ignored_layers": [],
    # fine-tuning
    "epochs": 0,
    "lr": 0.01,
    "optimizer": "sgd",
    # export
    "parity_atol": 1e-3,
    # benchmark
    "backend": "openvino",
    "device": "CPU",
    "precision": "f32",
    "threads": 1,
    "hint": "latency",
    "warmup": 20,
    "rounds": 5,
    "iterations": 100,
    # storage
    "artifacts": None,
    "db": None,
    # anything else of the TrialSpec, as a nested dict merged last (e.g. {"finetune": {"batch_size": 32}})
    "spec_overrides": {},
}

_OPTIONAL_STRINGS = ("trial_id", "study", "data_path", "baseline", "artifacts", "db")

# spec field path -> conf key, to name the conf key a user typed in error messages
_SPEC_TO_CONF: list[tuple[tuple[str, ...], str]] = [
    (("model", "name"), "model"),
    (("model", "kwargs"), "model_kwargs"),
    (("dataset", "name"), "dataset"),
    (("dataset", "path"), "data_path"),
    (("dataset", "image_size"), "image_size"),
    (("dataset",), "dataset"),
    (("baseline",), "baseline"),
    (("pruning", "groups"), "groups"),
    (("pruning", "criterion"), "criterion"),
    (("pruning", "round_to"), "round_to"),
    (("pruning", "ignored_layers"), "ignored_layers"),
    (("finetune", "epochs"), "epochs"),
    (("finetune", "lr"), "lr"),
    (("finetune", "optimizer"), "optimizer"),
    (("export", "parity_atol"), "parity_atol"),
    *[(("benchmark", k), k) for k in ("backend", "device", "precision", "threads", "hint", "warmup", "rounds",
                                       "iterations")],
    (("benchmark",), "backend/device/precision"),
    *[((k,), k) for k in ("name", "trial_id", "study", "seed", "artifacts", "db")],
]


def project_home() -> Path:
    env = os.environ.get("PRUNEFLOW_HOME")
    return Path(env).expanduser().resolve() if env else Path(__file__).resolve().parents[1]


def _under_home(path: str) -> str:
    if "://" in path:  # an fsspec URL
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else project_home() / p)


def _sqlite_absolute(url: str) -> str:
    """sqlite:///relative.db -> sqlite:////<home>/relative.db; other URLs unchanged."""
    m = re.match(r"^(sqlite(?:\+\w+)?:///)([^?]*)(\?.*)?$", url)
    if not m or not m.group(2) or m.group(2) == ":memory:" or m.group(2).startswith("/"):
        return url
    return f"{m.group(1)}{project_home() / m.group(2)}{m.group(3) or ''}"


def artifacts_root() -> str:
    return _under_home(os.environ.get("PRUNEFLOW_ARTIFACTS") or "out/trials")


def results_db() -> str:
    return _sqlite_absolute(os.environ.get("PRUNEFLOW_DB") or "sqlite:///out/pruneflow.db")


def baselines_root() -> str:
    return _under_home(os.environ.get("PRUNEFLOW_BASELINES") or "out/baselines")


def trial_id_from_run_id(run_id: str) -> str:
    """A stable trial id from a DAG run id: same run (and its re-run tasks) -> same trial.

    e.g. ``manual__2026-11-02T10:00:00.123456+00:00`` -> ``manual__2026-11-02T10_00_00.123456_00_00``.
    Characters outside ``[A-Za-z0-9_.@=-]`` become ``_``; ids over 100 characters keep 91 and a hash.
    """
    s = _BAD_ID_CHARS.sub("_", str(run_id)).lstrip("_.@=-") or "run"
    if len(s) > 100:
        s = f"{s[:91]}-{hashlib.sha1(str(run_id).encode()).hexdigest()[:8]}"
    return s


def baseline_name(model: str, dataset: str, image_size: int | None, model_kwargs: dict | None = None) -> str:
    """The default named baseline of a model/data set/size, e.g. ``resnet20-digits-32``
    (model keyword arguments, which change the network, add a short hash: ``vgg11-digits-32-1a2b3c4d``)."""
    name = f"{model}-{dataset}-{image_size or 'native'}"
    if model_kwargs:
        name += "-" + hashlib.sha1(json.dumps(model_kwargs, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return trial_id_from_run_id(name)


def resolve_baseline(value: str | None, model: str, dataset: str, image_size: int | None,
                     model_kwargs: dict | None = None) -> str:
    """The baseline checkpoint path: a name -> ``<baselines>/<name>/baseline.pt``; a path stays a path.

    A value with a '/' or ending in '.pt' is a path; anything else is a name (None: the default name)."""
    if value is None or str(value).strip() == "":
        value = baseline_name(model, dataset, image_size, model_kwargs)
    value = str(value).strip()
    if "/" in value or value.endswith(".pt"):
        return _under_home(value)
    if not _ID_RE.match(value):
        raise ValueError("a baseline name must be 1-100 letters, digits, '_', '.', '-', '@', '=' "
                         "(or give a path to a .pt checkpoint)")
    return str(Path(baselines_root()) / value / "baseline.pt")


def is_named_baseline(checkpoint: str) -> bool:
    """True when the checkpoint is a named baseline in the baselines folder (one that may be trained)."""
    p = Path(checkpoint)
    return p.name == "baseline.pt" and p.parent.parent == Path(baselines_root())


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _conf_key(loc: tuple) -> str:
    for prefix, key in _SPEC_TO_CONF:
        if tuple(loc[: len(prefix)]) == prefix:
            if key == "groups" and len(loc) > 2:
                return "groups." + ".".join(str(p) for p in loc[2:])
            return key
    return "spec_overrides." + ".".join(str(p) for p in loc) if loc else "conf"


class _ConfError(ValueError):
    pass


def spec_dict_from_conf(conf: dict[str, Any] | None, run_id: str | None = None) -> dict[str, Any]:
    """The TrialSpec as a plain dict (not validated yet). Raises ValueError naming the conf key."""
    conf = dict(conf or {})
    errors = [f"{k}: unknown conf key (known: {', '.join(DEFAULTS)})" for k in conf if k not in DEFAULTS]
    c = {**copy.deepcopy(DEFAULTS), **{k: v for k, v in conf.items() if k in DEFAULTS}}
    for key in _OPTIONAL_STRINGS:  # a cleared form field may come as "" rather than null
        if isinstance(c[key], str) and not c[key].strip():
            c[key] = None
    for key in ("model_kwargs", "sparsities", "spec_overrides"):
        if c[key] is None:
            c[key] = {}
        if not isinstance(c[key], dict):
            errors.append(f"{key}: expected a JSON object, got {type(c[key]).__name__}")
            c[key] = {}
    for key in ("groups", "ignored_layers"):
        if c[key] is None:
            c[key] = []
        if not isinstance(c[key], list):
            errors.append(f"{key}: expected a JSON list, got {type(c[key]).__name__}")
            c[key] = []

    groups = [dict(g) if isinstance(g, dict) else g for g in c["groups"]]
    names = [g.get("name") for g in groups if isinstance(g, dict)]
    for gname, sparsity in c["sparsities"].items():
        if gname not in names:
            errors.append(f"sparsities.{gname}: no group named {gname!r} (groups: {', '.join(map(str, names))})")
            continue
        for g in groups:
            if isinstance(g, dict) and g.get("name") == gname:
                g["sparsity"] = sparsity
    for g in groups:  # an explicit null criterion means "the trial's criterion": drop it
        if isinstance(g, dict) and g.get("criterion", "") is None:
            del g["criterion"]

    trial_id = c["trial_id"] or (trial_id_from_run_id(run_id) if run_id else None)
    try:
        checkpoint = resolve_baseline(c["baseline"], str(c["model"]), str(c["dataset"]), c["image_size"],
                                      c["model_kwargs"])
    except ValueError as exc:
        errors.append(f"baseline: {exc}")
        checkpoint = str(c["baseline"])
    if errors:
        raise _ConfError("invalid trial conf:\n  " + "\n  ".join(errors))

    spec = {
        "name": c["name"],
        "trial_id": trial_id,
        "study": c["study"],
        "seed": c["seed"],
        "model": {"name": c["model"], "kwargs": c["model_kwargs"]},
        "dataset": {"name": c["dataset"], "path": _under_home(c["data_path"]) if c["data_path"] else None,
                    "image_size": c["image_size"]},
        "baseline": {"checkpoint": checkpoint},
        "pruning": {"groups": groups, "criterion": c["criterion"], "round_to": c["round_to"],
                    "ignored_layers": c["ignored_layers"]},
        "finetune": {"epochs": c["epochs"], "lr": c["lr"], "optimizer": c["optimizer"]},
        "export": {"parity_atol": c["parity_atol"]},
        "benchmark": {k: c[k] for k in ("backend", "device", "precision", "threads", "hint", "warmup", "rounds",
                                        "iterations")},
        "artifacts": _under_home(c["artifacts"]) if c["artifacts"] else artifacts_root(),
        "db": _sqlite_absolute(c["db"]) if c["db"] else results_db(),
    }
    return _merge(spec, c["spec_overrides"])


def spec_from_conf(conf: dict[str, Any] | None, run_id: str | None = None) -> TrialSpec:
    """Map a prune_trial DAG run's conf onto a validated TrialSpec.

    Missing keys take :data:`DEFAULTS`; the trial id is the conf's ``trial_id`` or, when it has none,
    :func:`trial_id_from_run_id` of ``run_id``. Raises :class:`pruneflow.spec.SpecError` naming every bad
    conf key (and the spec field it maps to).
    """
    from pydantic import ValidationError

    from pruneflow.spec import SpecError, TrialSpec

    try:
        data = spec_dict_from_conf(conf, run_id)
    except _ConfError as exc:
        raise SpecError(str(exc)) from None
    try:
        return TrialSpec.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if p not in ("function-after", "function-before"))
            spec_field = ".".join(str(p) for p in loc) or "spec"
            lines.append(f"{_conf_key(loc)}: {err['msg']} (spec field {spec_field})")
        raise SpecError("invalid trial conf:\n  " + "\n  ".join(lines)) from None
