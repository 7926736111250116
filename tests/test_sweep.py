"""Sweeps: objectives, samplers, constraints, failures, resume, and bad configs.

Most tests drive the real Optuna search and results DB with a synthetic trial runner (latency and
Top-1 are known functions of the sparsities), so the search logic is checked exactly and fast; one
test runs real rapid trials in-process."""

import math

import optuna
import pytest
from pg_server import pg_database, pg_server, postgres_url  # noqa: F401  (the PostgreSQL fixtures)

from pruneflow import analysis
from pruneflow.spec import parse_spec
from pruneflow.store import ResultsStore
from pruneflow.sweep import SweepError, ask_trials, parse_sweep, run_sweep, tell_trial

SPACE = [{"name": "a", "patterns": ["layer1.*.conv1"], "low": 0.0, "high": 0.8, "step": 0.2},
         {"name": "b", "patterns": ["layer3.*.conv1"], "low": 0.0, "high": 0.8, "step": 0.2}]


def _base(tmp_path):
    return {"baseline": {"checkpoint": "unused.pt"}, "artifacts": str(tmp_path / "trials"),
            "db": f"sqlite:///{tmp_path / 'r.db'}"}


def synthetic_latency(a, b):
    return 1.0 - 0.3 * a - 0.6 * b


def synthetic_top1(a, b):
    return 90.0 - 30 * a * a - 60 * b * b


def synthetic_runner(fail_when=None):
    """Records a trial as the stages would, with known latency and Top-1."""

    def run(spec_dict):
        spec = parse_spec(spec_dict)
        s = {g.name: g.sparsity for g in spec.pruning.groups}
        a, b = s.get("a", 0.0), s.get("b", 0.0)
        store = ResultsStore(spec.db)
        common = dict(study=spec.study, spec_json=spec.model_dump(mode="json"),
                      sparsities_json={k: {"target": v, "achieved": v} for k, v in s.items()})
        if fail_when and fail_when(a, b):
            store.upsert_trial(spec.trial_id, status="failed", reason="export: parity failed", **common)
        else:
            store.upsert_trial(spec.trial_id, status="succeeded", latency_median_ms=synthetic_latency(a, b),
                               top1_final=synthetic_top1(a, b), top1_masked=synthetic_top1(a, b) - 20,
                               macs_after=int(1e6 * (1 - a) * (1 - b)) + 1, **common)
        store.close()

    return run


def _sweep(tmp_path, **kw):
    data = {"study": kw.pop("study", "s"), "base": _base(tmp_path), "space": SPACE, "n_trials": 6, "parallel": 2,
            "seed": 1, **kw}
    return parse_sweep(data)


BUDGET_MS = {"latency_budget": {"value": 0.7, "unit": "ms"}}
BUDGET_FRACTION = {"latency_budget": {"value": 0.6, "unit": "fraction"}}
FLOOR = {"top1_floor": 75.0}
CASES = [  # every objective with TPE, every sampler on pareto, the constrained ones with NSGA-II and random
    ("latency", {}, "tpe"), ("top1", {}, "tpe"), ("pareto", {}, "tpe"),
    ("top1_under_latency", BUDGET_MS, "tpe"), ("top1_under_latency", BUDGET_FRACTION, "tpe"),
    ("latency_over_top1", FLOOR, "tpe"),
    ("pareto", {}, "random"), ("pareto", {}, "grid"), ("pareto", {}, "nsga2"),
    ("top1_under_latency", BUDGET_FRACTION, "nsga2"), ("latency_over_top1", FLOOR, "random"),
    ("top1", {}, "grid"),
]


