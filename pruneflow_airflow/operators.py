"""Airflow operators for the stages of a pruning trial, each a thin call into :mod:`pruneflow.stages`.

    validate >> ensure_baseline >> prune >> thinnify >> retrain >> export >> benchmark >> record

Only small JSON travels through XCom: ``validate`` returns the resolved trial spec (a dict) and every
later operator reads it from there (``spec_task_id``) unless it is given ``spec`` itself; the stages
return paths and a few numbers. The stages exchange their real data as files in the trial folder, so
each task can run in a fresh process on another worker.

Heavy modules (torch, openvino, and ``pruneflow.spec``, which imports torch through ``pruneflow.data``)
are imported inside ``execute`` only: DAG files importing this module stay cheap to parse.

Failures: every operator here has :func:`record_failure` as an ``on_failure_callback``. Airflow 3 runs
it in the task process once the task has *finally* failed (not before a retry; also for an
``execution_timeout``), and it marks the trial ``failed`` in the results DB with the stage and the
reason (``pruneflow.stages.record`` with status ``failed``, keeping what the earlier stages measured,
or ``pruneflow.stages.mark_failed``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, TriggerRule
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from pruneflow_airflow import conf as pf_conf

if TYPE_CHECKING:
    from airflow.sdk import Context

    from pruneflow.spec import TrialSpec

__all__ = [
    "BenchmarkOperator",
    "EnsureBaselineOperator",
    "ExportOperator",
    "PruneOperator",
    "RecordOperator",
    "RetrainOperator",
    "ThinnifyOperator",
    "TrialStageOperator",
    "ValidateTrialOperator",
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


def _write_error(spec: TrialSpec, stage: str, reason: str, exc: Any) -> None:
    trial_dir = spec.trial_dir()
    if trial_dir.is_dir():
        (trial_dir / "error.json").write_text(json.dumps(
            {"stage": stage, "reason": reason, "type": type(exc).__name__ if exc is not None else None}, indent=2))


def record_failure(context: Context) -> None:
    """on_failure_callback: mark the trial failed in the results DB, with the stage and the reason.

    The spec is the one the failed task resolved; when it never got one (the conf itself is invalid),
    the trial id and DB come from the conf / run id / configuration as best as they can."""
    ti = context.get("ti")
    task = context.get("task")
    exc = context.get("exception")
    stage = getattr(ti, "task_id", None) or getattr(task, "task_id", "unknown")
    reason = _failure_reason(exc, task)
    log = getattr(task, "log", None)
    spec = getattr(task, "_trial_spec", None)
    if spec is None and isinstance(task, TrialStageOperator):
        with contextlib.suppress(Exception):  # e.g. the callback runs in another process (heartbeat timeout)
            spec = task.resolve_spec(context)
    try:
        if spec is not None:
            _mark_failed(spec, stage, reason, log)
            _write_error(spec, stage, reason, exc)
            trial_id, db = spec.trial_id, spec.db
        else:
            trial_id, db = _record_failure_without_spec(context, task, stage, reason)
    except Exception:  # a callback must not hide the task's own error
        if log:
            log.exception("pruneflow: could not record the failure of %s in the results DB", stage)
        return
    if log:
        log.info("pruneflow: trial %s marked failed in %s (%s: %s)", trial_id, db, stage, reason)


def _mark_failed(spec: TrialSpec, stage: str, reason: str, log: Any) -> None:
    """Record the trial as failed with everything the earlier stages measured (plan, masked Top-1, sizes):
    ``stages.record`` with an explicit status; ``stages.mark_failed`` (status and reason only) when the
    trial folder is not there."""
    from pruneflow import stages

    if spec.trial_dir().is_dir():
        try:
            stages.record(spec, status="failed", reason=f"{stage}: {reason}")
            return
        except Exception:
            if log:
                log.exception("pruneflow: could not record the failed trial's results; recording its status only")
    stages.mark_failed(spec, stage, reason)


def _record_failure_without_spec(context: Context, task: Any, stage: str, reason: str) -> tuple[str, str]:
    from pruneflow.store import ResultsStore

    conf = getattr(task, "_conf_used", None) or dict(context.get("params") or {})
    trial_id = conf.get("trial_id")
    if not (isinstance(trial_id, str) and pf_conf._ID_RE.match(trial_id)):
        trial_id = pf_conf.trial_id_from_run_id(str(context.get("run_id") or "run"))
    db = conf.get("db")
    db = pf_conf._sqlite_absolute(db) if isinstance(db, str) and db else pf_conf.results_db()
    name = conf.get("name") if isinstance(conf.get("name"), str) and pf_conf._ID_RE.match(conf["name"]) else "trial"
    study = conf.get("study") if isinstance(conf.get("study"), str) else None
    store = ResultsStore(db)
    try:
        store.upsert_trial(trial_id, status="failed", reason=f"{stage}: {reason}", name=name, study=study)
    finally:
        store.close()
    return trial_id, db


def _with_failure_recording(kwargs: dict) -> dict:
    """Put record_failure first among the task's on_failure_callbacks (keeping any given ones)."""
    given = kwargs.get("on_failure_callback")
    callbacks = [] if given is None else list(given) if isinstance(given, Sequence) else [given]
    if record_failure not in callbacks:
        callbacks.insert(0, record_failure)
    kwargs["on_failure_callback"] = callbacks
    return kwargs


