"""prune_trial: one DAG run = one pruning trial.

    validate >> ensure_baseline >> prune >> thinnify >> retrain >> export >> benchmark >> record

With several benchmark targets (``[pruneflow] devices``, e.g. ``cpu0, cpu1, ncs2``), ``benchmark`` is one
task per target, each on its device's queue and pool, behind a branch that follows the trial's:

    export >> route_benchmark >> [benchmark_cpu0, benchmark_cpu1, benchmark_ncs2] >> record

* **validate** turns the run's conf (the Params below) into a trial spec and checks it — data set,
  model, pruning globs — before anything is trained; the spec travels to the other tasks through XCom.
* **ensure_baseline** trains the named baseline the first time it is asked for (``baseline`` empty:
  ``<model>-<dataset>-<image_size>`` in ``PRUNEFLOW_BASELINES``), so a fresh install can run a trial.
* **route_benchmark** follows the benchmark task of the trial's ``benchmark.target`` (MYRIAD: the NCS2
  worker's, ``bench_ncs2``; otherwise the default, the target on ``[pruneflow] benchmark_queue``).
* **prune .. record** are the stages of ``pruneflow.stages``; their files go to the trial folder
  (``PRUNEFLOW_ARTIFACTS/<trial_id>``), their results to the results DB (``PRUNEFLOW_DB``).
  A trial abandoned in retrain skips export and benchmark, and is recorded ``abandoned``.
  A failed task marks the trial ``failed`` in the results DB with the stage and the reason.
* The trial id is the conf's ``trial_id`` or, when empty, derived from the run id: the tasks of one
  run, and any of them re-run, work on the same trial.

The defaults run a rapid trial (no fine-tuning) of ResNet-20 on digits 32x32 at sparsity 0.5 in
layer1..layer3. The form is generated from the trial spec (``pruneflow.trial_conf``); a conf may name
only the models, folders and results DBs the deployment allows. Torch is imported inside the tasks only.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.configuration import conf as airflow_conf
from airflow.sdk import DAG

from pruneflow.bench_targets import bench_targets
from pruneflow_airflow.operators import (
    BenchmarkOperator,
    EnsureBaselineOperator,
    ExportOperator,
    PruneOperator,
    RecordOperator,
    RetrainOperator,
    RouteBenchmarkOperator,
    ThinnifyOperator,
    ValidateTrialOperator,
    benchmark_task_id,
)
from pruneflow_airflow.params import trial_params

BENCHMARK_QUEUE = airflow_conf.get("pruneflow", "benchmark_queue", fallback="default")
BENCHMARK_POOL = airflow_conf.get("pruneflow", "benchmark_pool", fallback="benchmark_cpu")
# The machine-wide CPU pool: a torch task takes one slot; a benchmark in the same pool takes every slot,
# so nothing else runs on the CPU while it measures.
CPU_POOL = airflow_conf.get("pruneflow", "cpu_pool", fallback="") or "default_pool"
CPU_SLOTS = airflow_conf.getint("pruneflow", "cpu_pool_slots", fallback=1)
TARGETS = bench_targets(airflow_conf.get("pruneflow", "devices", fallback=""), BENCHMARK_QUEUE, BENCHMARK_POOL)

with DAG(
    dag_id="prune_trial",
    description="One pruning trial: prune, thin, fine-tune, export, benchmark, record",
    schedule=None,
    catchup=False,
    params=trial_params(),
    doc_md=__doc__,
    tags=["pruneflow"],
    default_args={"owner": "pruneflow", "retries": 0},
) as dag:
    cpu = {"pool": CPU_POOL, "pool_slots": 1}
    validate = ValidateTrialOperator(task_id="validate", bench_targets=TARGETS,
                                     execution_timeout=timedelta(minutes=10), **cpu)
    ensure_baseline = EnsureBaselineOperator(task_id="ensure_baseline", execution_timeout=timedelta(hours=6), **cpu)
    prune = PruneOperator(task_id="prune", execution_timeout=timedelta(hours=1), **cpu)
    thinnify = ThinnifyOperator(task_id="thinnify", execution_timeout=timedelta(hours=1), **cpu)
    retrain = RetrainOperator(task_id="retrain", execution_timeout=timedelta(hours=24), **cpu)
    export = ExportOperator(task_id="export", execution_timeout=timedelta(hours=1), **cpu)
    # absolute priority: a benchmark waiting for every slot goes before the next trial's torch task
    benchmarks = [BenchmarkOperator(
        task_id=benchmark_task_id(t), queue=t.queue, pool=t.pool, pool_slots=CPU_SLOTS if t.pool == CPU_POOL else 1,
        priority_weight=100, weight_rule="absolute", retries=2,
        retry_delay=timedelta(seconds=15), execution_timeout=timedelta(hours=1)) for t in TARGETS]
    record = RecordOperator(
        task_id="record", retries=2, retry_delay=timedelta(seconds=10), execution_timeout=timedelta(minutes=10))

    validate >> ensure_baseline >> prune >> thinnify >> retrain >> export
    if len(TARGETS) == 1:
        export >> benchmarks[0] >> record
    else:
        export >> RouteBenchmarkOperator(task_id="route_benchmark", bench_targets=TARGETS,
                                         execution_timeout=timedelta(minutes=10)) >> benchmarks >> record
