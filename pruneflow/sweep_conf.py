"""A prune_sweep DAG run's conf, generated from the sweep spec, and the prune_trial confs a sweep asks for.

Pure Python (no Airflow, no torch). The sweep's base trial is given with prune_trial's own conf keys
(``trial``: model, dataset, epochs, backend, ...), so a sweep and a single trial are configured the same
way, within the same deployment limits (:class:`pruneflow.trial_conf.ConfLimits`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from pruneflow import settings
from pruneflow.spec import SpecError
from pruneflow.sweep import SweepError, SweepSpec, parse_sweep
from pruneflow.trial_conf import DEFAULT_GROUPS, ConfKey, check_unique, generate_keys, spec_dict_from_conf

SEARCH, BUDGET, TRIAL = "Search", "Objective and budget", "Trials"
_SECTION_OF = {"study": SEARCH, "space": SEARCH, "sampler": SEARCH, "n_trials": SEARCH, "parallel": SEARCH,
               "seed": SEARCH, "include_dense": SEARCH, "objective": BUDGET, "latency_budget": BUDGET,
               "top1_floor": BUDGET, "early_stopping": TRIAL, "promote": TRIAL}
_NAMES = {("study",): ("study", "Study"), ("space",): ("space", "Search space"), ("sampler",): ("sampler", "Sampler"),
          ("n_trials",): ("n_trials", "Trials"), ("parallel",): ("parallel", "Trials at once"),
          ("seed",): ("seed", "Seed"), ("include_dense",): ("include_dense", "Measure the dense model"),
          ("objective",): ("objective", "Objective"), ("latency_budget",): ("latency_budget", "Latency budget"),
          ("top1_floor",): ("top1_floor", "Top-1 floor"), ("early_stopping",): ("early_stopping", "Early stopping"),
          ("promote",): ("promote", "Promotion stages")}
_FORM_DEFAULTS: dict[tuple[str, ...], Any] = {
    ("study",): "pareto-resnet20-digits",
    ("space",): [{"name": g["name"], "patterns": g["patterns"], "low": 0.0, "high": 0.9, "step": 0.05}
                 for g in DEFAULT_GROUPS],
}
EXTRA_KEYS: dict[str, dict[str, Any]] = {
    "trial": {"default": {}, "title": "Base trial", "section": TRIAL, "schema": {"type": ["object", "null"]},
              "description": 'prune_trial conf keys every trial starts from, e.g. {"epochs": 2, "model": "resnet56"}.'},
    "stage": {"default": 0, "title": "Promotion stage", "section": TRIAL, "schema": {"type": "integer", "minimum": 0},
              "description": "Set by the sweep itself: 0 while screening, then each promotion stage; leave at 0."},
    "report": {"default": True, "title": "Write the report", "section": TRIAL, "schema": {"type": "boolean"},
               "description": "Write the study's report (PRUNEFLOW_REPORTS/<study>/) after the last stage."},
}


@functools.lru_cache(maxsize=1)
def sweep_conf_keys() -> tuple[ConfKey, ...]:
    # auto (space: auto) and latency_model are read from a sweep spec file only: a conf names no file path
    keys = generate_keys(SweepSpec, _NAMES, _SECTION_OF, _FORM_DEFAULTS,
                         {("latency_budget",), ("early_stopping",), ("auto",), ("latency_model",)},
                         skip={("base",), ("auto",), ("latency_model",)})
    keys += [ConfKey(k, (), v["section"], v["title"], v["description"], v["default"], v["schema"])
             for k, v in EXTRA_KEYS.items()]
    return check_unique(keys)


def sweep_defaults() -> dict[str, Any]:
    return {k.key: k.default for k in sweep_conf_keys()}


def sweep_from_conf(conf: dict[str, Any] | None) -> SweepSpec:
    """The SweepSpec of a prune_sweep conf; raises SweepError naming the conf key."""
    defaults = sweep_defaults()
    conf = {**defaults, **(conf or {})}
    unknown = [k for k in conf if k not in defaults]
    if unknown:
        raise SweepError(f"invalid sweep: unknown conf keys {unknown} (known: {', '.join(defaults)})")
    if conf["space"] == "auto":
        raise SweepError("invalid sweep:\n  space: auto is read from a sweep spec file (`pruneflow sweep`) only; "
                         "a conf gives the space as a list of {name, patterns, low, high, step}")
    trial = conf["trial"] or {}
    if not isinstance(trial, dict):
        raise SweepError("invalid sweep:\n  trial: expected a JSON object of prune_trial conf keys")
    try:
        base = spec_dict_from_conf({k: v for k, v in trial.items() if k != "groups"} | {"groups": []})
    except SpecError as exc:
        raise SweepError(str(exc).replace("invalid trial conf:\n  ", "invalid sweep:\n  trial.")) from None
    base.pop("trial_id", None)
    data = {k.key: conf[k.key] for k in sweep_conf_keys() if k.path and conf[k.key] is not None} | {"base": base}
    return parse_sweep(data)


def sweep_from_params(params: dict[str, Any]) -> SweepSpec:
    """The SweepSpec of a prune_sweep run's params (Airflow adds none of its own, but only our keys count)."""
    keys = sweep_defaults()
    return sweep_from_conf({k: v for k, v in dict(params).items() if k in keys})


def trial_conf(spec: dict[str, Any]) -> dict[str, Any]:
    """The prune_trial conf that runs exactly this trial spec."""
    return {"name": spec["name"], "trial_id": spec["trial_id"], "study": spec["study"], "spec_overrides": spec}


def next_conf(conf: dict[str, Any] | None, sweep: SweepSpec) -> dict[str, Any] | None:
    """The conf of the sweep's next DAG run: after the screen, each promotion stage in turn; None when done."""
    c = dict(conf or {})
    stage = int(c.get("stage") or 0)
    if stage < len(sweep.promote):
        c["stage"] = stage + 1
        return c
    return None


def nightly_studies() -> list[dict[str, Any]]:
    """The studies the nightly schedule continues: a YAML list of prune_sweep confs, each with a per-night
    `n_trials` budget, in the file named by PRUNEFLOW_NIGHTLY."""
    import os

    path = os.environ.get("PRUNEFLOW_NIGHTLY")
    if not path:
        return []
    p = Path(settings.under_home(path))
    if not p.is_file():
        raise FileNotFoundError(f"nightly studies file not found: {p}")
    data = yaml.safe_load(p.read_text()) or []
    if not isinstance(data, list):
        raise ValueError(f"{p}: expected a YAML list of sweep confs")
    for i, c in enumerate(data):
        sweep_from_conf(c)  # every entry valid before anything is triggered
        if "study" not in c:
            raise ValueError(f"{p}: entry {i} has no study name")
    return data