@pytest.mark.parametrize("objective,extra,sampler", CASES, ids=[f"{o}-{s}-{i}" for i, (o, _, s) in enumerate(CASES)])
def test_objectives_and_samplers(tmp_path, objective, extra, sampler):
    sweep = _sweep(tmp_path, objective=objective, sampler=sampler, **extra)
    summary = run_sweep(sweep, runner=synthetic_runner())
    rows = analysis.study_rows(sweep.trial_spec().db, "s")
    assert len(rows) == 6 and summary["trials"] == 6
    assert rows[0]["dense"]  # the dense reference runs first
    ok = [r for r in rows if r["status"] == "succeeded"]
    best = analysis.best_rows(sweep, rows)
    assert summary["best"] == [r["trial_id"] for r in best]
    lat = lambda r: r["latency_median_ms"]  # noqa: E731
    top = lambda r: r["top1_final"]  # noqa: E731
    if objective == "latency":
        assert lat(best[0]) == min(map(lat, ok))
    elif objective == "top1":
        assert top(best[0]) == max(map(top, ok))
    elif objective == "pareto":
        for r in ok:  # nothing measured dominates a front member
            for f in best:
                assert not (lat(r) < lat(f) and top(r) > top(f))
    elif objective == "top1_under_latency":
        budget = 0.7 if extra["latency_budget"]["unit"] == "ms" else 0.6 * 1.0
        feasible = [r for r in ok if lat(r) <= budget]
        if feasible:
            assert lat(best[0]) <= budget and top(best[0]) == max(map(top, feasible))
        else:
            assert best == []
    else:
        feasible = [r for r in ok if top(r) >= 75.0]
        assert best and top(best[0]) >= 75.0 and lat(best[0]) == min(map(lat, feasible))
    # the search was told every trial
    study = optuna.load_study(study_name="s", storage=sweep.trial_spec().db)
    assert all(t.state.is_finished() for t in study.trials)
    if objective in ("top1_under_latency", "latency_over_top1"):
        for t in study.trials:
            if t.state.name == "COMPLETE":
                c = t.user_attrs["constraint"]
                feasible_here = (t.user_attrs["latency_ms"] <= budget if objective == "top1_under_latency"
                                 else t.user_attrs["top1"] >= 75.0)
                assert (c <= 0) == feasible_here


def test_constrained_objective_never_reports_an_infeasible_best(tmp_path):
    # a budget nothing meets: no best at all, rather than the least bad infeasible one
    sweep = _sweep(tmp_path, objective="top1_under_latency", latency_budget={"value": 0.01, "unit": "ms"})
    summary = run_sweep(sweep, runner=synthetic_runner())
    assert summary["best"] == []


def test_failed_trials_do_not_stop_the_sweep_and_the_search_is_told(tmp_path):
    sweep = _sweep(tmp_path, objective="latency", sampler="random")
    summary = run_sweep(sweep.model_copy(update={"n_trials": 10}), runner=synthetic_runner(fail_when=lambda a, b: b >= 0.6))
    assert summary["trials"] == 10
    study = optuna.load_study(study_name="s", storage=sweep.trial_spec().db)
    states = {t.user_attrs["trial_id"]: t.state.name for t in study.trials}
    rows = {r["trial_id"]: r for r in analysis.study_rows(sweep.trial_spec().db, "s")}
    failed = [tid for tid, r in rows.items() if r["status"] == "failed"]
    assert failed and all(states[t] == "FAIL" for t in failed)
    assert all(rows[b]["status"] == "succeeded" for b in summary["best"])


def test_a_failed_dense_trial_is_retried_for_a_fraction_budget(tmp_path):
    """The fraction budget needs the dense latency: a dense trial that fails once is asked again, and the
    sweep's best are measured against the retried dense model."""
    failures = {"dense": 0}

    def fail_dense_once(a, b):
        if a == 0 and b == 0 and failures["dense"] == 0:
            failures["dense"] += 1
            return True
        return False

    sweep = _sweep(tmp_path, objective="top1_under_latency", sampler="random", **BUDGET_FRACTION)
    summary = run_sweep(sweep, runner=synthetic_runner(fail_when=fail_dense_once))
    study = optuna.load_study(study_name="s", storage=sweep.trial_spec().db)
    dense = [t for t in study.trials if t.user_attrs.get("dense")]
    assert [t.state.name for t in dense] == ["FAIL", "COMPLETE"]
    assert summary["best"] and all(synthetic_latency(*_sparsities(tmp_path, b)) <= 0.6 for b in summary["best"])


