"""The median early-stopping rule of sweep trials, and the epochs it saves as the report counts them.

The study's earlier trials are crafted in the results DB (so the median at each epoch is known);
the trial the rule judges is a real fine-tuning trial on the digits data set."""

import statistics

import numpy as np
import pytest

from pruneflow import analysis
from pruneflow.early_stop import median_rule
from pruneflow.report import write_report
from pruneflow.spec import parse_spec
from pruneflow.stages import run_trial
from pruneflow.store import ResultsStore
from pruneflow.sweep import open_study, parse_sweep

EPOCHS = 3
EARLY = {"rule": "median", "n_startup_trials": 3, "n_warmup_steps": 1}


def _craft(db: str, study: str, trial_id: str, per_epoch: dict[int, float], status: str = "succeeded",
           requested: int = EPOCHS) -> None:
    """A trial of the study as `record` leaves it: status, spec, epochs run and per-epoch rows."""
    store = ResultsStore(db)
    try:
        store.upsert_trial(trial_id, study=study, status=status, top1_masked=10.0, epochs_run=len(per_epoch),
                           spec_json={"finetune": {"epochs": requested}})
        store.replace_epochs(trial_id, [{"epoch": e, "val_top1": v, "seconds": 0.5 + 0.1 * e}
                                        for e, v in per_epoch.items()])
    finally:
        store.close()


def _db(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'results.db'}"


# --- the rule as a function of the DB and one epoch's metrics --------------------------------------

def _rule(db, study="s", trial_id="s-9999", startup=3, warmup=1):
    return median_rule(db, study, trial_id, startup, warmup)


def test_below_the_median_at_the_same_epoch_is_stopped(tmp_path):
    db = _db(tmp_path)
    for i, (e2, e3) in enumerate([(50.0, 10.0), (60.0, 20.0), (90.0, 30.0)]):
        _craft(db, "s", f"s-{i:04d}", {1: 100.0, 2: e2, 3: e3})
    reason = _rule(db)({"epoch": 2, "val_top1": 59.0})
    assert reason == ("median rule: validation Top-1 59.00% at epoch 2 is below the median 60.00% of 3 "
                      "earlier trials of study s")
    assert _rule(db)({"epoch": 2, "val_top1": 60.0}) is None  # at the median: not below
    assert _rule(db)({"epoch": 2, "val_top1": 61.0}) is None
    # the same 59 % at epoch 3 is far above that epoch's median (20 %)
    assert _rule(db)({"epoch": 3, "val_top1": 59.0}) is None
    assert "below the median 20.00%" in _rule(db)({"epoch": 3, "val_top1": 19.0})


def test_warm_up_epochs_are_never_stopped(tmp_path):
    db = _db(tmp_path)
    for i in range(3):
        _craft(db, "s", f"s-{i:04d}", {1: 100.0, 2: 100.0})
    assert _rule(db, warmup=1)({"epoch": 1, "val_top1": 5.0}) is None
    assert _rule(db, warmup=0)({"epoch": 1, "val_top1": 5.0}) is not None
    assert _rule(db, warmup=2)({"epoch": 2, "val_top1": 5.0}) is None


def test_too_few_finished_trials_stop_nothing(tmp_path):
    db = _db(tmp_path)
    for i in range(2):
        _craft(db, "s", f"s-{i:04d}", {1: 100.0, 2: 100.0})
    assert _rule(db, startup=3)({"epoch": 2, "val_top1": 5.0}) is None
    assert _rule(db, startup=2)({"epoch": 2, "val_top1": 5.0}) is not None


def test_only_the_studys_other_finished_trials_count(tmp_path):
    db = _db(tmp_path)
    for i, v in enumerate([20.0, 30.0, 40.0]):
        _craft(db, "s", f"s-{i:04d}", {2: v}, status="succeeded" if i else "abandoned")
    # none of these may move the median (30 %) up: running, failed, another study, the trial itself
    _craft(db, "s", "s-run", {2: 100.0}, status="running")
    _craft(db, "s", "s-fail", {2: 100.0}, status="failed")
    _craft(db, "other", "other-0000", {2: 100.0})
    _craft(db, "other", "other-0001", {2: 100.0})
    _craft(db, "s", "s-9999", {2: 100.0}, status="abandoned")  # an earlier attempt of the judged trial
    assert "median 30.00% of 3 earlier trials" in _rule(db)({"epoch": 2, "val_top1": 29.0})
    assert _rule(db)({"epoch": 2, "val_top1": 31.0}) is None


# --- real fine-tuning trials under the rule, and the epochs saved in the report --------------------

