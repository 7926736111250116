"""Screen, then fine-tune: promotion stages pick the previous stage's best trials for the objective, run
them fine-tuned as new trials (parent and stage recorded), tell the search, and make the study's answer."""

from __future__ import annotations

import pytest

from pruneflow import analysis
from pruneflow.spec import parse_spec
from pruneflow.store import ResultsStore
from pruneflow.sweep import SweepError, open_study, parse_sweep, run_sweep

SPACE = [{"name": "a", "patterns": ["layer1.*.conv1"], "low": 0.0, "high": 0.8, "step": 0.2},
         {"name": "b", "patterns": ["layer3.*.conv1"], "low": 0.0, "high": 0.8, "step": 0.2}]


def _row(tid, latency, top1, dense=False, stage=0):
    return {"trial_id": tid, "status": "succeeded", "latency_median_ms": latency, "top1_final": top1,
            "dense": dense, "stage": stage}


class _Sweep:
    def __init__(self, objective, **kw):
        self.objective, self.top1_floor, self.latency_budget = objective, kw.get("top1_floor"), None


ROWS = [_row("dense", 2.0, 99.0, dense=True), _row("p1", 1.0, 90.0), _row("p2", 0.5, 80.0),
        _row("p3", 0.9, 60.0), _row("p4", 0.3, 70.0), _row("p5", 0.6, 85.0), _row("p6", 1.5, 95.0),
        {**_row("bad", 0.1, 99.0), "status": "failed"}]


@pytest.mark.parametrize("objective, kw, expected", [
    ("top1", {}, ["p6", "p1", "p5", "p2", "p4", "p3"]),
    ("latency_over_top1", {"top1_floor": 82.0}, ["p5", "p1", "p6", "p2", "p4", "p3"]),
    # front p4 (0.3, 70), p2 (0.5, 80), p5 (0.6, 85), p1 (1.0, 90), p6 (1.5, 95): ends first, then by crowding
    ("pareto", {}, ["p4", "p6", "p1", "p2", "p5", "p3"]),
])
def test_promotion_order_for_each_objective(objective, kw, expected):
    assert [r["trial_id"] for r in analysis.promotion_order(_Sweep(objective, **kw), ROWS)] == expected


def test_crowding_distance_matches_a_hand_computation():
    # front (0.3,-70) (0.5,-80) (0.6,-85) (1.0,-90) (1.5,-95): latency range 1.2, Top-1 range 25
    d = analysis.crowding_distance([(0.3, -70), (0.5, -80), (0.6, -85), (1.0, -90), (1.5, -95)])
    assert d[0] == d[4] == float("inf")
    assert d[1] == pytest.approx((0.6 - 0.3) / 1.2 + (85 - 70) / 25)
    assert d[2] == pytest.approx((1.0 - 0.5) / 1.2 + (90 - 80) / 25)
    assert d[3] == pytest.approx((1.5 - 0.6) / 1.2 + (95 - 85) / 25)


def rapid_top1(a, b):
    return 90.0 - 30 * a * a - 60 * b * b


def finetuned_top1(a, b, epochs):
    return 97.0 - 4 * a - 8 * b * b + 0.1 * epochs  # fine-tuning recovers heavy layer1 pruning well


def runner(spec_dict):
    spec = parse_spec(spec_dict)
    s = {g.name: g.sparsity for g in spec.pruning.groups}
    a, b = s.get("a", 0.0), s.get("b", 0.0)
    ep = spec.finetune.epochs
    store = ResultsStore(spec.db)
    store.upsert_trial(spec.trial_id, status="succeeded", study=spec.study, spec_json=spec.model_dump(mode="json"),
                       sparsities_json={k: {"target": v, "achieved": v} for k, v in s.items()},
                       latency_median_ms=1.0 - 0.3 * a - 0.6 * b, epochs_run=ep,
                       top1_final=finetuned_top1(a, b, ep) if ep else rapid_top1(a, b))
    store.close()


