"""The chance rule at its real margin (default 0.5 points above 100/n): a network held at chance is
abandoned, one just above the margin is not — as a function, and in real fine-tuning trials."""

import pytest

from pruneflow.spec import FinetuneSpec, parse_spec
from pruneflow.stages import run_trial
from pruneflow.store import ResultsStore
from pruneflow.train import chance_rule

MARGIN = FinetuneSpec().chance_margin  # what a trial uses unless told otherwise


def _m(epoch: int, top1: float) -> dict:
    return {"epoch": epoch, "val_top1": top1}


def test_default_margin_is_half_a_point():
    assert MARGIN == 0.5


@pytest.mark.parametrize("top1", [0.0, 9.75, 10.0, 10.03, 10.31, 10.5])
def test_at_chance_within_the_margin_is_stopped(top1):
    # 10 classes: chance is 10 %; a constant predictor on the digits val split scores 9.75-10.31 %
    reason = chance_rule(10, patience=1, margin=MARGIN)(_m(1, top1))
    assert reason is not None
    assert "chance" in reason and f"{top1:.2f}%" in reason and "10.00% for 10 classes" in reason


@pytest.mark.parametrize("top1", [10.51, 10.6, 11.0, 50.0, 99.0])
def test_just_above_the_margin_is_not_stopped(top1):
    assert chance_rule(10, patience=1, margin=MARGIN)(_m(1, top1)) is None


def test_margin_scales_with_the_number_of_classes():
    rule = chance_rule(4, patience=1, margin=MARGIN)  # chance 25 %
    assert rule(_m(1, 25.5)) is not None
    assert rule(_m(1, 25.6)) is None
    assert rule(_m(1, 10.6)) is not None  # far below chance is "at chance" too


def test_patience_epochs_are_given_first():
    rule = chance_rule(10, patience=3, margin=MARGIN)
    assert rule(_m(1, 10.0)) is None and rule(_m(2, 10.0)) is None
    assert "after 3 epoch(s)" in rule(_m(3, 10.0))


def test_diverged_trial_is_abandoned_at_the_default_margin(spec_dict):
    """Adam at lr 10 blows the weights up: validation Top-1 stays at or below chance (SGD at lr 10 drifted to
    10.6 % by epoch 2 on this torch build, outside the 0.5-point margin). Nothing but the margin is given."""
    spec = parse_spec({**spec_dict, "trial_id": "diverged",
                       "finetune": {"epochs": 3, "lr": 10, "optimizer": "adam", "chance_patience": 2}})
    assert spec.finetune.chance_margin == MARGIN
    summary = run_trial(spec)
    row = ResultsStore(spec.db).get_trial("diverged")
    assert summary["status"] == row["status"] == "abandoned"
    assert "at chance (10.00% for 10 classes) after 2 epoch(s)" in row["reason"]
    epochs = ResultsStore(spec.db).epochs("diverged")
    assert row["epochs_run"] == 2 and [e["epoch"] for e in epochs] == [1, 2]
    assert all(e["val_top1"] <= 10.0 + MARGIN for e in epochs)
    assert not (spec.trial_dir() / "model.onnx").exists()


def test_recovering_trial_is_not_abandoned(spec_dict):
    """The same pruned model at a sane lr leaves chance in its first epoch and is measured."""
    spec = parse_spec({**spec_dict, "trial_id": "recovers", "finetune": {"epochs": 2, "lr": 0.01}})
    summary = run_trial(spec)
    row = ResultsStore(spec.db).get_trial("recovers")
    assert summary["status"] == row["status"] == "succeeded" and row["reason"] is None
    assert row["epochs_run"] == 2 and row["latency_median_ms"] > 0
    assert ResultsStore(spec.db).epochs("recovers")[0]["val_top1"] > 10.0 + MARGIN
