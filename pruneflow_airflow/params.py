"""The trigger forms of prune_trial, prune_sweep and prune_sensitivity, as Airflow Params generated from the library's conf
keys (:mod:`pruneflow.trial_conf`, :mod:`pruneflow.sweep_conf`, :mod:`pruneflow.sensitivity_conf`): the spec is the one definition of every
setting's default, bounds, allowed values and help text."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow.sdk import Param

    from pruneflow.trial_conf import ConfKey


def _params(keys: list[ConfKey]) -> dict[str, Param]:
    from airflow.sdk import Param

    return {k.key: Param(k.default, title=k.title, section=k.section, description=k.description, **k.schema)
            for k in keys}


def trial_params() -> dict[str, Param]:
    from pruneflow.trial_conf import form_fields

    return _params(form_fields())


def sweep_params() -> dict[str, Param]:
    from pruneflow.sweep_conf import sweep_conf_keys

    return _params(list(sweep_conf_keys()))


def sensitivity_params() -> dict[str, Param]:
    from pruneflow.sensitivity_conf import sensitivity_conf_keys

    return _params(list(sensitivity_conf_keys()))