def test_sweep_promotes_the_best_in_stages_and_answers_with_fine_tuned_trials(tmp_path):
    sweep = parse_sweep({"study": "promo", "objective": "top1", "space": SPACE, "n_trials": 8, "parallel": 3,
                         "seed": 2, "sampler": "random",
                         "base": {"artifacts": str(tmp_path / "t"), "db": f"sqlite:///{tmp_path / 'r.db'}"},
                         "promote": [{"epochs": 2, "top": 3}, {"epochs": 5, "top": 1, "lr": 0.02}]})
    summary = run_sweep(sweep, runner=runner)
    rows = analysis.study_rows(f"sqlite:///{tmp_path / 'r.db'}", "promo")
    screen = [r for r in rows if r["stage"] == 0 and not r["dense"]]
    stage1 = [r for r in rows if r["stage"] == 1]
    stage2 = [r for r in rows if r["stage"] == 2]
    best3 = sorted(screen, key=lambda r: -r["top1_final"])[:3]
    assert sorted(r["parent"] for r in stage1) == sorted(r["trial_id"] for r in best3)
    for r in stage1:
        parent = next(p for p in screen if p["trial_id"] == r["parent"])
        assert r["targets"] == parent["targets"]  # the same sparsities, fine-tuned
        assert r["spec_json"]["finetune"]["epochs"] == 2
        assert parent["spec_json"]["sweep"]["keep_at_chance"] and not r["spec_json"]["sweep"]["keep_at_chance"]
    best1 = max(stage1, key=lambda r: r["top1_final"])
    assert [r["parent"] for r in stage2] == [best1["trial_id"]]
    assert stage2[0]["spec_json"]["finetune"] == {**best1["spec_json"]["finetune"], "epochs": 5, "lr": 0.02}
    assert summary["best"] == [stage2[0]["trial_id"]]  # the answer is the fine-tuned trial
    study = open_study(sweep)
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 8 + 3 + 1  # screen (dense in it), stages
    assert {t.user_attrs.get("stage") for t in study.trials} == {None, 1, 2}
    # asking for a stage again asks nothing new (a re-run DAG task)
    from pruneflow.sweep import promote_round

    again = promote_round(sweep, 1)
    assert sorted(s["trial_id"] for s in again) == sorted(r["trial_id"] for r in stage1)
    assert len(open_study(sweep).trials) == len(study.trials)


@pytest.mark.parametrize("promote, objective, message", [
    ([{"epochs": 2, "top": 0}], "top1", "promote.0.top: Input should be greater than or equal to 1"),
    ([{"epochs": 0, "top": 2}], "top1", "promote.0.epochs: Input should be greater than or equal to 1"),
    ([{"epochs": 2, "top": 2}], "latency", "promote: objective 'latency' does not rank by Top-1"),
])
def test_bad_promotion_is_refused_with_the_field_named(tmp_path, promote, objective, message):
    with pytest.raises(SweepError, match=message.replace("(", r"\(")):
        parse_sweep({"study": "x", "objective": objective, "space": SPACE, "promote": promote,
                     "base": {"db": f"sqlite:///{tmp_path / 'r.db'}"}})


def test_rank_correlations_equal_scipys():
    from scipy import stats

    rng = __import__("random").Random(3)
    for n in (3, 7, 25):
        x = [round(rng.uniform(0, 100), 0) for _ in range(n)]  # rounding makes ties
        y = [xi * 0.5 + rng.gauss(0, 20) for xi in x]
        assert analysis.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
        assert analysis.kendall(x, y) == pytest.approx(stats.kendalltau(x, y).statistic)
    assert analysis.spearman([1, 2], [2, 1]) is None


def test_prediction_quality_of_a_promoted_sweep(tmp_path):
    from scipy import stats

    sweep = parse_sweep({"study": "pq", "objective": "pareto", "space": SPACE, "n_trials": 10, "parallel": 5,
                         "seed": 5, "sampler": "random",
                         "base": {"artifacts": str(tmp_path / "t"), "db": f"sqlite:///{tmp_path / 'r.db'}"},
                         "promote": [{"epochs": 3, "top": 5}]})

    def with_estimates(spec_dict):
        runner(spec_dict)
        spec = parse_spec(spec_dict)
        s = {g.name: g.sparsity for g in spec.pruning.groups}
        store = ResultsStore(spec.db)
        store.upsert_trial(spec.trial_id, top1_recalibrated=rapid_top1(s.get("a", 0), s.get("b", 0)) + 3,
                           top1_masked=10.0 + s.get("b", 0))
        store.close()

    run_sweep(sweep, runner=with_estimates)
    rows = analysis.study_rows(f"sqlite:///{tmp_path / 'r.db'}", "pq")
    q = analysis.prediction_quality(rows)
    stage1 = [r for r in rows if r["stage"] == 1]
    by_id = {r["trial_id"]: r for r in rows}
    x = [by_id[r["parent"]]["top1_recalibrated"] for r in stage1]
    y = [r["top1_final"] for r in stage1]
    assert q["recalibrated"]["n"] == 5
    assert q["recalibrated"]["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert q["recalibrated"]["kendall"] == pytest.approx(stats.kendalltau(x, y).statistic)
    xp = [by_id[r["parent"]]["top1_masked"] for r in stage1]
    assert q["pruned"]["kendall"] == pytest.approx(stats.kendalltau(xp, y).statistic)
    screened = [r for r in rows if r["stage"] == 0 and not r["dense"]]
    assert q["compute"] == {"screened": len(screened), "promoted": 5, "epochs_spent": 15,
                            "epochs_to_fine_tune_all": 3 * len(screened), "share": 15 / (3 * len(screened))}
    # 5 pairs: the report (which the plugin serves) keeps the figure out of the reader's way
    from pruneflow import report

    report.write_report(f"sqlite:///{tmp_path / 'r.db'}", "pq", tmp_path / "report")
    section = (tmp_path / "report" / "report.html").read_text().split("Screen against fine-tuning", 1)[1]
    section = section.split("<h2>", 1)[0]
    assert section.count("n = 5: too few pairs for a rank correlation") == 2  # recalibrated and pruned
    assert "Spearman" not in section and "Kendall" not in section
