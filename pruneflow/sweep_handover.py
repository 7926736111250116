"""A sweep trial hands over to its lane's next trial itself: it tells the search and asks the next.

A sweep lane runs its trials one after another. Between two of them it waits for the trial's run to end,
is woken by the triggerer, tells the search and asks the next trial: at 4 lanes that took a median 3.7 s,
on every trial's critical path (``benchmarks/sweep_timeline.py``). Instead, a screening trial's last task
calls :func:`next_in_lane` as soon as its result is recorded, and triggers the trial it returns; when the
lane wakes it finds that trial asked and its run started, and only waits on it. The lane still does the
work whenever the trial did not hand over (a failed trial records nothing, a promotion stage's trials
were asked already, a dense latency is still to come): both call the same idempotent
:func:`pruneflow.sweep.current_trial` and :func:`pruneflow.sweep.tell_trial`.

A trial's conf is user input, so nothing in it is trusted to name a sweep: the sweep spec is the one the
sweep run wrote into its study when it started (:func:`note_run`), and the Optuna trial must be the one
that run asked for this very trial id in one of its screening slots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pruneflow import sweep as sw

if TYPE_CHECKING:
    from pruneflow.sweep import Progress, SweepSpec

__all__ = ["next_in_lane", "note_run"]


def _run_attr(run_key: str) -> str:
    return f"sweep_run:{run_key}"


def note_run(sweep: SweepSpec, run_key: str) -> None:
    """Keep a screening run's sweep spec in its study, for its trials to hand over with."""
    sw.open_study(sweep).set_user_attr(_run_attr(run_key), sweep.model_dump(mode="json"))


def next_in_lane(spec: dict[str, Any], run_key: str, progress: Progress | None = None) -> dict | None:
    """Tell the search this recorded trial of sweep run ``run_key`` and ask its lane's next trial.

    Returns the next trial's spec, or None when there is nothing to hand over: the trial is not one of
    that run's screening trials, the lane has run all of its slots, or the lane must decide (the dense
    latency is not known yet, or the dense trial failed for good: the lane fails the sweep with the reason)."""
    import optuna

    from pruneflow.sweep import SweepSpec

    number = (spec.get("sweep") or {}).get("optuna_trial_number")
    if number is None or not spec.get("study") or not spec.get("db"):
        return None
    try:
        study = optuna.load_study(study_name=spec["study"], storage=sw._storage(spec["db"]))
    except KeyError:  # no such study in that DB
        return None
    noted = study.user_attrs.get(_run_attr(run_key))
    trials = study.get_trials(deepcopy=False)
    if noted is None or not 0 <= number < len(trials):
        return None
    asked = trials[number].user_attrs
    if (asked.get("trial_id") != spec.get("trial_id") or asked.get("sweep_run") != run_key
            or not str(asked.get("slot", "")).startswith(f"{run_key}/")):
        return None
    sweep = SweepSpec.model_validate(noted)
    try:
        if sw.tell_trial(sweep, spec, progress)["state"] == sw.WAIT:
            return None
        index = int(asked["slot"].rsplit("/", 1)[1])
        return sw.current_trial(sweep, sw.lane_items(sweep)[index % sweep.parallel], run_key, progress)
    except sw.SweepError:
        return None
