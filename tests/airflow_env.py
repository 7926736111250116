"""A throw-away Airflow installation for tests: home, metadata DB and pruneflow paths in one tmp folder.

Airflow reads its configuration when it is first imported, so :func:`configure` must run before any
``import airflow`` in the test process. It is idempotent: a second call (another test module) gets
the same installation. ``AIRFLOW__*`` / ``PRUNEFLOW_*`` variables it sets are listed in ``ENV``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
AIRFLOW = Path(sys.executable).with_name("airflow")
BENCHMARK_POOL = "benchmark_cpu"

_configured: dict[str, str] | None = None


def env_for(base: Path) -> dict[str, str]:
    home = base / "airflow"
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "PRUNEFLOW_ARTIFACTS": str(base / "trials"),
        "PRUNEFLOW_DB": f"sqlite:///{base / 'results.db'}",
        "PRUNEFLOW_BASELINES": str(base / "baselines"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }


#: variables a test module should restore when it is done (the AIRFLOW_* ones must stay: airflow is imported)
RESTORE = ("PRUNEFLOW_ARTIFACTS", "PRUNEFLOW_DB", "PRUNEFLOW_BASELINES", "OMP_NUM_THREADS")


def configure(base: Path) -> dict[str, str]:
    """Set the environment for an Airflow home under ``base``, migrate its DB, create the benchmark pool.

    Later calls (from any module) set the environment of the first call again, without migrating."""
    global _configured
    if _configured is not None:
        os.environ.update(_configured)
        return _configured
    if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != str(base / "airflow"):
        raise RuntimeError("airflow was imported before tests/airflow_env.configure(): its config is already read")
    env = env_for(base)
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    subprocess.run([str(AIRFLOW), "db", "migrate"], env=os.environ.copy(), check=True, capture_output=True, timeout=300)
    from airflow.models.pool import Pool

    Pool.create_or_update_pool(BENCHMARK_POOL, 1, "one benchmark at a time on this device", include_deferred=False)
    _configured = env
    return env