def test_a_dense_trial_that_keeps_failing_stops_the_sweep_with_the_reason(tmp_path):
    sweep = _sweep(tmp_path, objective="top1_under_latency", sampler="random", **BUDGET_FRACTION)
    with pytest.raises(SweepError, match=r"the dense trial failed 2 times \(s-0000: export: parity failed; "
                                         r"s-0001: export: parity failed\).*latency_budget 0.6 fraction"):
        run_sweep(sweep, runner=synthetic_runner(fail_when=lambda a, b: a == 0 and b == 0))
    # with a budget in ms the dense model is only a reference: its failure does not stop the sweep
    ms = _sweep(tmp_path, study="ms", objective="top1_under_latency", sampler="random", **BUDGET_MS)
    assert run_sweep(ms, runner=synthetic_runner(fail_when=lambda a, b: a == 0 and b == 0))["trials"] == 6


def _sparsities(tmp_path, trial_id):
    row = ResultsStore(f"sqlite:///{tmp_path / 'r.db'}").get_trial(trial_id)
    s = {k: v["target"] for k, v in row["sparsities_json"].items()}
    return s.get("a", 0.0), s.get("b", 0.0)


def test_trial_with_no_result_is_told_failed(tmp_path):
    sweep = _sweep(tmp_path, objective="latency", n_trials=2)
    specs = ask_trials(sweep, 2)
    told = [tell_trial(sweep, s) for s in specs]  # nothing ran: no rows
    assert [t["state"] for t in told] == ["FAIL", "FAIL"]
    assert all(t["reason"] == "no result recorded" for t in told)
    again = [tell_trial(sweep, s) for s in specs]  # telling twice is harmless
    assert all(t["already"] for t in again)


def test_two_runs_starting_at_once_tell_a_stale_trial_once(tmp_path):
    """Two runs of one study start together (two nightly runs straddling a minute): both find the trial an
    ended run left RUNNING. The one that looks second finds it told by the first and leaves it as told."""
    from pruneflow.sweep import current_trial, open_study, tell_unfinished

    sweep = _sweep(tmp_path, objective="latency", n_trials=2)
    current_trial(sweep, [{"slot": 0}], "killed")
    other = optuna.load_study(study_name="s", storage=sweep.trial_spec().db)

    def told_meanwhile(owner):  # the other run tells the trial between this run's look and its tell
        other.tell(0, state=optuna.trial.TrialState.FAIL)
        return owner == "killed"

    assert tell_unfinished(sweep, told_meanwhile, "stale: {owner}") == []
    assert [t.state.name for t in open_study(sweep).trials] == ["FAIL"]
    assert tell_unfinished(sweep, lambda owner: True, "stale: {owner}") == []  # nothing RUNNING any more


def test_study_resumes(tmp_path):
    sweep = _sweep(tmp_path, objective="pareto", n_trials=4)
    run_sweep(sweep, runner=synthetic_runner())
    run_sweep(sweep.model_copy(update={"n_trials": 3}), runner=synthetic_runner())
    rows = analysis.study_rows(sweep.trial_spec().db, "s")
    assert [r["trial_id"] for r in rows] == [f"s-{i:04d}" for i in range(7)]
    assert sum(r["dense"] for r in rows) == 1  # the dense reference is measured once per study
    with pytest.raises(SweepError, match="directions"):
        from pruneflow.sweep import open_study

        open_study(_sweep(tmp_path, objective="latency"))


def test_grid_sampler_covers_the_grid(tmp_path):
    sweep = _sweep(tmp_path, objective="latency", sampler="grid", n_trials=25, include_dense=False)
    run_sweep(sweep, runner=synthetic_runner())
    rows = analysis.study_rows(sweep.trial_spec().db, "s")
    seen = {(round(r["targets"].get("a", 0), 2), round(r["targets"].get("b", 0), 2)) for r in rows}
    assert len(seen) == 25
    assert analysis.best_rows(sweep, rows)[0]["targets"] == {"a": 0.8, "b": 0.8}