def _sweep_trial(spec_dict, study: str, number: int, **finetune) -> dict:
    return {**spec_dict, "name": study, "study": study, "trial_id": f"{study}-{number:04d}",
            "finetune": {"epochs": EPOCHS, "lr": 0.01, **finetune},
            "sweep": {"optuna_trial_number": number, "early_stopping": EARLY}}


def _val_top1(db: str, trial_id: str) -> dict[int, float]:
    return {e["epoch"]: e["val_top1"] for e in ResultsStore(db).epochs(trial_id)}


def test_median_rule_in_real_trials_and_epochs_saved_in_the_report(spec_dict, tmp_path):
    db = spec_dict["db"]

    # 1. above the median: the study's earlier trials were poor after epoch 1 (epoch 1 itself is warm-up,
    #    where they were perfect); unfinished trials with high Top-1 must not count
    for i, (e2, e3) in enumerate([(20.0, 20.0), (30.0, 40.0), (99.0, 99.0)]):
        _craft(db, "up", f"up-{i:04d}", {1: 100.0, 2: e2, 3: e3})
    _craft(db, "up", "up-running", {1: 100.0, 2: 100.0, 3: 100.0}, status="running")
    _craft(db, "up", "up-failed", {1: 100.0, 2: 100.0, 3: 100.0}, status="failed")
    above = run_trial(parse_spec(_sweep_trial(spec_dict, "up", 3)))
    assert above["status"] == "succeeded" and above["reason"] is None
    v = _val_top1(db, "up-0003")
    assert sorted(v) == [1, 2, 3] and ResultsStore(db).get_trial("up-0003")["epochs_run"] == EPOCHS
    assert v[1] < 100.0 and v[2] > 30.0 and v[3] > 40.0  # it was below epoch 1's median, above the others

    # 2. below the median: the same trial (same seed, so the same per-epoch Top-1) in a study whose
    #    median at epoch 2 is half a point above it, and far below it at epoch 3
    for i, e2 in enumerate([v[2] - 10.0, v[2] + 0.5, 100.0]):
        _craft(db, "down", f"down-{i:04d}", {1: 100.0, 2: e2, 3: 0.0})
    _craft(db, "down", "down-failed", {1: 100.0}, status="failed")  # stopped by a failure, not by a rule
    below = run_trial(parse_spec(_sweep_trial(spec_dict, "down", 3)))
    w = _val_top1(db, "down-0003")
    assert (w[1], w[2]) == (v[1], v[2]), "the repeated trial did not reproduce its per-epoch Top-1"
    assert below["status"] == "abandoned" and sorted(w) == [1, 2]
    assert below["reason"] == (f"median rule: validation Top-1 {v[2]:.2f}% at epoch 2 is below the median "
                               f"{v[2] + 0.5:.2f}% of 3 earlier trials of study down")
    row = ResultsStore(db).get_trial("down-0003")
    assert row["status"] == "abandoned" and row["epochs_run"] == 2 and row["latency_median_ms"] is None
    assert not (tmp_path / "trials" / "down-0003" / "model.onnx").exists()  # neither exported nor measured

    # 3. one stopped by the chance rule in the same study: the report counts its epochs too
    diverged = run_trial(parse_spec(_sweep_trial(spec_dict, "down", 4, lr=10.0)))
    assert diverged["status"] == "abandoned" and "chance" in diverged["reason"]

    # the epochs saved, counted here from the epoch rows: requested minus run, over stopped trials
    store = ResultsStore(db)
    trials = store.list_trials(study="down")
    stopped = [t for t in trials if t["status"] == "abandoned"]
    expected = sum(t["spec_json"]["finetune"]["epochs"] - len(store.epochs(t["trial_id"])) for t in stopped)
    seconds = [e["seconds"] for t in trials for e in store.epochs(t["trial_id"])]
    store.close()
    assert [t["trial_id"] for t in stopped] == ["down-0003", "down-0004"] and expected == 1 + 2

    saved = analysis.compute_saved(analysis.study_rows(db, "down"))
    assert saved["stopped_trials"] == 2 and saved["epochs_saved"] == expected
    assert saved["mean_epoch_seconds"] == pytest.approx(statistics.mean(seconds))
    assert saved["seconds_saved"] == pytest.approx(expected * float(np.mean(seconds)))

    space = [{"name": "layer1", "patterns": ["layer1.*.conv1"], "high": 0.8}]
    open_study(parse_sweep({"study": "down", "base": {"db": db, "artifacts": spec_dict["artifacts"]},
                            "space": space, "early_stopping": EARLY}))
    summary = write_report(db, "down", tmp_path / "report")
    assert summary["compute_saved"]["epochs_saved"] == expected
    assert summary["by_status"]["abandoned"] == 2
    html = (tmp_path / "report" / "report.html").read_text()
    assert f"Early stopping saved {expected} fine-tuning epochs" in html
    assert f"over {len(stopped)} trials" in html
