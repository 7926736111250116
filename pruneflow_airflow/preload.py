"""Import a worker's heavy modules once, before it forks task processes (``[pruneflow] preload``).

Used by the LocalExecutor of the embedded default (:mod:`pruneflow_airflow.executor`) and by the Celery
workers of the distributed deployment (:mod:`pruneflow_airflow.celery_config`). Only imports: nothing is
computed, so no thread pool exists yet when the task processes are forked.
"""

from __future__ import annotations

import importlib
import time

import structlog

__all__ = ["preload_modules"]


def preload_modules(names: str) -> list[str]:
    """Import each comma-separated module of ``names``; return the ones imported."""
    log = structlog.get_logger(__name__)
    done = []
    started = time.perf_counter()
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # the task imports it again and fails with the real error
            log.warning("pruneflow preload: could not import %s: %s", name, exc)
            continue
        done.append(name)
    log.info("pruneflow preload: imported %s in %.1fs", ", ".join(done) or "nothing",
             time.perf_counter() - started)
    return done