BAD = [
    ({"space": []}, "space", "at least 1"),
    ({"space": [{**SPACE[0], "high": 0.99}]}, "space.0.high", "less than or equal to 0.95"),
    ({"space": [{**SPACE[0], "low": -0.1}]}, "space.0.low", "greater than or equal to 0"),
    ({"space": [{**SPACE[0], "low": 0.6, "high": 0.2}]}, "space.0", "above high"),
    ({"objective": "speed"}, "objective", "'latency', 'top1', 'top1_under_latency', 'latency_over_top1' or 'pareto'"),
    ({"sampler": "cmaes"}, "sampler", "'tpe', 'random', 'grid' or 'nsga2'"),
    ({"objective": "top1_under_latency", "latency_budget": {"value": 5}}, "latency_budget.unit", "Field required"),
    ({"objective": "top1_under_latency"}, "latency_budget", "required for objective top1_under_latency"),
    ({"objective": "latency_over_top1"}, "top1_floor", "required"),
    ({"sampler": "grid", "space": [{**SPACE[0], "step": None}]}, "space", "needs a step"),
    ({"n_trials": 0}, "n_trials", "greater than or equal to 1"),
    ({"parallel": 0}, "parallel", "greater than or equal to 1"),
    ({"study": "a b"}, "study", "letters"),
    ({"base": {"benchmark": {"threads": 0}}}, "base.benchmark.threads", "greater than or equal to 1"),
]


@pytest.mark.parametrize("change,field,allowed", BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_sweep_configs_name_the_field(tmp_path, change, field, allowed):
    data = {"study": "s", "base": _base(tmp_path), "space": SPACE, **change}
    with pytest.raises(SweepError) as exc:
        parse_sweep(data)
    assert field in str(exc.value) and allowed in str(exc.value)


def test_real_rapid_trials_in_process(tmp_path, baseline_dir):
    base = {"dataset": {"name": "digits", "image_size": 16}, "baseline": {"checkpoint": str(baseline_dir / "baseline.pt")},
            "benchmark": {"rounds": 2, "iterations": 20, "warmup": 5}, "artifacts": str(tmp_path / "t"),
            "db": f"sqlite:///{tmp_path / 'r.db'}"}
    sweep = parse_sweep({"study": "real", "base": base, "space": SPACE, "n_trials": 3, "parallel": 3,
                         "objective": "pareto", "sampler": "random"})
    summary = run_sweep(sweep)
    assert summary["by_status"]["succeeded"] == 3
    rows = analysis.study_rows(base["db"], "real")
    assert all(not math.isnan(r["latency_median_ms"]) for r in rows)
    assert rows[0]["dense"] and rows[0]["macs_after"] > max(r["macs_after"] for r in rows[1:])


def _race_sweep(db, artifacts):
    return parse_sweep({"study": "race", "base": {"baseline": {"checkpoint": "unused.pt"}, "artifacts": artifacts,
                                                   "db": db}, "space": SPACE, "n_trials": 4, "parallel": 4})


def _ask_slot(db, artifacts, slot, barrier, out):
    from pruneflow.sweep import current_trial, open_study

    sweep = _race_sweep(db, artifacts)
    open_study(sweep)  # warm: the asks below start together
    barrier.wait()
    spec = current_trial(sweep, [{"slot": slot}], "run")
    out.put((spec["sweep"]["optuna_trial_number"], not spec["pruning"]["groups"]))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_lanes_asking_at_once_get_one_trial_each(tmp_path, backend, request):
    """Four lanes (processes) ask at the same moment, with the dense trial waiting in the queue: each gets
    its own trial and exactly one gets the dense model. On SQLite, pruneflow's file lock keeps the asks
    apart (without it Optuna gave the waiting trial to two of them, 2 runs in 5); on a real PostgreSQL
    server Optuna's own row lock does (this variant passes without the file lock too)."""
    import multiprocessing

    from pruneflow.sweep import start_sweep

    db = f"sqlite:///{tmp_path / 'r.db'}" if backend == "sqlite" else request.getfixturevalue("pg_database")()
    artifacts = str(tmp_path / "trials")
    start_sweep(_race_sweep(db, artifacts), "run")
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_ask_slot, args=(db, artifacts, i, barrier, out)) for i in range(4)]
    for p in procs:
        p.start()
    asked = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    numbers = [n for n, _ in asked]
    assert sorted(numbers) == [0, 1, 2, 3], asked
    assert sum(dense for _, dense in asked) == 1, asked
    study = optuna.load_study(study_name="race", storage=db)
    assert [t.state.name for t in study.trials] == ["RUNNING"] * 4
    assert sorted(t.user_attrs["slot"] for t in study.trials) == [f"run/{i}" for i in range(4)]
