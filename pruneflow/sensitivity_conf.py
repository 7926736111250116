"""A prune_sensitivity DAG run's conf, generated from the sensitivity spec (:mod:`pruneflow.sensitivity`).

Pure Python (no Airflow, no torch). The base trial is given with prune_trial's own conf keys (``trial``:
model, dataset, baseline, backend, ...), within the same deployment limits as a trial's
(:class:`pruneflow.trial_conf.ConfLimits`): a conf never names a folder, a model or a results DB the
deployment does not allow.
"""

from __future__ import annotations

import functools
from typing import Any

from pruneflow.sensitivity import SensitivitySpec, parse_sensitivity
from pruneflow.spec import SpecError
from pruneflow.trial_conf import ConfKey, check_unique, generate_keys, spec_dict_from_conf

PROFILE, TRIAL = "Profile", "Base trial"
_NAMES = {("name",): ("name", "Profile name"), ("sparsities",): ("sparsities", "Sparsity grid"),
          ("sets",): ("sets", "Coupled sets")}
_SECTION_OF = {"name": PROFILE, "sparsities": PROFILE, "sets": PROFILE}
EXTRA_KEYS: dict[str, dict[str, Any]] = {
    "trial": {"default": {}, "title": "Base trial", "section": TRIAL, "schema": {"type": ["object", "null"]},
              "description": 'prune_trial conf keys every point starts from, e.g. {"model": "resnet56", '
                             '"rounds": 5}; no groups, 0 epochs.'},
}


@functools.lru_cache(maxsize=1)
def sensitivity_conf_keys() -> tuple[ConfKey, ...]:
    keys = generate_keys(SensitivitySpec, _NAMES, _SECTION_OF, skip={("trial",)})
    keys += [ConfKey(k, (), v["section"], v["title"], v["description"], v["default"], v["schema"])
             for k, v in EXTRA_KEYS.items()]
    return check_unique(keys)


def sensitivity_defaults() -> dict[str, Any]:
    return {k.key: k.default for k in sensitivity_conf_keys()}


def sensitivity_from_conf(conf: dict[str, Any] | None) -> SensitivitySpec:
    """The SensitivitySpec of a prune_sensitivity conf; raises SpecError naming the key."""
    defaults = sensitivity_defaults()
    unknown = [k for k in (conf or {}) if k not in defaults]
    if unknown:
        raise SpecError(f"invalid sensitivity spec:\n  unknown conf keys {unknown} (known: {', '.join(defaults)})")
    conf = {**defaults, **(conf or {})}
    trial = conf["trial"] or {}
    if not isinstance(trial, dict):
        raise SpecError("invalid sensitivity spec:\n  trial: expected a JSON object of prune_trial conf keys")
    if trial.get("groups") or trial.get("sparsities"):
        raise SpecError("invalid sensitivity spec:\n  trial.groups: a sensitivity run prunes each coupled set "
                        "alone; leave groups and sparsities out of trial")
    try:
        base = spec_dict_from_conf({**trial, "groups": [], "epochs": trial.get("epochs", 0)})
    except SpecError as exc:
        raise SpecError(str(exc).replace("invalid trial conf:\n  ", "invalid sensitivity spec:\n  trial.")) from None
    base.pop("trial_id", None)
    return parse_sensitivity({"name": conf["name"], "sparsities": conf["sparsities"], "sets": conf["sets"],
                              "trial": base})


def check_local_artifacts() -> None:
    """A sensitivity run reads its points' files from the local artifact root (not an object store)."""
    from pruneflow import settings

    if settings.artifact_store_url():
        raise SpecError("PRUNEFLOW_ARTIFACTS: an object store; prune_sensitivity reads the points' files from a "
                        "local artifact root (allowed: a folder); run `pruneflow sensitivity` on the device's host")


def check_default_target(spec: SensitivitySpec, targets) -> None:
    """The profile is measured by the deployment's default benchmark target (the DAG's one benchmark task):
    a trial whose device or ``bench_target`` routes elsewhere is refused before any point is measured."""
    from pruneflow.bench_targets import route

    trial = spec.trial_spec()
    target = route(trial.benchmark.device, trial.benchmark.target, targets)
    if target != targets[0]:
        raise SpecError(f"trial.bench_target: prune_sensitivity measures on the deployment's default benchmark "
                        f"target (allowed: {targets[0].name or 'empty'}); this trial routes to {target.name!r}")
