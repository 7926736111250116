"""Airflow operators for the stages of a pruning trial, each a thin call into :mod:`pruneflow.stages`.

    validate >> ensure_baseline >> prune >> thinnify >> retrain >> export >> benchmark >> record
    validate >> prune_to_export >> benchmark        (a rapid trial: no fine-tuning epochs)

Only small JSON travels through XCom: ``validate`` returns the resolved trial spec (a dict) and every
later operator reads it from there (``spec_task_id``) unless it is given ``spec`` itself; the stages
return paths and a few numbers. The stages exchange their real data as files in the trial folder, so
each task can run in a fresh process on another worker.

Heavy modules (torch, openvino) are imported inside ``execute`` only: DAG files importing this module
stay cheap to parse.

What the operators add to the library is Airflow's: where the settings come from (``[pruneflow]``
options), skipping after an abandoned retrain, and failing without retries on a bad spec. Failures:
every operator has :func:`record_failure` as an ``on_failure_callback``; Airflow 3 runs it in the task
process once the task has *finally* failed (not before a retry; also for an ``execution_timeout``), and
it marks the trial ``failed`` with the stage and the reason (:func:`pruneflow.stages.record_failure`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.branch import BaseBranchOperator, BranchMixIn
from airflow.sdk import BaseOperator, TriggerRule
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

if TYPE_CHECKING:
    from airflow.sdk import Context

    from pruneflow.bench_targets import BenchTarget
    from pruneflow.spec import TrialSpec

__all__ = [
    "BenchmarkOperator",
    "EnsureBaselineOperator",
    "ExportOperator",
    "PruneOperator",
    "PruneToExportOperator",
    "RecordOperator",
    "RetrainOperator",
    "RouteBenchmarkOperator",
    "ThinnifyOperator",
    "TrialStageOperator",
    "ValidateTrialOperator",
    "benchmark_task_id",
    "record_failure",
]


def _failure_reason(exc: BaseException | str | None, task: Any) -> str:
    if exc is None:
        return "task failed"
    if isinstance(exc, str):
        return exc
    if type(exc).__name__ == "AirflowTaskTimeout":
        limit = getattr(task, "execution_timeout", None)
        return f"timed out (execution_timeout {limit})" if limit else "timed out"
    return str(exc) or type(exc).__name__


def record_failure(context: Context) -> None:
    """on_failure_callback: mark the trial failed in the results DB, with the stage and the reason.

    The spec is the one the failed task resolved; when it never got one (the conf itself is invalid),
    the trial is recorded from what the conf and the run id say, in the deployment's results DB."""
    from pruneflow import stages

    ti = context.get("ti")
    task = context.get("task")
    exc = context.get("exception")
    # the stage, not the task: benchmark_cpu1 is the benchmark stage, prune_to_export the one it was in
    stage = getattr(task, "_stage_now", None) or getattr(task, "stage", "") or getattr(ti, "task_id", None) or getattr(task, "task_id", "unknown")
    reason = _failure_reason(exc, task)
    log = getattr(task, "log", None)
    spec = getattr(task, "_trial_spec", None)
    if spec is None and isinstance(task, TrialStageOperator):
        with contextlib.suppress(Exception):  # e.g. the callback runs in another process (heartbeat timeout)
            spec = task.resolve_spec(context)
    try:
        if spec is not None:
            stages.record_failure(spec, stage, reason, type(exc).__name__ if isinstance(exc, BaseException) else None,
                                  log.warning if log else stages._quiet)
            trial_id = spec.trial_id
        else:
            conf = getattr(task, "_conf_used", None) or dict(context.get("params") or {})
            trial_id = stages.record_conf_failure(conf, str(context.get("run_id") or "run"), stage, reason)
    except Exception:  # a callback must not hide the task's own error
        if log:
            log.exception("pruneflow: could not record the failure of %s in the results DB", stage)
        return
    if log:
        log.info("pruneflow: trial %s marked failed (%s: %s)", trial_id, stage, reason)


def _with_failure_recording(kwargs: dict) -> dict:
    """Put record_failure first among the task's on_failure_callbacks (keeping any given ones)."""
    given = kwargs.get("on_failure_callback")
    callbacks = [] if given is None else list(given) if isinstance(given, Sequence) else [given]
    if record_failure not in callbacks:
        callbacks.insert(0, record_failure)
    kwargs["on_failure_callback"] = callbacks
    return kwargs


def task_threads() -> int:
    """Torch threads of one task: ``[pruneflow] task_threads`` (default ``auto``: the cores divided by
    ``[core] parallelism``, see :func:`pruneflow.threads.threads_per_task`)."""
    from airflow.configuration import conf as airflow_conf

    from pruneflow.threads import available_cores, threads_per_task

    parallelism = airflow_conf.getint("core", "parallelism", fallback=available_cores()) or available_cores()
    return threads_per_task(airflow_conf.get("pruneflow", "task_threads", fallback="auto"), parallelism)


