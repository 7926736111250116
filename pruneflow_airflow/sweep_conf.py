"""From a prune_sweep DAG run's conf to a validated :class:`pruneflow.sweep.SweepSpec`, and the
conf of the prune_trial runs one round asks for. Pure Python (no Airflow import).

The sweep's base trial is given with prune_trial's own conf keys (``trial``: model, dataset,
epochs, backend, ...), so a sweep and a single trial are configured the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from pruneflow_airflow.conf import DEFAULT_GROUPS, project_home, spec_dict_from_conf

SWEEP_DEFAULTS: dict[str, Any] = {
    "study": "pareto-resnet20-digits",
    "objective": "pareto",
    "sampler": "tpe",
    "n_trials": 24,
    "parallel": 2,
    "seed": 0,
    "space": [{"name": g["name"], "patterns": g["patterns"], "low": 0.0, "high": 0.9, "step": 0.05}
              for g in DEFAULT_GROUPS],
    "latency_budget": None,
    "top1_floor": None,
    "include_dense": True,
    "early_stopping": {"rule": "median", "n_startup_trials": 3, "n_warmup_steps": 1},
    "trial": {},
    "remaining": None,
    "round": 1,
    "report": True,
}

_SWEEP_KEYS = ("study", "objective", "sampler", "n_trials", "parallel", "seed", "space", "latency_budget",
               "top1_floor", "include_dense", "early_stopping")


def sweep_from_conf(conf: dict[str, Any] | None):
    """The SweepSpec of a prune_sweep conf; raises SweepError / ValueError naming the conf key."""
    from pruneflow.sweep import SweepError, parse_sweep

    conf = {**SWEEP_DEFAULTS, **(conf or {})}
    unknown = [k for k in conf if k not in SWEEP_DEFAULTS]
    if unknown:
        raise SweepError(f"invalid sweep: unknown conf keys {unknown} (known: {', '.join(SWEEP_DEFAULTS)})")
    trial = conf["trial"] or {}
    if not isinstance(trial, dict):
        raise SweepError("invalid sweep:\n  trial: expected a JSON object of prune_trial conf keys")
    try:
        base = spec_dict_from_conf({k: v for k, v in trial.items() if k != "groups"} | {"groups": []})
    except ValueError as exc:
        raise SweepError(str(exc).replace("invalid trial conf:\n  ", "invalid sweep:\n  trial.")) from None
    base.pop("trial_id", None)
    data = {k: conf[k] for k in _SWEEP_KEYS if conf[k] is not None} | {"base": base}
    return parse_sweep(data)


def remaining_trials(conf: dict[str, Any] | None, sweep) -> int:
    rem = (conf or {}).get("remaining")
    return sweep.n_trials if rem is None else int(rem)


def trial_conf(spec: dict[str, Any], baseline_epochs: int | None = None) -> dict[str, Any]:
    """The prune_trial conf that runs exactly this trial spec."""
    conf = {"name": spec["name"], "trial_id": spec["trial_id"], "study": spec["study"], "spec_overrides": spec}
    if baseline_epochs is not None:
        conf["baseline_epochs"] = baseline_epochs
    return conf


def next_round_conf(conf: dict[str, Any] | None, remaining: int) -> dict[str, Any]:
    c = {k: v for k, v in (conf or {}).items()}
    c["remaining"] = remaining
    c["round"] = int(c.get("round") or 1) + 1
    return c


def reports_root() -> Path:
    """Where sweep reports go: PRUNEFLOW_REPORTS, default <home>/out/reports."""
    env = os.environ.get("PRUNEFLOW_REPORTS")
    return Path(env) if env else project_home() / "out" / "reports"


def nightly_studies() -> list[dict[str, Any]]:
    """The studies the nightly schedule continues: a YAML list of prune_sweep confs, each with a
    per-night `n_trials` budget, in the file named by PRUNEFLOW_NIGHTLY (or [pruneflow] nightly_studies)."""
    path = os.environ.get("PRUNEFLOW_NIGHTLY")
    if not path:
        return []
    p = Path(path)
    if not p.is_absolute():
        p = project_home() / p
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

