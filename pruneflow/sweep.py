"""Sweeps: search per-group sparsities with Optuna's ask/tell, without round barriers.

The search state lives in the results DB through Optuna's RDB storage, so a study resumes where
it stopped and any process (an Airflow task, the CLI) can ask or tell. A sweep's trials are split
into ``parallel`` *lanes* (:func:`lanes`); each lane runs its trials one after another — ask one, run
it (in-process here, or as a ``prune_trial`` DAG run), tell the search what the results DB recorded,
ask the next — so a finished trial is followed by the next ask at once, whatever the other lanes do.
Succeeded trials are told their objective values, abandoned ones PRUNED, failed or missing ones FAIL;
a failure never stops the sweep. Each asked trial carries its slot (``<run key>/<index>``), so a lane
that runs again (a retried or cleared task) finds the trial it had asked instead of asking another.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pruneflow.analysis import (
    best_rows,
    budget_ms,
    dense_row,
    feasible,
    measured,
    promotion_order,
    study_rows,
)
from pruneflow.auto_space import AutoSpace
from pruneflow.constants import MAX_SPARSITY
from pruneflow.latency_model import LatencyModelSpec
from pruneflow.spec import (
    EarlyStopping,
    Id,
    ModelSpec,
    TrialSpec,
    format_validation_error,
    parse_spec,
)

Objective = Literal["latency", "top1", "top1_under_latency", "latency_over_top1", "pareto"]
OBJECTIVES = ("latency", "top1", "top1_under_latency", "latency_over_top1", "pareto")
SAMPLERS = ("tpe", "random", "grid", "nsga2")
Progress = Callable[[str], None]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SparsityRange(_Strict):
    name: Id = Field(..., description="group name, e.g. layer3")
    patterns: list[str] = Field(..., min_length=1, description="glob patterns over layer names")
    low: float = Field(0.0, ge=0.0, le=MAX_SPARSITY, description="lowest sparsity searched")
    high: float = Field(..., ge=0.0, le=MAX_SPARSITY, description="highest sparsity searched")
    step: float | None = Field(None, gt=0, le=MAX_SPARSITY, description="grid step (needed by the grid sampler)")

    @model_validator(mode="after")
    def _order(self) -> SparsityRange:
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        return self

    def grid(self) -> list[float]:
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [round(self.low + i * self.step, 6) for i in range(n + 1)]


class LatencyBudget(_Strict):
    value: float = Field(..., gt=0, description="the budget, in the unit below")
    unit: Literal["ms", "fraction"] = Field(..., description="ms, or a fraction of the dense model's latency")


class PromotionStage(_Strict):
    epochs: int = Field(..., ge=1, le=1000, description="fine-tuning epochs of the promoted trials")
    top: int = Field(..., ge=1, le=100_000, description="how many of the previous stage's best trials are promoted")
    lr: float | None = Field(None, gt=0, le=10, description="fine-tuning learning rate (default: the base trial's)")


#: Objectives with a latency bound a prediction can miss: the budget, or the best feasible latency so far
SKIPPABLE = ("top1_under_latency", "latency_over_top1")
#: A lane runs the candidate after this many skipped in a row, so a sweep whose bound nothing meets ends
MAX_SKIPS = 20

#: Objectives whose ranking changes with fine-tuning (Top-1 is part of them): promotion means something.
PROMOTABLE = ("top1", "top1_under_latency", "latency_over_top1", "pareto")


class SweepSpec(_Strict):
    study: Id = Field(..., description="name of the study; an existing study is continued")
    base: dict[str, Any] = Field(default_factory=dict, description="trial spec every trial starts from")
    space: list[SparsityRange] = Field(..., min_length=1, description="the sparsity range of each group (a sweep "
                                       "spec file may say `auto` instead: chosen from a sensitivity profile)")
    auto: AutoSpace | None = Field(None, description="with space: auto, how the space is chosen from a "
                                   "sensitivity profile; kept beside the explicit space it chose")
    objective: Objective = Field(
        "pareto", description="latency (minimise), top1 (maximise), top1_under_latency (needs a latency budget), "
        "latency_over_top1 (needs a Top-1 floor) or pareto (both)")
    latency_budget: LatencyBudget | None = Field(
        None, description="for top1_under_latency: {value, unit: ms | fraction of the dense model's latency}")
    top1_floor: float | None = Field(None, ge=0, le=100, description="for latency_over_top1: the lowest acceptable "
                                     "Top-1 (percent)")
    sampler: Literal["tpe", "random", "grid", "nsga2"] = Field(
        "tpe", description="tpe (multi-objective TPE for pareto), random, grid (needs a step on every range) or "
        "nsga2")
    n_trials: int = Field(24, ge=1, le=100_000, description="trials to run in this invocation")
    parallel: int = Field(2, ge=1, le=64, description="trials in flight at once (lanes)")
    seed: int = Field(0, ge=0, description="sampler seed")
    include_dense: bool = Field(True, description="measure the dense model first (reference and Pareto mark)")
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    latency_model: LatencyModelSpec | None = Field(
        None, description="predict each trial's latency before it is measured (a table of `pruneflow latency-table`) "
        "and, with skip_infeasible, do not run candidates predicted to miss the budget; a sweep spec file only")
    promote: list[PromotionStage] = Field(
        default_factory=list, description="screen, then fine-tune: after the rapid trials, each stage fine-tunes "
        "the previous stage's best `top` trials for `epochs` (successive halving), e.g. "
        "[{epochs: 2, top: 6}, {epochs: 8, top: 2}]")

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        names = [r.name for r in self.space]
        if len(set(names)) != len(names):
            raise ValueError(f"space: duplicate group names {names}")
        if self.objective == "top1_under_latency" and self.latency_budget is None:
            raise ValueError("latency_budget: required for objective top1_under_latency ({value, unit: ms|fraction})")
        if self.objective == "latency_over_top1" and self.top1_floor is None:
            raise ValueError("top1_floor: required for objective latency_over_top1 (Top-1 in percent)")
        if self.latency_budget and self.latency_budget.unit == "fraction" and not self.include_dense:
            raise ValueError("latency_budget: unit 'fraction' needs include_dense: true (the dense latency)")
        if self.promote and self.objective not in PROMOTABLE:
            raise ValueError(f"promote: objective {self.objective!r} does not rank by Top-1, so fine-tuning cannot "
                             f"change which trial is best (promote with: {', '.join(PROMOTABLE)})")
        if self.latency_model and self.latency_model.skip_infeasible and self.objective not in SKIPPABLE:
            raise ValueError(f"latency_model.skip_infeasible: objective {self.objective!r} has no latency bound to "
                             f"miss (allowed with: {', '.join(SKIPPABLE)})")
        if self.sampler == "grid":
            missing = [r.name for r in self.space if r.step is None]
            if missing:
                raise ValueError(f"space: sampler grid needs a step on every range (missing on {missing})")
        return self

    def trial_spec(self) -> TrialSpec:
        """The base trial spec, validated; the space decides its pruning groups."""
        return TrialSpec.model_validate({**self.base, "pruning": {**self.base.get("pruning", {}), "groups": []}})

    @property
    def directions(self) -> list[str]:
        return {"latency": ["minimize"], "top1": ["maximize"], "top1_under_latency": ["maximize"],
                "latency_over_top1": ["minimize"], "pareto": ["minimize", "maximize"]}[self.objective]


class SweepError(ValueError):
    pass


def _resolve_auto_space(data: dict[str, Any]) -> dict[str, Any]:
    """``space: auto`` replaced by the explicit space its profile gives (:mod:`pruneflow.auto_space`)."""
    import json
    from pathlib import Path

    from pruneflow.auto_space import auto_space
    from pruneflow.sensitivity import PROFILE_VERSION

    if not isinstance(data.get("auto"), dict):
        raise SweepError("auto: required with space: auto, e.g. {profile: out/sensitivity/NAME/profile.json, "
                         "tolerance: 1.0}")
    try:
        auto = AutoSpace.model_validate(data["auto"])
    except ValidationError as exc:
        raise SweepError(format_validation_error(exc, prefix="auto.").replace("invalid trial spec", "invalid sweep")
                         ) from None
    path = Path(auto.profile)  # relative: to the working directory
    try:
        profile = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SweepError(f"auto.profile: {path}: cannot read a sensitivity profile ({exc}); make one with "
                         "`pruneflow sensitivity SPEC.yaml`") from None
    if not isinstance(profile, dict) or profile.get("version") != PROFILE_VERSION or not isinstance(
            profile.get("sets"), list):
        raise SweepError(f"auto.profile: {path} is not a sensitivity profile of version {PROFILE_VERSION} "
                         "(profile.json of `pruneflow sensitivity`)")
    base = data.get("base") if isinstance(data.get("base"), dict) else {}
    model_spec = base.get("model") if isinstance(base.get("model"), dict) else {}
    model = model_spec.get("name", ModelSpec.model_fields["name"].default)
    if profile.get("model") != model:
        raise SweepError(f"auto.profile: {path} profiles model {profile.get('model')!r}, the sweep prunes "
                         f"{model!r}")
    space = auto_space(profile, auto)
    if not space:
        raise SweepError(f"space: auto chose no group from {path}: every set drops more than auto.tolerance "
                         f"{auto.tolerance} points at its first sparsity, or saves less than auto.min_saved_pct "
                         f"{auto.min_saved_pct}% of the dense latency")
    return {**data, "space": space, "auto": auto.model_dump()}


def parse_sweep(data: dict[str, Any]) -> SweepSpec:
    if not isinstance(data, dict):
        raise SweepError(f"sweep: expected a mapping, got {type(data).__name__}")
    if data.get("space") == "auto":
        data = _resolve_auto_space(data)
    try:
        sweep = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SweepError(format_validation_error(exc).replace("invalid trial spec", "invalid sweep")) from None
    try:
        sweep.trial_spec()
    except ValidationError as exc:
        raise SweepError(format_validation_error(exc, prefix="base.").replace("invalid trial spec", "invalid sweep")) from None
    if sweep.latency_model is not None:
        from pruneflow.latency_model import check_table

        try:
            check_table(latency_table(sweep), sweep, sweep.latency_model.table)
        except ValueError as exc:
            raise SweepError(f"invalid sweep:\n  {exc}") from None
    return sweep


def latency_table(sweep: SweepSpec) -> dict:
    """The sweep's latency table (read once per process and version of the file)."""
    path = sweep.latency_model.table
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        mtime = 0  # load_table names the missing file
    return _read_table(path, mtime)


