"""prune_sweep: search per-group sparsities; one DAG run = one round of trials.

    ask >> run_trials (prune_trial DAG runs, mapped) >> tell >> continue? >> next_round

* **ask** opens (or resumes) the Optuna study kept in the results DB and asks it for ``parallel``
  trials; a study's first round also measures the dense model.
* **run_trials** triggers one ``prune_trial`` run per asked trial and waits for them; they run at
  once, their benchmarks one at a time through the benchmark pool.
* **tell** tells the search what the results DB recorded: succeeded trials their objective values,
  abandoned ones pruned, failed ones failed — a failed trial never stops the sweep.
* **next_round** triggers the next round while screening trials remain, then one run per promotion
  stage (``promote``: the previous stage's best trials fine-tuned, successive halving); the last run
  writes the report to ``PRUNEFLOW_REPORTS/<study>/``.

A run of an existing study continues it with ``n_trials`` more trials.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, task

from pruneflow_airflow.params import sweep_params

PARAMS = sweep_params()

with DAG(
    dag_id="prune_sweep",
    description="Search per-group sparsities: one round of prune_trial runs per DAG run",
    schedule=None,
    catchup=False,
    params=PARAMS,
    doc_md=__doc__,
    tags=["pruneflow"],
    render_template_as_native_obj=True,
    default_args={"owner": "pruneflow", "retries": 0},
) as dag:

    @task(execution_timeout=timedelta(minutes=10))
    def ask(params: dict | None = None) -> list[dict]:
        from pruneflow.sweep import ask_round, promote_round
        from pruneflow.sweep_conf import remaining_trials, sweep_from_conf, trial_conf

        sweep = sweep_from_conf({k: params[k] for k in PARAMS})
        if params.get("stage"):
            return [trial_conf(spec) for spec in promote_round(sweep, int(params["stage"]), print)]
        k = min(sweep.parallel, remaining_trials(params, sweep))
        if k <= 0:
            return []
        return [trial_conf(spec) for spec in ask_round(sweep, k)]

    asked = ask()
    run_trials = TriggerDagRunOperator.partial(
        task_id="run_trials", trigger_dag_id="prune_trial", wait_for_completion=True, poke_interval=3,
        # deferrable: the triggerer waits for the trials, so no executor slot or Celery worker process is
        # held while they run (a waiting task per trial in a slot deadlocked sweeps with `parallel` at
        # least the slots: [core] parallelism, or the training worker's concurrency on Celery)
        deferrable=True,
        allowed_states=["success", "failed"], failed_states=[], logical_date=None,
        execution_timeout=timedelta(hours=48),
    ).expand(conf=asked)

    @task(trigger_rule="all_done", execution_timeout=timedelta(minutes=30))
    def tell(confs: list[dict], params: dict | None = None) -> dict:
        from pruneflow.report import write_report
        from pruneflow.settings import reports_root
        from pruneflow.sweep import tell_round
        from pruneflow.sweep_conf import next_conf, sweep_from_conf

        sweep = sweep_from_conf({k: params[k] for k in PARAMS})
        told = tell_round(sweep, [c["spec_overrides"] for c in confs], print)
        nxt = next_conf({k: params[k] for k in PARAMS}, sweep, len(confs))
        report = None
        if nxt is None and params.get("report", True):
            report = write_report(sweep.trial_spec().db, sweep.study, reports_root() / sweep.study)["report"]
            print(f"report: {report}")
        return {"told": told, "report": report, "next_conf": nxt}

    told = tell(asked)

    @task.short_circuit
    def more_trials(result: dict) -> bool:
        return result["next_conf"] is not None

    next_round = TriggerDagRunOperator(
        task_id="next_round", trigger_dag_id="prune_sweep", logical_date=None,
        conf="{{ ti.xcom_pull(task_ids='tell')['next_conf'] }}",
    )

    run_trials >> told
    more_trials(told) >> next_round
