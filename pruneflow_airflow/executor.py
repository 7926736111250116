"""PreloadingLocalExecutor: Airflow's LocalExecutor whose worker processes import torch and pruneflow's
stages once, before they fork task processes.

Why: every task of a trial is a fresh process, and a torch stage spent about half of its 6-10 s
importing torch, Torch-Pruning, OpenVINO, the Task SDK and the library (``benchmarks/airflow_overhead.py
--versus``, ``benchmarks/RESULTS.md``: the tasks of a rapid trial took 0.51x the time preloaded). On Linux
Airflow's task supervisor forks the task process from the executor's worker process (no exec), so what
that worker has imported the task inherits for free. The scheduler itself stays light: the worker
processes are forked from it first and import after the fork. DAG files still parse without torch —
nothing here runs at parse time.

Nothing is computed before the fork, only imported: torch's and OpenMP's thread pools start at a
task's first parallel operation, in the task process, which sets its own thread count
(``[pruneflow] task_threads``).

``[pruneflow] preload`` lists the modules (comma-separated; empty: none, and this executor behaves as
the LocalExecutor). A module that fails to import is logged and skipped; the task then imports it
itself and reports the real error.
"""

from __future__ import annotations

import multiprocessing

from airflow.executors import local_executor
from airflow.executors.local_executor import LocalExecutor

from pruneflow_airflow.preload import preload_modules

__all__ = ["PreloadingLocalExecutor"]


def _run_preloading_worker(preload: str, **worker_kwargs) -> None:
    preload_modules(preload)
    local_executor._run_worker(**worker_kwargs)


class PreloadingLocalExecutor(LocalExecutor):
    """LocalExecutor whose workers import ``[pruneflow] preload`` before running any task."""

    def _spawn_worker(self) -> None:
        # The same keyword arguments as LocalExecutor._spawn_worker (Airflow 3.3), with the preload first;
        # tests/test_airflow_servers.py runs the embedded default on this executor.
        p = multiprocessing.Process(
            target=_run_preloading_worker,
            kwargs={
                "preload": self.conf.get("pruneflow", "preload", fallback=""),
                "logger_name": self.log.name,
                "input": self.activity_queue,
                "output": self.result_queue,
                "unread_messages": self._unread_messages,
                "team_conf": self.conf,
            },
        )
        p.start()
        self.workers[p.pid] = p
