"""Celery settings of the distributed deployment: Airflow's defaults, a publish retry that outlasts a
broker restart, and the preload of each worker.

``[celery] celery_config_options = pruneflow_airflow.celery_config.CELERY_CONFIG`` (rendered by
``pruneflow airflow init --executor celery``). Celery's prefork pool forks its child processes from the
worker's main process after ``worker_init``, and Airflow's supervisor forks each task process from a
child: a module imported at ``worker_init`` is imported once per worker, not once per task. Which
modules is ``[pruneflow] preload``; ``pruneflow airflow up`` gives each benchmark worker the torch-free
``[pruneflow] bench_preload`` instead.
"""

from __future__ import annotations

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
from celery.signals import worker_init

CELERY_CONFIG = {
    **DEFAULT_CELERY_CONFIG,
    # Keep trying to publish a task while the broker restarts (Celery's default gives up after ~0.6 s,
    # and the scheduler then fails the task instance): up to ~30 s, then the task fails as before.
    "task_publish_retry": True,
    "task_publish_retry_policy": {"max_retries": 15, "interval_start": 0.5, "interval_step": 0.5, "interval_max": 3},
}


@worker_init.connect
def _preload(**_kwargs) -> None:
    from airflow.configuration import conf

    from pruneflow_airflow.preload import preload_modules

    preload_modules(conf.get("pruneflow", "preload", fallback=""))