def dataset_cache_dir() -> str | None:
    """``[pruneflow] dataset_cache``: the folder where the tasks cache built-in data sets (default
    ``$AIRFLOW_HOME/cache/datasets``; empty or ``off``: no cache), so that each task does not build them again."""
    from airflow.configuration import AIRFLOW_HOME
    from airflow.configuration import conf as airflow_conf

    raw = airflow_conf.get("pruneflow", "dataset_cache", fallback=None)
    if raw is None:
        return os.path.join(AIRFLOW_HOME, "cache", "datasets")
    raw = raw.strip()
    return None if raw.lower() in ("", "off", "none", "false") else raw


def pauses_for_benchmarks() -> bool:
    """``[pruneflow] benchmark_pauses_torch_tasks`` (default on): a torch task registers in the host's
    folder of CPU tasks, so that a benchmark on this host stops it while measuring (:mod:`pruneflow.cpu_pause`)."""
    from airflow.configuration import conf as airflow_conf

    return airflow_conf.getboolean("pruneflow", "benchmark_pauses_torch_tasks", fallback=True)


@contextlib.contextmanager
def torch_work(label: str = ""):
    """Torch work in a task: the task's torch threads, and its process registered as a CPU task of the host
    (a benchmark there stops it while measuring) unless ``benchmark_pauses_torch_tasks`` is off."""
    from pruneflow.cpu_pause import registered
    from pruneflow.threads import torch_threads

    with torch_threads(task_threads()), registered(label=label) if pauses_for_benchmarks() else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def stage_environment(uses_torch: bool = True, label: str = ""):
    """What every stage runs in: the data set cache, and :func:`torch_work` when it runs torch."""
    from pruneflow.data import dataset_cache

    with dataset_cache(dataset_cache_dir()), torch_work(label) if uses_torch else contextlib.nullcontext():
        yield


class ValidateTrialOperator(BaseOperator, BranchMixIn):
    """Resolve the DAG run's conf (its Params) into a TrialSpec, within the deployment's limits, and check
    it before any work: the data set, the model and the pruning globs (:func:`pruneflow.stages.check_plan`).

    Returns the spec as a JSON dict (XCom), with the trial id from the conf or derived from the run id.

    :param conf: the flat conf (see :mod:`pruneflow.trial_conf`); default: the run's params.
    :param bench_targets: the deployment's benchmark targets (:func:`pruneflow.bench_targets.bench_targets`):
        the trial's ``benchmark.target`` and device must route to one of them.
    :param rapid_task_id: with ``staged_task_id``, validate is also a branch: a rapid trial
        (:func:`pruneflow.stages.is_rapid`) follows ``rapid_task_id`` (``prune_to_export``), one that
        fine-tunes ``staged_task_id`` (``ensure_baseline``, then one task per stage); the other is skipped.
    """

    inherits_from_skipmixin = True

    template_fields: Sequence[str] = ("conf",)
    template_fields_renderers = {"conf": "json"}
    ui_color = "#e8f0fe"

    def __init__(self, *, conf: dict[str, Any] | None = None, check_plan: bool = True,
                 bench_targets: Sequence[BenchTarget] = (), rapid_task_id: str | None = None,
                 staged_task_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**_with_failure_recording(kwargs))
        if (rapid_task_id is None) != (staged_task_id is None):
            raise ValueError("ValidateTrialOperator: give both rapid_task_id and staged_task_id, or neither")
        self.conf = conf
        self.check_plan = check_plan
        self.bench_targets = tuple(bench_targets)
        self.rapid_task_id = rapid_task_id
        self.staged_task_id = staged_task_id

    def execute(self, context: Context) -> dict[str, Any]:
        from pruneflow import stages
        from pruneflow.bench_targets import route
        from pruneflow.spec import SpecError
        from pruneflow.trial_conf import spec_from_conf

        self._trial_spec = self._conf_used = None  # what record_failure reads: never a previous run's
        conf = self.conf if self.conf is not None else dict(context["params"])
        if isinstance(conf, str):
            conf = json.loads(conf)
        self._conf_used = conf
        try:
            spec = stages.resolve_spec(spec_from_conf(conf, context["run_id"]))
            self._trial_spec = spec
            self.log.info("trial %s: artifacts %s, results DB %s, baseline %s", spec.trial_id, spec.trial_dir(),
                          spec.db, spec.baseline.checkpoint)
            if self.bench_targets:
                target = route(spec.benchmark.device, spec.benchmark.target, self.bench_targets)
                self.log.info("benchmark: queue %s, pool %s", target.queue, target.pool)
            if self.check_plan:
                with stage_environment():
                    self.log.info("plan check: %s", stages.check_plan(spec))
        except SpecError as exc:  # deterministic: fail without retrying
            raise AirflowFailException(str(exc)) from None
        out = spec.model_dump(mode="json")
        if self.rapid_task_id:
            # skipping the other path ends execute with an exception, so the spec is pushed first
            context["ti"].xcom_push(key="return_value", value=out)
            self.do_branch(context, self.rapid_task_id if stages.is_rapid(spec) else self.staged_task_id)
        return out


