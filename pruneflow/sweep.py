"""Sweeps: search per-group sparsities with Optuna's ask/tell, one round of trials at a time.

The search state lives in the results DB through Optuna's RDB storage, so a study resumes where
it stopped and any process (an Airflow task, the CLI) can ask or tell. A round asks `parallel`
trials, runs them (in-process here, or as `prune_trial` DAG runs), then tells the search what the
results DB recorded: succeeded trials their objective values, abandoned ones PRUNED, failed or
missing ones FAIL — a failure never stops the sweep.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pruneflow.analysis import best_rows, budget_ms, promotion_order, study_rows
from pruneflow.constants import MAX_SPARSITY
from pruneflow.spec import (
    EarlyStopping,
    Id,
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


#: Objectives whose ranking changes with fine-tuning (Top-1 is part of them): promotion means something.
PROMOTABLE = ("top1", "top1_under_latency", "latency_over_top1", "pareto")


class SweepSpec(_Strict):
    study: Id = Field(..., description="name of the study; an existing study is continued")
    base: dict[str, Any] = Field(default_factory=dict, description="trial spec every trial starts from")
    space: list[SparsityRange] = Field(..., min_length=1, description="the sparsity range of each group")
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
    parallel: int = Field(2, ge=1, le=64, description="trials per round, run at once")
    seed: int = Field(0, ge=0, description="sampler seed")
    include_dense: bool = Field(True, description="measure the dense model first (reference and Pareto mark)")
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
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


def parse_sweep(data: dict[str, Any]) -> SweepSpec:
    if not isinstance(data, dict):
        raise SweepError(f"sweep: expected a mapping, got {type(data).__name__}")
    try:
        sweep = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SweepError(format_validation_error(exc).replace("invalid trial spec", "invalid sweep")) from None
    try:
        sweep.trial_spec()
    except ValidationError as exc:
        raise SweepError(format_validation_error(exc, prefix="base.").replace("invalid trial spec", "invalid sweep")) from None
    return sweep


def load_sweep(path) -> SweepSpec:
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    return parse_sweep(yaml.safe_load(path.read_text()) or {})


# ---------------------------------------------------------------- the Optuna side


def _sampler(sweep: SweepSpec):
    """Constraints reach TPE and NSGA-II through Trial.set_constraint (Optuna 5)."""
    import optuna

    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=sweep.seed)
    if sweep.sampler == "grid":
        return _BudgetedGridSampler({r.name: r.grid() for r in sweep.space}, seed=sweep.seed)
    if sweep.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=sweep.seed, population_size=max(4, 2 * sweep.parallel))
    return optuna.samplers.TPESampler(seed=sweep.seed, multivariate=True,
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


def open_study(sweep: SweepSpec):
    """Create the study, or load it to continue; the sweep spec is kept in the study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from pruneflow.store import ResultsStore

    ResultsStore(storage_url(sweep)).close()  # creates a SQLite file's folder and our tables
    study = optuna.create_study(storage=storage_url(sweep), study_name=sweep.study, load_if_exists=True,
                                directions=sweep.directions, sampler=_sampler(sweep))
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
    """Whether the next round must (re)measure the dense model. Raises SweepError when a fraction budget
    has no dense latency after DENSE_ATTEMPTS failed dense trials: every trial would be told infeasible."""
    dense = [t for t in study.trials if t.user_attrs.get("dense")]
    if not dense:
        return True
    if any(t.state.name in ("COMPLETE", "RUNNING", "WAITING") for t in dense):
        return False
    fraction = sweep.latency_budget is not None and sweep.latency_budget.unit != "ms"
    if not fraction:
        return False  # the dense model is only a reference for the report: no retry needed
    if len(dense) < DENSE_ATTEMPTS:
        return True
    reasons = "; ".join(f"{t.user_attrs.get('trial_id')}: {t.user_attrs.get('reason') or t.state.name.lower()}"
                        for t in dense)
    raise SweepError(f"study {sweep.study!r}: the dense trial failed {len(dense)} times ({reasons}); "
                     f"latency_budget {sweep.latency_budget.value} {sweep.latency_budget.unit} of the dense model "
                     "cannot be computed without it, so the sweep stops instead of telling every trial infeasible")


