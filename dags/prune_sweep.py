"""prune_sweep: search per-group sparsities; one DAG run = the screen, or one promotion stage.

    plan >> run_trials (one lane per parallel trial, mapped) >> finish >> more? >> next_stage

* **plan** opens (or resumes) the Optuna study kept in the results DB, tells it what became of trials an
  ended sweep run left unfinished, and deals the run's trials out to ``parallel`` lanes; a study's first
  screen also measures the dense model.
* **run_trials** is one task per lane. A lane asks a trial, runs it as a ``prune_trial`` DAG run, waits
  for it deferred (in the triggerer), tells the search what the results DB recorded and asks the next at
  once: no lane waits for another, so ``parallel`` trials stay in flight until the budget is asked. A
  failed trial is told failed, an abandoned one pruned; neither stops the sweep.
* **finish** tells the search about any trial a failed lane left unfinished, fails the run if a lane
  failed (with the reason when the dense trial a fraction budget needs failed for good), and writes the
  report to ``PRUNEFLOW_REPORTS/<study>/`` after the last stage.
* **next_stage** triggers one run per promotion stage (``promote``: the previous stage's best trials
  fine-tuned, successive halving).

A run of an existing study continues it with ``n_trials`` more trials.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, task

from pruneflow_airflow.params import sweep_params
from pruneflow_airflow.sweep_lane import SweepLaneOperator

with DAG(
    dag_id="prune_sweep",
    description="Search per-group sparsities: the screen, or one promotion stage, per DAG run",
    schedule=None,
    catchup=False,
    params=sweep_params(),
    doc_md=__doc__,
    tags=["pruneflow"],
    render_template_as_native_obj=True,
    default_args={"owner": "pruneflow", "retries": 0},
) as dag:

    @task(execution_timeout=timedelta(minutes=10))
    def plan(params: dict | None = None, run_id: str | None = None) -> list[list[dict]]:
        from pruneflow.sweep import lane_items, promote_round, start_sweep
        from pruneflow.sweep_conf import sweep_from_params
        from pruneflow_airflow.sweep_lane import sweep_run_active

        sweep = sweep_from_params(params)
        stage = int(params.get("stage") or 0)
        start_sweep(sweep, run_id, screening=not stage, active=sweep_run_active, progress=print)
        if stage:
            return lane_items(sweep, specs=promote_round(sweep, stage, print, run_id))
        return lane_items(sweep)

    lanes = plan()
    # Retried: Airflow 3.3 can fail a lane whose trial ended before the scheduler read the executor's
    # event from the lane's deferral ("state mismatch"); a lane picks up where it was.
    run_trials = SweepLaneOperator.partial(task_id="run_trials", retries=2, retry_delay=timedelta(seconds=5)
                                           ).expand(items=lanes)

    @task(trigger_rule="all_done", execution_timeout=timedelta(minutes=30))
    def finish(planned: list, told: list, params: dict | None = None, run_id: str | None = None) -> dict:
        from pruneflow.report import write_report
        from pruneflow.settings import reports_root
        from pruneflow.sweep import check_lanes
        from pruneflow.sweep_conf import next_conf, sweep_from_params

        sweep = sweep_from_params(params)
        check_lanes(sweep, run_id, planned=len(planned or []), finished=len(told or []), progress=print)
        nxt = next_conf(params, sweep)
        report = None
        if nxt is None and params.get("report", True):
            report = write_report(sweep.trial_spec().db, sweep.study, reports_root() / sweep.study)["report"]
            print(f"report: {report}")
        return {"report": report, "next_conf": nxt}

    finished = finish(lanes, run_trials.output)

    @task.short_circuit
    def more_stages(result: dict) -> bool:
        return result["next_conf"] is not None

    next_stage = TriggerDagRunOperator(
        task_id="next_stage", trigger_dag_id="prune_sweep", logical_date=None,
        conf="{{ ti.xcom_pull(task_ids='finish')['next_conf'] }}",
    )

    more_stages(finished) >> next_stage