class TrialStageOperator(BaseOperator):
    """Base of the stage operators: resolves the trial spec and logs the stage's progress.

    :param spec: the trial spec (dict or JSON string); default: the XCom of ``spec_task_id``.
    :param spec_task_id: the task whose return value is the spec (the ``validate`` task).
    """

    template_fields: Sequence[str] = ("spec",)
    template_fields_renderers = {"spec": "json"}
    #: the stage runs torch: it runs with the task's torch threads (the torch-free ones never import torch)
    uses_torch: bool = True
    #: the library function of this stage: ``pruneflow.stages.<stage>(spec, progress)``
    stage: str = ""
    #: the stages whose files this task writes (``pruneflow.stages.STAGE_FILES``): with an object-store
    #: artifact root they are fetched before and uploaded after (:func:`pruneflow.workspace.stage_workspace`)
    artifact_stages: tuple[str, ...] | None = None  # None: (stage,)

    def __init__(self, *, spec: dict[str, Any] | str | None = None, spec_task_id: str = "validate",
                 **kwargs: Any) -> None:
        super().__init__(**_with_failure_recording(kwargs))
        self.spec = spec
        self.spec_task_id = spec_task_id

    def resolve_spec(self, context: Context) -> TrialSpec:
        from pruneflow import settings, stages
        from pruneflow.spec import SpecError, parse_spec

        data = self.spec
        if data is None:
            data = context["ti"].xcom_pull(task_ids=self.spec_task_id)
            if not data:
                raise AirflowFailException(f"no trial spec: task {self.spec_task_id!r} returned none")
        if isinstance(data, str):
            data = json.loads(data)
        data = dict(data)
        if not data.get("trial_id"):  # a spec given without id: every task of this run derives the same one
            data["trial_id"] = settings.safe_id(context["run_id"])
        try:
            return stages.resolve_spec(parse_spec(data))
        except SpecError as exc:
            raise AirflowFailException(str(exc)) from None

    def progress(self, msg: str) -> None:
        self.log.info("%s", msg)

    def execute(self, context: Context) -> Any:
        from pruneflow.spec import SpecError

        self._trial_spec = None  # what record_failure reads: never a previous run's
        spec = self.resolve_spec(context)
        self._trial_spec = spec
        from pruneflow.workspace import stage_workspace

        stages = self.artifact_stages if self.artifact_stages is not None else (self.stage,)
        try:
            with stage_environment(self.uses_torch, f"{spec.trial_id} {self.task_id}"), \
                    stage_workspace(spec, stages, self.progress):
                return self.run_stage(spec, context)
        except SpecError as exc:
            raise AirflowFailException(str(exc)) from None

    def stage_kwargs(self, context: Context) -> dict[str, Any]:
        """Keyword arguments of this stage's library call besides (spec, progress)."""
        return {}

    def run_stage(self, spec: TrialSpec, context: Context) -> Any:
        from pruneflow import stages

        out = getattr(stages, self.stage)(spec, self.progress, **self.stage_kwargs(context))
        return json.loads(json.dumps(out, default=str))


class EnsureBaselineOperator(TrialStageOperator):
    """Make sure the baseline exists: a named baseline is trained the first time it is asked for
    (:func:`pruneflow.stages.ensure_baseline`); a missing explicit path fails."""

    ui_color = "#fef7e0"
    uses_torch = False  # torch is imported only to train a missing baseline (then as torch_work)
    stage = "ensure_baseline"
    artifact_stages = ()  # the baseline lives under PRUNEFLOW_BASELINES, not in the trial folder

    def run_stage(self, spec: TrialSpec, context: Context) -> dict[str, Any]:
        from pruneflow import stages

        if os.path.isfile(spec.baseline.checkpoint):
            return stages.ensure_baseline(spec, self.progress)
        with torch_work(f"{spec.trial_id} {self.task_id}"):  # training: a benchmark stops it too
            return stages.ensure_baseline(spec, self.progress)


class PruneOperator(TrialStageOperator):
    """prepare (trial folder, baseline fits the data, trial marked running) + prune (plan, masked Top-1)."""

    ui_color = "#fce8e6"
    artifact_stages = ("prepare", "prune")

    def run_stage(self, spec: TrialSpec, context: Context) -> dict[str, Any]:
        from pruneflow import stages

        return {**stages.prepare(spec, self.progress), **stages.prune(spec, self.progress)}


