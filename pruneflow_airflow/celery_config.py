"""Celery settings of the distributed deployment: Airflow's defaults, plus the preload of each worker.

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

CELERY_CONFIG = dict(DEFAULT_CELERY_CONFIG)


@worker_init.connect
def _preload(**_kwargs) -> None:
    from airflow.configuration import conf

    from pruneflow_airflow.preload import preload_modules

    preload_modules(conf.get("pruneflow", "preload", fallback=""))
