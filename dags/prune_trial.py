"""prune_trial: one DAG run = one pruning trial.

    validate >> ensure_baseline >> prune >> thinnify >> retrain >> export >> benchmark >> record
    validate >> prune_to_export >> benchmark                                  (a rapid trial)

With several benchmark targets (``[pruneflow] devices``, e.g. ``cpu0, cpu1, ncs2``), ``benchmark`` is one
task per target, each on its device's queue and pool, behind a branch that follows the trial's:

    [export, prune_to_export] >> route_benchmark >> [benchmark_cpu0, benchmark_cpu1, benchmark_ncs2] >> record

* **validate** turns the run's conf (the Params below) into a trial spec and checks it — data set,
  model, pruning globs — before anything is trained; the spec travels to the other tasks through XCom.
  It also picks the path: a rapid trial (``epochs`` 0) follows ``prune_to_export``, one that fine-tunes
  follows ``ensure_baseline``, one task per stage; the other path is skipped.
* **prune_to_export** runs ensure_baseline, prune, thinnify, retrain (BatchNorm recalibration only) and
  export of a rapid trial in one task: its stages take seconds, and each task hand-over costs about as
  much (``benchmarks/sweep_throughput.py``). Its log names each stage as it starts; a failure is recorded
  with the stage it happened in.
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

from airflow.sdk import DAG, TriggerRule

from pruneflow.bench_targets import bench_targets
from pruneflow_airflow.deployment import deployment
from pruneflow_airflow.operators import (
    BenchmarkOperator,
    EnsureBaselineOperator,
    ExportOperator,
    PruneOperator,
    PruneToExportOperator,
    RecordOperator,
    RetrainOperator,
    RouteBenchmarkOperator,
    ThinnifyOperator,
    ValidateTrialOperator,
    benchmark_task_id,
)
from pruneflow_airflow.params import trial_params

# The machine-wide CPU pool: a torch stage's task takes one slot. A benchmark has a pool of one slot per device and
# stops its host's torch tasks while it measures (pruneflow.cpu_pause); one in the CPU pool takes every slot.
DEPLOYMENT = deployment()
TARGETS = bench_targets(DEPLOYMENT.devices, DEPLOYMENT.benchmark_queue, DEPLOYMENT.benchmark_pool)

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
    cpu = {"pool": DEPLOYMENT.cpu_pool, "pool_slots": 1}
    # validate's plan check takes a fraction of a second: outside the CPU pool it does not hold a slot that
    # another trial's torch stages wait for (benchmarks/RESULTS.md, "validate outside the CPU pool")
    validate = ValidateTrialOperator(task_id="validate", bench_targets=TARGETS, rapid_task_id="prune_to_export",
                                     staged_task_id="ensure_baseline", execution_timeout=timedelta(minutes=10))
    ensure_baseline = EnsureBaselineOperator(task_id="ensure_baseline", execution_timeout=timedelta(hours=6), **cpu)
    prune = PruneOperator(task_id="prune", execution_timeout=timedelta(hours=1), **cpu)
    thinnify = ThinnifyOperator(task_id="thinnify", execution_timeout=timedelta(hours=1), **cpu)
    retrain = RetrainOperator(task_id="retrain", execution_timeout=timedelta(hours=24), **cpu)
    export = ExportOperator(task_id="export", execution_timeout=timedelta(hours=1), **cpu)
    # a missing named baseline is trained here too, hence ensure_baseline's limit on top of the stages'
    prune_to_export = PruneToExportOperator(task_id="prune_to_export", execution_timeout=timedelta(hours=7), **cpu)
    # after whichever path validate followed (the other one is skipped)
    after_either = {"trigger_rule": TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS}
    # absolute priority: a waiting benchmark is queued before other trials' tasks (in the CPU pool, before
    # the next torch task)
    benchmarks = [BenchmarkOperator(
        task_id=benchmark_task_id(t), queue=t.queue, **(after_either if len(TARGETS) == 1 else {}), pool=t.pool, pool_slots=DEPLOYMENT.benchmark_slots(t.pool),
        priority_weight=100, weight_rule="absolute", retries=2,
        retry_delay=timedelta(seconds=15), execution_timeout=timedelta(hours=1)) for t in TARGETS]
    record = RecordOperator(
        task_id="record", retries=2, retry_delay=timedelta(seconds=10), execution_timeout=timedelta(minutes=10))

    validate >> ensure_baseline >> prune >> thinnify >> retrain >> export
    validate >> prune_to_export
    if len(TARGETS) == 1:
        [export, prune_to_export] >> benchmarks[0] >> record
    else:
        [export, prune_to_export] >> RouteBenchmarkOperator(
            task_id="route_benchmark", bench_targets=TARGETS, execution_timeout=timedelta(minutes=10),
            **after_either) >> benchmarks >> record