class PruneToExportOperator(TrialStageOperator):
    """A rapid trial's torch stages in one task (:func:`pruneflow.stages.prune_to_export`): ensure_baseline,
    prepare, prune, thinnify, retrain (BatchNorm recalibration) and export, each logged as it starts. One
    task instead of five saves four hand-overs per trial; a failure is recorded with the stage it
    happened in. Export is not run when the trial is abandoned (benchmark then skips)."""

    ui_color = "#fce8e6"

    @property
    def artifact_stages(self) -> tuple[str, ...]:  # type: ignore[override]
        from pruneflow.stages import TORCH_STAGES

        return TORCH_STAGES

    def _started(self, stage: str) -> None:
        self._stage_now = stage
        self.log.info("stage %s", stage)

    def execute(self, context: Context) -> Any:
        self._stage_now = None  # what record_failure reads: never a previous run's
        return super().execute(context)

    def run_stage(self, spec: TrialSpec, context: Context) -> dict[str, Any]:
        from pruneflow import stages

        out = stages.prune_to_export(spec, self.progress, self._started)
        return json.loads(json.dumps(out, default=str))


class ThinnifyOperator(TrialStageOperator):
    """Remove the planned filters physically; checked to compute what the masked model computes."""

    ui_color = "#fce8e6"
    stage = "thinnify"


class RetrainOperator(TrialStageOperator):
    """Fine-tune (0 epochs = rapid trial). A network stuck at chance is abandoned: export and benchmark
    are then skipped and record marks the trial ``abandoned``."""

    ui_color = "#e6f4ea"
    stage = "retrain"


class _AfterRetrain(TrialStageOperator):
    def run_stage(self, spec: TrialSpec, context: Context) -> dict[str, Any]:
        from pruneflow import stages

        reason = stages.abandoned_reason(spec)
        if reason:
            raise AirflowSkipException(f"trial {spec.trial_id} was abandoned in retrain: {reason}")
        return super().run_stage(spec, context)


class ExportOperator(_AfterRetrain):
    """ONNX + OpenVINO IR, parity-checked against torch; skipped when the trial was abandoned."""

    ui_color = "#f3e8fd"
    stage = "export"


class BenchmarkOperator(_AfterRetrain):
    """Latency on the spec's device (run it on the device's queue, in a pool of one slot per device);
    skipped when the trial was abandoned. The stage itself is torch-free."""

    ui_color = "#fff0e0"
    uses_torch = False
    stage = "benchmark"

    def stage_kwargs(self, context: Context) -> dict[str, Any]:
        # who measured, in latency.json and the results DB: the library knows the host and the environment,
        # only the task knows its Celery queue (Airflow tells the worker process nothing else)
        return {"worker": {"queue": self.queue}}


def benchmark_task_id(target: BenchTarget) -> str:
    """The benchmark task of a target: ``benchmark`` for a deployment's only, unnamed target."""
    return f"benchmark_{target.name}" if target.name else "benchmark"


class RouteBenchmarkOperator(BaseBranchOperator):
    """Follow the benchmark task of the trial's target (:func:`pruneflow.bench_targets.route`: its
    ``benchmark.target``, else the legacy worker for MYRIAD, else the default) and skip the others.
    Skipped itself when a fine-tuning trial was abandoned (export skipped); after a rapid trial abandoned
    in prune_to_export it runs, and the benchmark it follows skips itself."""

    ui_color = "#fff0e0"

    def __init__(self, *, bench_targets: Sequence[BenchTarget], spec_task_id: str = "validate", **kwargs: Any) -> None:
        super().__init__(**_with_failure_recording(kwargs))
        self.bench_targets = tuple(bench_targets)
        self.spec_task_id = spec_task_id

    def choose_branch(self, context: Context) -> str:
        from pruneflow.bench_targets import route
        from pruneflow.spec import SpecError, parse_spec

        try:
            spec = parse_spec(context["ti"].xcom_pull(task_ids=self.spec_task_id) or {})
            target = route(spec.benchmark.device, spec.benchmark.target, self.bench_targets)
        except SpecError as exc:
            raise AirflowFailException(str(exc)) from None
        self.log.info("trial %s: benchmark on %s (queue %s)", spec.trial_id, target.name, target.queue)
        return benchmark_task_id(target)


class RecordOperator(TrialStageOperator):
    """Upsert the trial's results into the results DB (safe to re-run). Runs when the earlier stages
    succeeded or were skipped (``none_failed``), so an abandoned trial is recorded as ``abandoned``."""

    ui_color = "#e8eaed"
    uses_torch = False
    stage = "record"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", TriggerRule.NONE_FAILED)
        super().__init__(**kwargs)