def task_threads() -> int:
    """Torch threads of one task: ``[pruneflow] task_threads``; ``auto`` (the default) = the CPU cores
    // ``[core] parallelism`` (at least 1), so the task processes Airflow runs at once never ask for more
    threads than there are cores (oversubscribed OpenMP threads spin against each other: on 2 cores with
    two tasks at once, a rapid trial's torch stages ran 2-10x slower); ``0`` = torch's default (one a core)."""
    from airflow.configuration import conf as airflow_conf

    raw = str(airflow_conf.get("pruneflow", "task_threads", fallback="auto")).strip().lower()
    if raw in ("", "auto"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        parallelism = airflow_conf.getint("core", "parallelism", fallback=cores) or cores
        return max(1, cores // parallelism)
    try:
        return max(0, int(raw))
    except ValueError:
        return 0


@contextlib.contextmanager
def torch_threads():
    """Run the block with :func:`task_threads` torch threads; the previous count is restored after it
    (a task run in-process, e.g. by ``dag.test()``, leaves the process as it found it)."""
    n = task_threads()
    if n <= 0:
        yield
        return
    import torch

    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


@contextlib.contextmanager
def stage_environment(uses_torch: bool = True):
    """What every stage runs in: :func:`torch_threads` (when it runs torch) and the data set cache."""
    from pruneflow import stages

    with stages.dataset_cache(dataset_cache_dir()), torch_threads() if uses_torch else contextlib.nullcontext():
        yield


def _spec_error(exc: Exception) -> AirflowFailException:
    """A spec error is deterministic: fail without retrying."""
    return AirflowFailException(str(exc))


class ValidateTrialOperator(BaseOperator):
    """Resolve the DAG run's conf (its Params) into a TrialSpec and check it before any work.

    Returns the spec as a JSON dict (XCom), with the trial id from the conf or derived from the run id.
    With ``check_plan`` it also loads the data set, builds the model and matches the pruning globs, so a
    typo fails here in seconds rather than after a baseline has been trained.

    :param conf: the flat conf (see :data:`pruneflow_airflow.conf.DEFAULTS`); default: the run's params.
    """

    template_fields: Sequence[str] = ("conf",)
    template_fields_renderers = {"conf": "json"}
    ui_color = "#e8f0fe"

    def __init__(self, *, conf: dict[str, Any] | None = None, check_plan: bool = True, **kwargs: Any) -> None:
        super().__init__(**_with_failure_recording(kwargs))
        self.conf = conf
        self.check_plan = check_plan

    def execute(self, context: Context) -> dict[str, Any]:
        from pruneflow.spec import SpecError

        self._trial_spec = self._conf_used = None  # what record_failure reads: never a previous run's
        conf = self.conf if self.conf is not None else dict(context["params"])
        if isinstance(conf, str):
            conf = json.loads(conf)
        self._conf_used = conf
        try:
            spec = pf_conf.spec_from_conf(conf, context["run_id"])
        except SpecError as exc:
            raise _spec_error(exc) from None
        self._trial_spec = spec
        self.log.info("trial %s: spec resolved; artifacts %s, results DB %s, baseline %s",
                      spec.trial_id, spec.trial_dir(), spec.db, spec.baseline.checkpoint)
        if self.check_plan:
            with stage_environment():
                self._check_plan(spec)
        return spec.model_dump(mode="json")

    def _check_plan(self, spec: TrialSpec) -> None:
        from pruneflow.models import build_model
        from pruneflow.prune import resolve_groups
        from pruneflow.stages import _dataset, group_requests

        try:
            data = _dataset(spec)  # the data set, cached for the trial's later tasks
            model = build_model(spec.model.name, data.in_channels, data.num_classes, **spec.model.kwargs)
            shape = list(spec.model.input_shape or data.input_shape)
            targets = resolve_groups(model, shape, group_requests(spec), spec.pruning.ignored_layers)
        except (ValueError, TypeError) as exc:  # DatasetError, PlanError, unknown model / kwargs
            raise AirflowFailException(f"invalid trial conf: {exc}") from None
        self.log.info("plan check: %s on %s %s, %d layer(s) in %d group(s)", spec.model.name, data.name,
                      shape, len(targets), len(spec.pruning.groups))


class TrialStageOperator(BaseOperator):
    """Base of the stage operators: resolves the trial spec and logs the stage's progress.

    :param spec: the trial spec (dict or JSON string); default: the XCom of ``spec_task_id``.
    :param spec_task_id: the task whose return value is the spec (the ``validate`` task).
    :param artifacts: override the spec's artifact root (e.g. a worker that mounts the volume elsewhere).
    :param db: override the spec's results DB URL.
    """

    template_fields: Sequence[str] = ("spec", "artifacts", "db")
    template_fields_renderers = {"spec": "json"}
    #: the stage runs torch: it runs under :func:`torch_threads` (the torch-free ones never import torch)
    uses_torch: bool = True

    def __init__(
        self,
        *,
        spec: dict[str, Any] | str | None = None,
        spec_task_id: str = "validate",
        artifacts: str | None = None,
        db: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**_with_failure_recording(kwargs))
        self.spec = spec
        self.spec_task_id = spec_task_id
        self.artifacts = artifacts
        self.db = db

    def resolve_spec(self, context: Context) -> TrialSpec:
        from pruneflow.spec import SpecError, parse_spec

        data = self.spec
        if data is None:
            data = context["ti"].xcom_pull(task_ids=self.spec_task_id)
            if not data:
                raise AirflowFailException(f"no trial spec: task {self.spec_task_id!r} returned none")
        if isinstance(data, str):
            data = json.loads(data)
        data = dict(data)
        if self.artifacts:
            data["artifacts"] = self.artifacts
        if self.db:
            data["db"] = self.db
        if not data.get("trial_id"):  # a spec given without id: every task of this run derives the same one
            data["trial_id"] = pf_conf.trial_id_from_run_id(context["run_id"])
        try:
            return parse_spec(data)
        except SpecError as exc:
            raise _spec_error(exc) from None

    def progress(self, msg: str) -> None:
        self.log.info("%s", msg)

    def execute(self, context: Context) -> Any:
        self._trial_spec = None  # what record_failure reads: never a previous run's
        spec = self.resolve_spec(context)
        self._trial_spec = spec
        from pruneflow.spec import SpecError

        try:
            with stage_environment(self.uses_torch):
                return self.run_stage(spec, context)
        except SpecError as exc:
            raise _spec_error(exc) from None

    def run_stage(self, spec: TrialSpec, context: Context) -> Any:
        raise NotImplementedError


def _abandoned(spec: TrialSpec) -> str | None:
    """The reason the retrain stage abandoned this trial, or None (read from its epochs.json)."""
    path = spec.trial_dir() / "epochs.json"
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    return (res.get("reason") or "abandoned") if res.get("abandoned") else None


class EnsureBaselineOperator(TrialStageOperator):
    """Make sure the spec's baseline checkpoint exists: train and register a *named* baseline (one in the
    baselines folder, ``PRUNEFLOW_BASELINES``) the first time it is asked for; a missing explicit path
    fails. Concurrent runs asking for the same new baseline train it once (a file lock), and a baseline
    appears atomically (trained in a temporary folder, then renamed)."""

    template_fields: Sequence[str] = (*TrialStageOperator.template_fields, "epochs", "lr")
    ui_color = "#fef7e0"
    uses_torch = False  # only to train a missing baseline (see _train): a present one costs no torch import

    def __init__(self, *, epochs: int | str = pf_conf.DEFAULTS["baseline_epochs"], lr: float | str = 0.05,
                 batch_size: int = 64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size

    def run_stage(self, spec: TrialSpec, context: Context) -> dict[str, Any]:
        ckpt = Path(spec.baseline.checkpoint)
        if ckpt.is_file():
            return self._existing(ckpt)
        if not pf_conf.is_named_baseline(str(ckpt)):
            raise AirflowFailException(
                f"baseline: checkpoint {ckpt} not found; give a baseline name (trained into "
                f"{pf_conf.baselines_root()} on first use) or train one with `pruneflow baseline --out DIR`")
        try:
            epochs, lr = int(self.epochs), float(self.lr)
        except (TypeError, ValueError):
            raise AirflowFailException(f"baseline_epochs / lr: not numbers ({self.epochs!r}, {self.lr!r})") from None
        import fcntl

        ckpt.parent.parent.mkdir(parents=True, exist_ok=True)
        lock_path = ckpt.parent.with_name(ckpt.parent.name + ".lock")
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits here, then finds the baseline
            if ckpt.is_file():
                return self._existing(ckpt)
            return self._train(spec, ckpt, epochs, lr)

    def _existing(self, ckpt: Path) -> dict[str, Any]:
        meta = ckpt.with_name("baseline.json")
        info = json.loads(meta.read_text()) if meta.is_file() else {}
        self.log.info("baseline: using %s (val Top-1 %s)", ckpt, info.get("val_top1", "?"))
        return {"checkpoint": str(ckpt), "trained": False, "val_top1": info.get("val_top1")}

    def _train(self, spec: TrialSpec, ckpt: Path, epochs: int, lr: float) -> dict[str, Any]:
        from pruneflow.baseline import train_baseline

        final = ckpt.parent
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.log.info("baseline: training %s on %s for %d epoch(s) -> %s", spec.model.name, spec.dataset.name,
                      epochs, final)
        try:
            with torch_threads():
                metrics = train_baseline(spec.model.name, spec.dataset, epochs, tmp, model_kwargs=spec.model.kwargs,
                                         lr=lr, batch_size=self.batch_size, seed=spec.seed,
                                         progress=lambda s: self.progress(f"baseline: {s}"))
            metrics["checkpoint"] = str(ckpt)
            (tmp / "baseline.json").write_text(json.dumps(metrics, indent=2))
            if final.exists():  # an incomplete folder without baseline.pt: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.log.info("baseline: val Top-1 %.2f%%, test Top-1 %.2f%%", metrics["val_top1"], metrics["test_top1"])
        return {"checkpoint": str(ckpt), "trained": True, "val_top1": metrics["val_top1"],
                "test_top1": metrics["test_top1"], "epochs": epochs}


class PruneOperator(TrialStageOperator):
    """prepare (trial folder, baseline fits the data, trial marked running) + prune (plan, masked Top-1)."""

    ui_color = "#fce8e6"

    def run_stage(self, spec: TrialSpec, context: Context) -> dict[str, Any]:
        from pruneflow import stages

        prepared = stages.prepare(spec, self.progress)
        return {**prepared, **stages.prune(spec, self.progress)}


class ThinnifyOperator(TrialStageOperator):
    """Remove the planned filters physically; checked to compute what the masked model computes."""

    ui_color = "#fce8e6"

    def run_stage(self, spec: TrialSpec, context: Context) -> dict[str, Any]:
        from pruneflow import stages

        return stages.thinnify(spec, self.progress)


class RetrainOperator(TrialStageOperator):
    """Fine-tune (0 epochs = rapid trial). A network stuck at chance is abandoned: export and benchmark
    are then skipped and record marks the trial ``abandoned``."""

    ui_color = "#e6f4ea"

    def run_stage(self, spec: TrialSpec, context: Context) -> dict[str, Any]:
        from pruneflow import stages

        return stages.retrain(spec, self.progress)


class _AfterRetrain(TrialStageOperator):
    stage_fn: Callable[..., dict[str, Any]]

    def run_stage(self, spec: TrialSpec, context: Context) -> dict[str, Any]:
        reason = _abandoned(spec)
        if reason:
            raise AirflowSkipException(f"trial {spec.trial_id} was abandoned in retrain: {reason}")
        return self.call_stage(spec)

    def call_stage(self, spec: TrialSpec) -> dict[str, Any]:
        raise NotImplementedError


class ExportOperator(_AfterRetrain):
    """ONNX + OpenVINO IR, parity-checked against torch; skipped when the trial was abandoned."""

    ui_color = "#f3e8fd"

    def call_stage(self, spec: TrialSpec) -> dict[str, Any]:
        from pruneflow import stages

        return stages.export(spec, self.progress)


class BenchmarkOperator(_AfterRetrain):
    """Latency on the spec's device (run it on the device's queue, in a pool of one slot per device);
    skipped when the trial was abandoned. The stage itself is torch-free."""

    ui_color = "#fff0e0"
    uses_torch = False

    def call_stage(self, spec: TrialSpec) -> dict[str, Any]:
        from pruneflow import stages

        return stages.benchmark(spec, self.progress)


class RecordOperator(TrialStageOperator):
    """Upsert the trial's results into the results DB (safe to re-run). Runs when the earlier stages
    succeeded or were skipped (``none_failed``), so an abandoned trial is recorded as ``abandoned``."""

    ui_color = "#e8eaed"
    uses_torch = False

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", TriggerRule.NONE_FAILED)
        super().__init__(**kwargs)

    def run_stage(self, spec: TrialSpec, context: Context) -> dict[str, Any]:
        from pruneflow import stages

        summary = stages.record(spec, self.progress)
        return json.loads(json.dumps(summary, default=str))
