"""prune_sweep_nightly: continue named studies every night, each with a per-night trial budget.

Off until configured: set ``[pruneflow] nightly_schedule`` (a cron expression, e.g. ``0 1 * * *``)
and list the studies in the YAML file named by ``PRUNEFLOW_NIGHTLY`` — prune_sweep confs, each
with its ``study`` and the night's ``n_trials``. Each night triggers one prune_sweep run per study;
an existing study resumes where it stopped.
"""

from __future__ import annotations

from airflow.configuration import conf as airflow_conf
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, task

SCHEDULE = airflow_conf.get("pruneflow", "nightly_schedule", fallback="") or None

with DAG(
    dag_id="prune_sweep_nightly",
    description="Continue the configured studies with a per-night trial budget",
    schedule=SCHEDULE,
    catchup=False,
    doc_md=__doc__,
    tags=["pruneflow"],
    default_args={"owner": "pruneflow", "retries": 0},
) as dag:

    @task
    def studies() -> list[dict]:
        from pruneflow.sweep_conf import nightly_studies

        return nightly_studies()

    TriggerDagRunOperator.partial(task_id="continue_study", trigger_dag_id="prune_sweep", logical_date=None
                                  ).expand(conf=studies())