def ask_round(sweep: SweepSpec, k: int) -> list[dict]:
    """Ask the search for k trials; returns their trial specs as dicts (JSON-able). The dense model comes
    first in a study's first round, and again after a failed dense trial when the budget is a fraction."""
    study = open_study(sweep)
    if sweep.include_dense and _needs_dense(sweep, study):
        study.enqueue_trial({r.name: 0.0 for r in sweep.space}, user_attrs={"dense": True})
    specs = []
    for _ in range(k):
        trial = study.ask(_distributions(sweep))
        base = sweep.trial_spec().model_dump(mode="json")
        groups = [{"name": r.name, "patterns": list(r.patterns), "sparsity": float(trial.params[r.name])}
                  for r in sweep.space if trial.params[r.name] > 0]
        base["pruning"]["groups"] = groups
        tid = trial_id_for(sweep, trial.number)
        base.update({"name": sweep.study, "trial_id": tid, "study": sweep.study,
                     "sweep": {"optuna_trial_number": trial.number, "keep_at_chance": bool(sweep.promote),
                               "early_stopping": sweep.early_stopping.model_dump()}})
        trial.set_user_attr("trial_id", tid)
        specs.append(base)
    return specs


def promote_round(sweep: SweepSpec, stage: int, progress: Progress | None = None) -> list[dict]:
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
            study.enqueue_trial(params, user_attrs={"stage": stage, "parent": parent["trial_id"]})
            trial = study.ask(_distributions(sweep))
            trial.set_user_attr("trial_id", tid)
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


def tell_round(sweep: SweepSpec, specs: list[dict], progress: Progress | None = None) -> list[dict]:
    """Tell the search what the results DB recorded for these trials. Dense first (budget reference)."""
    from optuna.trial import TrialState

    from pruneflow.store import ResultsStore

    study = open_study(sweep)
    store = ResultsStore(storage_url(sweep))
    told = []
    try:
        ordered = sorted(specs, key=lambda s: 0 if not s["pruning"]["groups"] else 1)
        for spec in ordered:
            number = spec["sweep"]["optuna_trial_number"]
            frozen = study.get_trials(deepcopy=False)[number]
            if frozen.state.is_finished():
                told.append({"trial_id": spec["trial_id"], "state": frozen.state.name, "already": True})
                continue
            row = store.get_trial(spec["trial_id"]) or {}
            status = row.get("status")
            latency, top1 = row.get("latency_median_ms"), row.get("top1_final")
            if status == "succeeded" and latency is not None and top1 is not None:
                trial = _trial_handle(study, number)
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
                _trial_handle(study, number).set_user_attr("reason", row.get("reason") or "no result recorded")
                study.tell(number, state=TrialState.FAIL)
                state = "FAIL"
            told.append({"trial_id": spec["trial_id"], "state": state, "status": status,
                         "latency_ms": latency, "top1": top1, "reason": row.get("reason")})
            if progress:
                progress(f"tell {spec['trial_id']}: {state}"
                         + (f" latency {latency:.3f} ms, Top-1 {top1:.2f}%" if state == "COMPLETE" else
                            f" ({row.get('reason') or status})"))
    finally:
        store.close()
    return told


def _trial_handle(study, number: int):
    import optuna

    trial_id = study.get_trials(deepcopy=False)[number]._trial_id
    return optuna.trial.Trial(study, trial_id)


def remaining(sweep: SweepSpec, started: int) -> int:
    return max(0, sweep.n_trials - started)


def run_sweep(sweep: SweepSpec, progress: Progress = lambda _m: None,
              runner: Callable[[dict], None] | None = None) -> dict:
    """Run the sweep in rounds in this process (the CLI, tests); the Airflow DAG drives the same
    ask_round/tell_round with prune_trial DAG runs instead."""
    from pruneflow.stages import TrialFailed, run_trial

    def run_in_process(spec: dict) -> None:
        try:
            run_trial(parse_spec(spec), progress)
        except TrialFailed as exc:
            progress(f"trial {spec['trial_id']} failed: {exc}")

    runner = runner or run_in_process
    started = 0
    rounds = 0
    while remaining(sweep, started):
        k = min(sweep.parallel, remaining(sweep, started))
        specs = ask_round(sweep, k)
        rounds += 1
        progress(f"round {rounds}: {', '.join(s['trial_id'] for s in specs)}")
        for spec in specs:
            runner(spec)
        tell_round(sweep, specs, progress)
        started += k
    for stage in range(1, len(sweep.promote) + 1):
        specs = promote_round(sweep, stage, progress)
        for spec in specs:
            runner(spec)
        tell_round(sweep, specs, progress)
    return summarize(sweep)


def summarize(sweep: SweepSpec) -> dict:

    rows = study_rows(storage_url(sweep), sweep.study)
    return {"study": sweep.study, "objective": sweep.objective, "trials": len(rows),
            "by_status": {s: sum(r["status"] == s for r in rows) for s in ("succeeded", "failed", "abandoned")},
            "best": [r["trial_id"] for r in best_rows(sweep, rows)]}