@functools.lru_cache(maxsize=4)
def _read_table(path: str, _mtime: int) -> dict:
    from pruneflow.latency_model import load_table

    return load_table(path)


def load_sweep(path) -> SweepSpec:
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    return parse_sweep(yaml.safe_load(path.read_text()) or {})


# ---------------------------------------------------------------- the Optuna side


def _sampler(sweep: SweepSpec, seed: int):
    """Constraints reach TPE and NSGA-II through Trial.set_constraint (Optuna 5)."""
    import optuna

    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sweep.sampler == "grid":  # the sweep's seed only: it shuffles the grid that stored grid ids index
        return _BudgetedGridSampler({r.name: r.grid() for r in sweep.space}, seed=sweep.seed)
    if sweep.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, 2 * sweep.parallel))
    # constant liar: trials still running count as bad ones, so lanes asking at once do not all get one point
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                      n_startup_trials=max(4, min(10, sweep.n_trials // 3)))


def _grid_sampler_class():
    import optuna

    class BudgetedGridSampler(optuna.samplers.GridSampler):
        """A grid sampler that does not call study.stop() when the grid is done: in ask/tell the
        sweep's trial budget ends the sweep (and stop() outside optimize() raises)."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return BudgetedGridSampler


def _BudgetedGridSampler(*args, **kwargs):  # noqa: N802 - a class built lazily (optuna is imported late)
    return _grid_sampler_class()(*args, **kwargs)


def storage_url(sweep: SweepSpec) -> str:
    return sweep.trial_spec().db


def _storage(url: str):
    """One Optuna storage (and so one engine) per results DB in a process; a forked process makes its own
    (pooled connections must not be shared across a fork)."""
    return _storage_in(url, os.getpid())


@functools.lru_cache(maxsize=8)
def _storage_in(url: str, pid: int):
    import optuna

    return optuna.storages.get_storage(url)


def open_study(sweep: SweepSpec):
    """Create the study, or load it to continue; the sweep spec is kept in the study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from pruneflow.store import ResultsStore

    ResultsStore(storage_url(sweep)).close()  # creates a SQLite file's folder and our tables
    study = optuna.create_study(storage=_storage(storage_url(sweep)), study_name=sweep.study, load_if_exists=True,
                                directions=sweep.directions, sampler=optuna.samplers.RandomSampler())
    # Each ask opens the study afresh (another task, another process): a sampler seeded with the seed alone
    # would draw its first point again every time, so the seed moves on with the trials asked so far.
    study.sampler = _sampler(sweep, sweep.seed + len(study.get_trials(deepcopy=False)))
    have = [d.name.lower() for d in study.directions]
    if have != sweep.directions:
        raise SweepError(f"study {sweep.study!r} exists with directions {have}; objective {sweep.objective!r} "
                         f"needs {sweep.directions}: use another study name")
    study.set_user_attr("sweep_spec", sweep.model_dump(mode="json"))
    return study


def _distributions(sweep: SweepSpec) -> dict:
    import optuna

    return {r.name: optuna.distributions.FloatDistribution(r.low, r.high, step=r.step) for r in sweep.space}


def trial_id_for(sweep: SweepSpec, number: int) -> str:
    return f"{sweep.study}-{number:04d}"


#: A dense trial that fails is asked again this many times in all; a fraction latency budget cannot be
#: computed without its latency, so after the last one the sweep stops with the reasons.
DENSE_ATTEMPTS = 2


def _needs_dense(sweep: SweepSpec, study) -> bool:
    """Whether the dense model must be (re)measured: the study has no dense trial yet, or a fraction budget
    lost its only ones. Raises SweepError when a fraction budget has no dense latency after DENSE_ATTEMPTS
    failed dense trials: every trial would be told infeasible."""
    dense = [t for t in study.trials if t.user_attrs.get("dense")]
    if not dense:
        return True
    if any(t.state.name in ("COMPLETE", "RUNNING", "WAITING") for t in dense):
        return False
    if not _fraction_budget(sweep):
        return False  # the dense model is only a reference for the report: no retry needed
    if len(dense) < DENSE_ATTEMPTS:
        return True
    reasons = "; ".join(f"{t.user_attrs.get('trial_id')}: {t.user_attrs.get('reason') or t.state.name.lower()}"
                        for t in dense)
    raise SweepError(f"study {sweep.study!r}: the dense trial failed {len(dense)} times ({reasons}); "
                     f"latency_budget {sweep.latency_budget.value} {sweep.latency_budget.unit} of the dense model "
                     "cannot be computed without it, so the sweep stops instead of telling every trial infeasible")


def _fraction_budget(sweep: SweepSpec) -> bool:
    return sweep.latency_budget is not None and sweep.latency_budget.unit == "fraction"


def _trial_spec_for(sweep: SweepSpec, number: int, params: dict[str, float], predicted: float | None = None) -> dict:
    """The trial spec (a JSON-able dict) that runs the asked trial ``number`` with these sparsities (and the
    latency the sweep's latency model predicted for it, recorded beside the measured one)."""
    base = sweep.trial_spec().model_dump(mode="json")
    base["pruning"]["groups"] = [{"name": r.name, "patterns": list(r.patterns), "sparsity": float(params[r.name])}
                                 for r in sweep.space if params[r.name] > 0]
    base.update({"name": sweep.study, "trial_id": trial_id_for(sweep, number), "study": sweep.study,
                 "sweep": {"optuna_trial_number": number, "keep_at_chance": bool(sweep.promote),
                           "early_stopping": sweep.early_stopping.model_dump()}})
    if predicted is not None:
        base["sweep"]["predicted_latency_ms"] = predicted
    return base


def lanes(n_trials: int, parallel: int) -> list[list[int]]:
    """The slot indexes of each lane: lane i runs slots i, i + parallel, ... one after another."""
    return [list(range(i, n_trials, parallel)) for i in range(min(parallel, n_trials))]


def slot_key(run_key: str, index: int) -> str:
    return f"{run_key}/{index}"


def lane_items(sweep: SweepSpec, n_trials: int | None = None, specs: list[dict] | None = None) -> list[list[dict]]:
    """What each of the ``parallel`` lanes runs: screening slots (asked when a lane gets to them), or the
    trials of a promotion stage (``specs``, asked already) dealt out in turn."""
    if specs is not None:
        return [[{"spec": s} for s in specs[i::sweep.parallel]] for i in range(min(sweep.parallel, len(specs)))]
    n = sweep.n_trials if n_trials is None else n_trials
    return [[{"slot": j} for j in lane] for lane in lanes(n, sweep.parallel)]


def lane_told(sweep: SweepSpec, items: list[dict], run_key: str) -> list[dict]:
    """What the search was told of a lane's trials (every attempt of a slot), for the lane task's XCom."""
    study = open_study(sweep)
    trials = study.get_trials(deepcopy=False)
    keys = {slot_key(run_key, int(i["slot"])) for i in items if "slot" in i}
    numbers = {i["spec"]["sweep"]["optuna_trial_number"] for i in items if "spec" in i}
    return [{"trial_id": t.user_attrs.get("trial_id"), "state": t.state.name} for t in trials
            if t.number in numbers or t.user_attrs.get("slot") in keys]


@contextlib.contextmanager
def ask_lock(sweep: SweepSpec):
    """Asks of one study on SQLite, one at a time: Optuna's RDB storage hands a waiting (enqueued) trial to
    the first ask that marks it running with a row lock (SELECT ... FOR UPDATE), which SQLite lacks, so
    there two lanes asking at once both got the dense trial. A file lock beside the DB file (SQLite is on
    one host) keeps them apart; PostgreSQL needs nothing more."""
    from sqlalchemy.engine import make_url

    url = make_url(storage_url(sweep))
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        from filelock import FileLock

        with FileLock(f"{url.database}.ask.lock"):
            yield
    else:
        yield


def start_sweep(sweep: SweepSpec, run_key: str, screening: bool = True,
                active: Callable[[str], bool] = lambda _key: False, progress: Progress | None = None) -> None:
    """Before a sweep run's lanes start: tell the search what became of trials that earlier, ended runs asked
    and never told (a killed or cleared sweep task), so no trial stays RUNNING for ever; then, for a
    screening run, put the dense model first in line when the study needs it.

    ``active(run key)`` says whether the run that asked a trial still runs (its trials are left alone).
    Raises SweepError when a fraction budget has no dense latency after DENSE_ATTEMPTS dense trials."""
    tell_unfinished(sweep, lambda owner: owner != run_key and not (owner and active(owner)),
                    "stale: asked by sweep run {owner}, which ended before telling it", progress)
    with ask_lock(sweep):
        study = open_study(sweep)
        if screening and sweep.include_dense and _needs_dense(sweep, study):
            study.enqueue_trial({r.name: 0.0 for r in sweep.space}, user_attrs={"dense": True})


def tell_unfinished(sweep: SweepSpec, owned: Callable[[str | None], bool], reason: str,
                    progress: Progress | None = None) -> list[dict]:
    """Tell every RUNNING trial whose asking run (``sweep_run``) ``owned`` selects what the results DB has for
    it — FAIL with ``reason`` (``{owner}`` filled in) when it has no result. A trial that another run told
    meanwhile (two runs of one study starting at once) is left as that run told it."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    from pruneflow.store import ResultsStore

    study = open_study(sweep)
    store = ResultsStore(storage_url(sweep))
    told = []
    try:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.user_attrs.get("sweep_run")
            if not owned(owner):
                continue
            try:
                told.append(_tell(sweep, study, store, t.number,
                                  t.user_attrs.get("trial_id") or trial_id_for(sweep, t.number),
                                  missing=reason.format(owner=owner or "?")))
            except UpdateFinishedTrialError:
                continue
            if progress:
                progress(f"tell {told[-1]['trial_id']} (left unfinished by {owner or '?'}): {told[-1]['state']}")
    finally:
        store.close()
    return told


def check_lanes(sweep: SweepSpec, run_key: str, planned: int, finished: int, progress: Progress | None = None) -> None:
    """After a sweep run's lanes: tell what a failed lane left unfinished, then raise SweepError if any lane
    failed — naming the dense trials' reasons when a fraction budget lost its dense model for good."""
    tell_unfinished(sweep, lambda owner: owner == run_key, "its sweep lane failed before telling it", progress)
    if finished >= planned:
        return
    study = open_study(sweep)
    if _fraction_budget(sweep) and _dense_latency(study) is None:
        _needs_dense(sweep, study)
    raise SweepError(f"study {sweep.study!r}: {planned - finished} of {planned} lanes of sweep run {run_key} failed "
                     "(their run_trials task logs say why); their unfinished trials were told failed")


class _LatencyState:
    """What the sweep's latency model knows at an ask: the model fitted on the study's measured trials, its
    measured error (the largest relative error of the predictions recorded beside measurements) over how many
    trials, and the latency bound a candidate must meet (None: none known yet)."""

    def __init__(self, sweep: SweepSpec):
        from pruneflow.latency_model import LatencyModel

        rows = study_rows(storage_url(sweep), sweep.study)
        done = measured(rows)
        self.spec = sweep.latency_model
        self.model = LatencyModel(latency_table(sweep), [(r["targets"], r["latency_median_ms"]) for r in done],
                                  self.spec.method)
        checked = [r for r in done if r.get("latency_predicted_ms") is not None]
        self.n = len(checked)
        self.error = max((abs(r["latency_predicted_ms"] - r["latency_median_ms"]) / r["latency_median_ms"]
                          for r in checked), default=None)
        self.bound, self.what = None, ""
        if sweep.objective == "top1_under_latency":
            dense = dense_row(rows)
            self.bound, self.what = budget_ms(sweep, dense["latency_median_ms"] if dense else None), "the budget"
        elif sweep.objective == "latency_over_top1":
            ok = feasible(sweep, rows)
            self.bound = min((r["latency_median_ms"] for r in ok), default=None)
            self.what = "the best measured feasible latency"

    def skip_reason(self, predicted: float) -> str | None:
        """Why a candidate predicted at ``predicted`` ms is not run, or None to run it."""
        if not self.spec.skip_infeasible or self.n < self.spec.min_measured or self.bound is None:
            return None
        if predicted <= self.bound * (1 + self.error):
            return None
        return (f"predicted infeasible: {predicted:.4f} ms predicted, above {self.what} {self.bound:.4f} ms by more "
                f"than the latency model's measured error {100 * self.error:.1f}% (the largest of {self.n} trials)")


def _skip(sweep: SweepSpec, study, trial, predicted: float, reason: str, bound: float) -> dict:
    """Record a candidate not run (status ``skipped``) and tell the search it is infeasible, its constraint
    being the predicted excess over the bound (ms); the objective gets the worst Top-1 (0) or its predicted
    latency."""
    from pruneflow.store import ResultsStore

    spec = _trial_spec_for(sweep, trial.number, trial.params, predicted)
    store = ResultsStore(storage_url(sweep))
    try:
        store.upsert_trial(spec["trial_id"], status="skipped", reason=reason, name=sweep.study, study=sweep.study,
                           model=spec["model"]["name"], dataset=spec["dataset"]["name"], spec_json=spec,
                           latency_predicted_ms=predicted)
    finally:
        store.close()
    trial.set_user_attr("reason", reason)
    trial.set_user_attr("constraint", predicted - bound)
    trial.set_constraint(sweep.objective, predicted - bound)
    study.tell(trial, [0.0] if sweep.objective == "top1_under_latency" else [predicted])
    return spec


def _ask(sweep: SweepSpec, study, slot: str | None, run_key: str, progress: Progress | None = None) -> dict:
    """Ask the search for a trial to run. With a latency model each candidate's latency is predicted first
    and, with skip_infeasible, one predicted to miss the bound is recorded skipped and another is asked (at
    most :data:`MAX_SKIPS` in a row); the dense model is always run."""
    state = _LatencyState(sweep) if sweep.latency_model else None
    for skipped in range(MAX_SKIPS + 1):
        trial = study.ask(_distributions(sweep))
        tid = trial_id_for(sweep, trial.number)
        trial.set_user_attr("trial_id", tid)
        trial.set_user_attr("sweep_run", run_key)
        if slot is not None:
            trial.set_user_attr("slot", slot)
        if state is None:
            return _trial_spec_for(sweep, trial.number, trial.params)
        predicted = round(state.model.predict(trial.params), 6)
        trial.set_user_attr("predicted_latency_ms", predicted)
        reason = None if trial.user_attrs.get("dense") or skipped == MAX_SKIPS else state.skip_reason(predicted)
        if reason is None:
            return _trial_spec_for(sweep, trial.number, trial.params, predicted)
        _skip(sweep, study, trial, predicted, reason, state.bound)
        if progress:
            progress(f"skip {tid}: {reason}")
    raise AssertionError("unreachable: the last candidate is always run")


def current_trial(sweep: SweepSpec, items: list[dict], run_key: str, progress: Progress | None = None) -> dict | None:
    """The trial a lane runs now: the first of its items not told yet, asked when it has not been.

    An item is ``{"slot": i}`` (a screening trial, asked when the lane gets to it) or ``{"spec": ...}``
    (a trial asked already: a promoted one). Idempotent: a lane that runs again gets the trial it had asked.
    A slot whose dense trial failed asks the dense model again while a fraction budget needs it (Raises
    SweepError after DENSE_ATTEMPTS). None when every item of the lane is told."""
    study = open_study(sweep)
    trials = study.get_trials(deepcopy=False)
    by_slot: dict[str, Any] = {}
    for t in trials:
        if "slot" in t.user_attrs:
            by_slot[t.user_attrs["slot"]] = t  # the latest trial of a slot wins (a dense retry)
    for item in items:
        if "spec" in item:
            if not trials[item["spec"]["sweep"]["optuna_trial_number"]].state.is_finished():
                return item["spec"]
            continue
        key = slot_key(run_key, int(item["slot"]))
        t = by_slot.get(key)
        if t is None or (t.user_attrs.get("dense") and t.state.name == "FAIL" and _fraction_budget(sweep)
                         and _needs_dense(sweep, study)):
            with ask_lock(sweep):
                if t is not None:
                    study.enqueue_trial({r.name: 0.0 for r in sweep.space}, user_attrs={"dense": True})
                spec = _ask(sweep, study, key, run_key, progress)
            if progress:
                progress(f"ask {spec['trial_id']} (slot {key}): "
                         + (", ".join(f"{g['name']} {g['sparsity']:.3f}" for g in spec["pruning"]["groups"]) or "dense"))
            return spec
        if not t.state.is_finished():
            return _trial_spec_for(sweep, t.number, t.params, t.user_attrs.get("predicted_latency_ms"))
    return None


def ask_trials(sweep: SweepSpec, k: int, run_key: str = "ask") -> list[dict]:
    """Ask the search for k trials at once (slots 0..k-1 of ``run_key``); their trial specs as dicts."""
    start_sweep(sweep, run_key)
    return [current_trial(sweep, [{"slot": i}], run_key) for i in range(k)]


def promote_round(sweep: SweepSpec, stage: int, progress: Progress | None = None, run_key: str = "promote") -> list[dict]:
    """Promotion stage ``stage`` (1-based): the previous stage's best ``top`` trials for the objective
    (:func:`pruneflow.analysis.promotion_order`), each as a new trial with the same sparsities fine-tuned for
    the stage's epochs, told to the search like any trial (it is asked with its parent's parameters).
    Asking again for a stage returns the trials already asked (a re-run DAG task asks no new ones)."""
    if not 1 <= stage <= len(sweep.promote):
        raise SweepError(f"promote: no stage {stage} (the sweep has {len(sweep.promote)})")
    st = sweep.promote[stage - 1]
    study = open_study(sweep)
    rows = study_rows(storage_url(sweep), sweep.study)
    previous = [r for r in rows if (r.get("stage") or 0) == stage - 1]
    chosen = promotion_order(sweep, previous)[: st.top]
    asked = {t.user_attrs.get("trial_id"): t for t in study.trials}
    specs = []
    for parent in chosen:
        tid = f"{sweep.study}-s{stage}-{parent['trial_id'].rsplit('-', 1)[-1]}"
        spec = dict(parent["spec_json"])
        spec["finetune"] = {**spec["finetune"], "epochs": st.epochs, **({"lr": st.lr} if st.lr else {})}
        if tid in asked:
            number = asked[tid].number
        else:
            params = {r.name: float(parent["targets"].get(r.name, 0.0)) for r in sweep.space}
            with ask_lock(sweep):
                study.enqueue_trial(params, user_attrs={"stage": stage, "parent": parent["trial_id"]})
                trial = study.ask(_distributions(sweep))
            trial.set_user_attr("trial_id", tid)
            trial.set_user_attr("sweep_run", run_key)
            number = trial.number
        spec.update({"trial_id": tid, "sweep": {**spec["sweep"], "optuna_trial_number": number, "stage": stage,
                                                 "parent": parent["trial_id"], "keep_at_chance": False}})
        specs.append(spec)
    if progress:
        progress(f"promotion stage {stage}: {len(specs)} of {len(previous)} trials fine-tuned for {st.epochs} "
                 f"epoch(s): {', '.join(s['sweep']['parent'] for s in specs)}")
    return specs


def _dense_latency(study) -> float | None:
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("dense") and "latency_ms" in t.user_attrs:
            return float(t.user_attrs["latency_ms"])
    return None


def objective_values(sweep: SweepSpec, latency: float, top1: float) -> list[float]:
    return {"latency": [latency], "top1": [top1], "top1_under_latency": [top1], "latency_over_top1": [latency],
            "pareto": [latency, top1]}[sweep.objective]


def constraint(sweep: SweepSpec, latency: float, top1: float, budget: float | None) -> float | None:
    """<= 0 when feasible (Optuna's convention), None for unconstrained objectives."""
    if sweep.objective == "top1_under_latency":
        return latency - budget if budget is not None else math.inf
    if sweep.objective == "latency_over_top1":
        return sweep.top1_floor - top1
    return None


#: tell_trial's answer while a fraction budget waits for the dense latency: tell again a little later
WAIT = "WAIT"


def tell_trial(sweep: SweepSpec, spec: dict, progress: Progress | None = None) -> dict:
    """Tell the search what the results DB recorded for this trial (telling twice is harmless).

    With a fraction latency budget a succeeded trial is told only once the dense latency is known (its
    constraint needs it): until then the answer's state is :data:`WAIT` (a lane asks again later); SweepError when the dense trial failed for good."""
    from pruneflow.store import ResultsStore

    study = open_study(sweep)
    number = spec["sweep"]["optuna_trial_number"]
    frozen = study.get_trials(deepcopy=False)[number]
    if frozen.state.is_finished():
        return {"trial_id": spec["trial_id"], "state": frozen.state.name, "already": True}
    store = ResultsStore(storage_url(sweep))
    try:
        succeeded = (store.get_trial(spec["trial_id"]) or {}).get("status") == "succeeded"
        if succeeded and _fraction_budget(sweep) and not frozen.user_attrs.get("dense") and _dense_latency(study) is None:
            _needs_dense(sweep, study)  # raises when the dense trial failed for good
            return {"trial_id": spec["trial_id"], "state": WAIT}
        told = _tell(sweep, study, store, number, spec["trial_id"])
    finally:
        store.close()
    if progress:
        progress(f"tell {told['trial_id']}: {told['state']}"
                 + (f" latency {told['latency_ms']:.3f} ms, Top-1 {told['top1']:.2f}%" if told["state"] == "COMPLETE"
                    else f" ({told.get('reason') or told.get('status')})"))
    return told


def _tell(sweep: SweepSpec, study, store, number: int, trial_id: str, missing: str = "no result recorded") -> dict:
    from optuna.trial import TrialState

    row = store.get_trial(trial_id) or {}
    status = row.get("status")
    latency, top1 = row.get("latency_median_ms"), row.get("top1_final")
    if status == "succeeded" and latency is not None and top1 is not None:
        trial = _trial_handle(sweep, study, number)
        trial.set_user_attr("latency_ms", latency)
        trial.set_user_attr("top1", top1)
        trial.set_user_attr("top1_source", row.get("top1_source"))  # recalibrated or fine-tuned
        c = constraint(sweep, latency, top1, budget_ms(sweep, _dense_latency(study)))
        if c is not None:
            trial.set_user_attr("constraint", c)
            trial.set_constraint(sweep.objective, c)
        study.tell(number, objective_values(sweep, latency, top1))
        state = "COMPLETE"
    elif status == "abandoned":
        study.tell(number, state=TrialState.PRUNED)
        state = "PRUNED"
    else:
        row = {**row, "reason": row.get("reason") or missing}
        _trial_handle(sweep, study, number).set_user_attr("reason", row["reason"])
        study.tell(number, state=TrialState.FAIL)
        state = "FAIL"
    return {"trial_id": trial_id, "state": state, "status": status, "latency_ms": latency, "top1": top1,
            "reason": row.get("reason")}


def _trial_handle(sweep: SweepSpec, study, number: int):
    """A live handle on trial ``number`` (to set its attributes before it is told), through the storage's
    public lookups."""
    import optuna

    storage = _storage(storage_url(sweep))
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                               number)
    return optuna.trial.Trial(study, trial_id)


def run_lane(sweep: SweepSpec, items: list[dict], run_key: str, runner: Callable[[dict], None],
             progress: Progress | None = None) -> list[dict]:
    """Run one lane in this process: each trial asked, run by ``runner`` and told before the next is asked."""
    told = []
    while (spec := current_trial(sweep, items, run_key, progress)) is not None:
        runner(spec)
        answer = tell_trial(sweep, spec, progress)
        if answer["state"] == WAIT:  # one lane in one process runs the dense trial first: this cannot wait
            raise SweepError(f"{spec['trial_id']}: the dense latency is not known yet and no other lane measures it")
        told.append(answer)
    return told


def run_sweep(sweep: SweepSpec, progress: Progress = lambda _m: None,
              runner: Callable[[dict], None] | None = None) -> dict:
    """Run the sweep in this process (the CLI, tests), its trials one after another: one lane. The
    Airflow DAG runs ``parallel`` lanes of the same functions with prune_trial DAG runs instead."""
    import uuid

    from pruneflow.stages import TrialFailed, run_trial

    def run_in_process(spec: dict) -> None:
        try:
            run_trial(parse_spec(spec), progress)
        except TrialFailed as exc:
            progress(f"trial {spec['trial_id']} failed: {exc}")

    runner = runner or run_in_process
    run_key = f"cli-{uuid.uuid4().hex[:12]}"
    start_sweep(sweep, run_key, progress=progress)
    run_lane(sweep, [{"slot": i} for i in range(sweep.n_trials)], run_key, runner, progress)
    for stage in range(1, len(sweep.promote) + 1):
        specs = promote_round(sweep, stage, progress, run_key)
        run_lane(sweep, [{"spec": s} for s in specs], run_key, runner, progress)
    return summarize(sweep)


def summarize(sweep: SweepSpec) -> dict:
    from pruneflow.store import STATUSES

    rows = study_rows(storage_url(sweep), sweep.study)
    return {"study": sweep.study, "objective": sweep.objective, "trials": len(rows),
            "by_status": {s: sum(r["status"] == s for r in rows) for s in STATUSES if s != "running"},
            "best": [r["trial_id"] for r in best_rows(sweep, rows)]}

