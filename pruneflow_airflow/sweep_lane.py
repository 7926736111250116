"""One lane of a sweep: its trials one after another as ``prune_trial`` DAG runs, without waiting for other lanes.

The lane asks a trial (:func:`pruneflow.sweep.current_trial`), triggers its ``prune_trial`` run and defers
until the run ends; the triggerer watches the run (``DagStateTrigger``, polled every ``poll_interval``
seconds), so a waiting lane holds no executor slot or Celery worker process. Back from the wait, the same
task tells the search (:func:`pruneflow.sweep.tell_trial`) and asks the next trial at once. Everything the
lane knows is in the study (each trial carries its slot), so a retried or cleared lane picks up where it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

#: prune_trial's end states: a failed trial is told FAIL, it does not fail the lane
TRIAL_END_STATES = ["success", "failed"]
#: a fraction latency budget waits this long between looks for the dense latency
DENSE_WAIT = timedelta(seconds=2)


def trial_run_id(trial_id: str, sweep_run_id: str) -> str:
    """The prune_trial run of a trial: one per trial and sweep run, so a lane that runs again finds it."""
    return f"sweep__{trial_id}__{sweep_run_id}"


def sweep_run_active(run_key: str) -> bool:
    """Whether the sweep run that asked a trial is still queued or running (its trials are not stale)."""
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    return RuntimeTaskInstance.get_dr_count("prune_sweep", run_ids=[run_key], states=["queued", "running"]) > 0


class SweepLaneOperator(BaseOperator):
    """Run one lane's trials (``items``: ``{"slot": i}`` or ``{"spec": ...}``, see
    :func:`pruneflow.sweep.lane_items`) as ``prune_trial`` runs, telling each before asking the next.

    :param items: this lane's trials (mapped from the ``plan`` task).
    :param trial_dag_id: the DAG that runs one trial.
    :param poll_interval: seconds between the triggerer's looks at a running trial.
    """

    template_fields: Sequence[str] = ("items",)
    ui_color = "#e8f0fe"

    def __init__(self, *, items: list[dict[str, Any]], trial_dag_id: str = "prune_trial", poll_interval: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.items = items
        self.trial_dag_id = trial_dag_id
        self.poll_interval = poll_interval

    def execute(self, context: Context) -> list[dict]:
        return self._advance(context)

    def execute_complete(self, context: Context, event: Any = None) -> list[dict]:
        """Back from waiting for a trial run (DagStateTrigger) or for the dense latency (TimeDeltaTrigger)."""
        return self._advance(context)

    def _advance(self, context: Context) -> list[dict]:
        from airflow.providers.standard.triggers.external_task import DagStateTrigger
        from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
        from airflow.sdk.exceptions import DagRunTriggerException

        from pruneflow import sweep as sw
        from pruneflow.sweep_conf import sweep_from_params, trial_conf

        ti = context["ti"]
        sweep = sweep_from_params(context["params"])
        run_key = context["run_id"]
        while (spec := self._current(sweep, run_key)) is not None:
            run_id = trial_run_id(spec["trial_id"], run_key)
            if ti.get_dr_count(self.trial_dag_id, run_ids=[run_id]) == 0:
                # the task runner triggers the run, then defers on it and resumes in execute_complete
                raise DagRunTriggerException(
                    trigger_dag_id=self.trial_dag_id, dag_run_id=run_id, conf=trial_conf(spec),
                    logical_date=None, reset_dag_run=False, skip_when_already_exists=False,
                    wait_for_completion=True, allowed_states=TRIAL_END_STATES, failed_states=[],
                    poke_interval=self.poll_interval, deferrable=True)
            if ti.get_dagrun_state(self.trial_dag_id, run_id) not in TRIAL_END_STATES:
                self.defer(trigger=DagStateTrigger(dag_id=self.trial_dag_id, states=TRIAL_END_STATES,
                                                   run_ids=[run_id], poll_interval=self.poll_interval),
                           method_name="execute_complete")
            told = sw.tell_trial(sweep, spec, self.log.info)
            if told["state"] == sw.WAIT:
                self.log.info("%s waits for the dense latency (latency_budget is a fraction of it)", spec["trial_id"])
                self.defer(trigger=TimeDeltaTrigger(DENSE_WAIT), method_name="execute_complete")
        return sw.lane_told(sweep, self.items, run_key)

    def _current(self, sweep, run_key: str) -> dict | None:
        """The lane's trial now; a SweepError (the dense trial failed for good) fails the lane without retries."""
        from airflow.sdk.exceptions import AirflowFailException

        from pruneflow import sweep as sw

        try:
            return sw.current_trial(sweep, self.items, run_key, self.log.info)
        except sw.SweepError as exc:
            raise AirflowFailException(str(exc)) from None
