"""prune_sensitivity: a sensitivity profile; one DAG run = one profile.

    validate >> measure_points >> benchmark >> write_profile

* **validate** turns the run's conf (the Params below, the base trial in prune_trial's conf keys) into a
  sensitivity spec and checks it, within the deployment's limits, before any work.
* **measure_points** prunes each coupled set of prunable layers (from the dependency graph) alone at each
  sparsity of the grid, thins it, recalibrates BatchNorm and exports it; the dense model too. Torch.
* **benchmark** measures every exported model and the dense one in ONE run with their rounds interleaved,
  on the benchmark queue and pool (a whole-CPU measurement on the embedded default), torch-free.
* **write_profile** writes ``profile.json``, the table ``profile.txt`` and the plot ``sensitivity.png``
  (Top-1 drop against latency saved, per set) to ``PRUNEFLOW_REPORTS/sensitivity/<name>/``, and the profile
  into the results DB (``pf_sensitivity``, by name), and records the dense model and every point as trials
  of the study named after the profile; a sweep with ``space: auto`` reads that ``profile.json``.

The points' files are read from the local artifact root: with an object-store ``PRUNEFLOW_ARTIFACTS``
the run fails in validate (not supported yet).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, task

from pruneflow_airflow.deployment import deployment
from pruneflow_airflow.params import sensitivity_params

DEPLOYMENT = deployment()

with DAG(
    dag_id="prune_sensitivity",
    description="Sensitivity profile: each coupled set of layers pruned alone, Top-1 drop and latency saved",
    schedule=None,
    catchup=False,
    params=sensitivity_params(),
    doc_md=__doc__,
    tags=["pruneflow"],
    default_args={"owner": "pruneflow", "retries": 0},
) as dag:

    @task(pool=DEPLOYMENT.cpu_pool, execution_timeout=timedelta(minutes=10))
    def validate(params: dict | None = None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from pruneflow.bench_targets import bench_targets
        from pruneflow.sensitivity_conf import (
            check_default_target,
            check_local_artifacts,
            sensitivity_from_conf,
        )
        from pruneflow.spec import SpecError

        try:
            check_local_artifacts()
            spec = sensitivity_from_conf(params)
            check_default_target(spec, bench_targets(DEPLOYMENT.devices, DEPLOYMENT.benchmark_queue,
                                                     DEPLOYMENT.benchmark_pool))
            return spec.model_dump(mode="json")
        except SpecError as exc:  # deterministic: fail without retrying
            raise AirflowFailException(str(exc)) from None

    @task(pool=DEPLOYMENT.cpu_pool, execution_timeout=timedelta(hours=12))
    def measure_points(spec: dict) -> dict:
        from pruneflow.sensitivity import SensitivitySpec, measure_points
        from pruneflow_airflow.operators import stage_environment

        with stage_environment(label="sensitivity measure_points"):
            return measure_points(SensitivitySpec.model_validate(spec), print)

    @task(queue=DEPLOYMENT.benchmark_queue, pool=DEPLOYMENT.benchmark_pool,
          pool_slots=DEPLOYMENT.benchmark_slots(DEPLOYMENT.benchmark_pool),
          priority_weight=100, weight_rule="absolute", execution_timeout=timedelta(hours=2))
    def benchmark(measured: dict) -> dict:
        from pruneflow.sensitivity import measure_latency

        return measure_latency(measured, print, worker={"queue": DEPLOYMENT.benchmark_queue})

    @task(execution_timeout=timedelta(minutes=10))
    def write_profile(profile: dict, measured: dict, spec: dict) -> dict:
        from pruneflow.sensitivity import SensitivitySpec, format_profile, record_points, save_profile
        from pruneflow.settings import reports_root

        db = SensitivitySpec.model_validate(spec).trial_spec().db
        files = save_profile(profile, db, reports_root() / "sensitivity" / profile["name"])
        record_points(measured, print)
        print(format_profile(profile))
        return files

    spec = validate()
    measured = measure_points(spec)
    write_profile(benchmark(measured), measured, spec)
