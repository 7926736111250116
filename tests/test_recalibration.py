"""BatchNorm recalibration: rapid trials record pruned, recalibrated and final Top-1; the estimate that
exists decides the chance rule; thinned == masked still holds; bad settings are refused before work."""

from __future__ import annotations

import json

import pytest
import torch

from pruneflow.prune import make_plan, masked_copy, max_output_difference, thin
from pruneflow.recalibrate import calibration_images, recalibrate
from pruneflow.spec import SpecError, parse_spec
from pruneflow.stages import TrialFailed, _dataset, _load_baseline, group_requests, resolve_spec, run_trial
from pruneflow.store import ResultsStore
from pruneflow.train import evaluate

HEAVY = [{"name": f"layer{i}", "patterns": [f"layer{i}.*.conv1"], "sparsity": 0.25} for i in (1, 2, 3)]


def _pruned(spec_dict, groups):
    spec = resolve_spec(parse_spec({**spec_dict, "pruning": {"groups": groups}}))
    model, payload, data = _load_baseline(spec)
    plan = make_plan(model, payload["input_shape"], group_requests(spec), None, [], seed=0)
    return spec, model, plan, data


def test_recalibration_lifts_a_heavily_pruned_model_and_the_thinned_copy_matches(spec_dict):
    spec, model, plan, data = _pruned(spec_dict, HEAVY)
    masked = masked_copy(model, plan)
    before, _ = evaluate(masked, *data.val)
    images = calibration_images(data.train[0], 512, 0)
    info = recalibrate(masked, images, 64)
    after, _ = evaluate(masked, *data.val)
    assert info["bn_layers"] == 21 and info["samples"] == 512
    assert after > before + 30, (before, after)  # measured 19.8 -> 70.8 on the session baseline  # stale statistics, not lost capacity
    thinned, _ = thin(model, plan)
    recalibrate(thinned, images, 64)
    assert max_output_difference(masked, thinned, data.val[0][:64]) <= 1e-4


def test_recalibration_is_a_no_op_without_batchnorm():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten())
    x = torch.randn(8, 1, 6, 6)
    ref = net(x)
    info = recalibrate(net, x, 4)
    assert info["bn_layers"] == 0 and "no BatchNorm" in info["skipped"]
    assert torch.equal(net(x), ref)


def test_trials_record_three_accuracies_and_carry_recalibrated_statistics(spec_dict):
    spec = parse_spec({**spec_dict, "trial_id": "recal", "pruning": {"groups": HEAVY}})
    summary = run_trial(spec)
    masked = json.loads((spec.trial_dir() / "masked_metrics.json").read_text())
    thin_info = json.loads((spec.trial_dir() / "thin.json").read_text())
    assert summary["status"] == "succeeded" and thin_info["recalibration"]["samples"] == 512
    assert summary["top1_masked"] == masked["top1"]
    assert summary["top1_recalibrated"] > masked["top1"] + 30  # measured 19.8 -> 70.8
    # the exported, benchmarked rapid model is the recalibrated one
    assert summary["top1_final"] == summary["top1_recalibrated"] and summary["top1_source"] == "recalibrated"
    assert json.loads((spec.trial_dir() / "parity.json").read_text())["passed"]
    row = ResultsStore(spec.db).get_trial("recal")
    assert (row["top1_masked"], row["top1_recalibrated"], row["top1_source"]) == (
        masked["top1"], summary["top1_recalibrated"], "recalibrated")

    tuned = run_trial(parse_spec({**spec_dict, "trial_id": "recal-ft", "pruning": {"groups": HEAVY},
                                  "finetune": {"epochs": 1, "lr": 0.05}}))
    assert tuned["top1_recalibrated"] == summary["top1_recalibrated"]  # the same start, then fine-tuned
    assert tuned["top1_source"] == "fine-tuned" and tuned["top1_final"] != tuned["top1_recalibrated"]

    off = parse_spec({**spec_dict, "trial_id": "no-recal",
                      "pruning": {"groups": HEAVY, "bn_recalibration": {"samples": 0}}})
    s2 = run_trial(off)
    assert json.loads((off.trial_dir() / "thin.json").read_text())["recalibration"]["skipped"] == \
        "turned off (samples: 0)"
    assert s2["top1_recalibrated"] == s2["top1_masked"] and s2["top1_source"] == "pruned"
    assert s2["top1_final"] < summary["top1_final"]


def test_a_rapid_trial_at_chance_after_recalibration_is_abandoned_before_export(spec_dict):
    groups = [{"name": f"layer{i}", "patterns": [f"layer{i}.*.conv1", f"layer{i}.*.conv2"], "sparsity": 0.95}
              for i in (1, 2, 3)]
    spec = parse_spec({**spec_dict, "trial_id": "hopeless", "pruning": {"groups": groups},
                       "finetune": {"chance_margin": 5.0}})
    summary = run_trial(spec)
    assert summary["status"] == "abandoned"
    assert summary["reason"].startswith("rapid trial: recalibrated Top-1")
    assert not (spec.trial_dir() / "model.onnx").exists() and not (spec.trial_dir() / "latency.json").exists()

    # a screen trial that promotion stages may fine-tune is kept: it is exported and benchmarked
    kept = parse_spec({**spec_dict, "trial_id": "kept", "pruning": {"groups": groups},
                       "finetune": {"chance_margin": 5.0},
                       "sweep": {"optuna_trial_number": 0, "keep_at_chance": True}})
    summary = run_trial(kept)
    assert summary["status"] == "succeeded" and summary["top1_recalibrated"] <= 10.0 + 5.0
    assert (kept.trial_dir() / "latency.json").exists()


def test_a_model_without_batchnorm_records_recalibrated_as_pruned_and_why(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    from pruneflow.baseline import train_baseline
    from pruneflow.data import DatasetSpec

    train_baseline("user_models:no_bn", DatasetSpec(name="digits", image_size=8), 1, tmp_path / "b")
    spec = parse_spec({"model": {"name": "user_models:no_bn"}, "dataset": {"name": "digits", "image_size": 8},
                       "baseline": {"checkpoint": str(tmp_path / "b" / "baseline.pt")},
                       "pruning": {"groups": [{"name": "g", "patterns": ["0"], "sparsity": 0.5}]},
                       "benchmark": {"rounds": 1, "iterations": 5, "warmup": 1}, "trial_id": "nobn",
                       "artifacts": str(tmp_path / "t"), "db": f"sqlite:///{tmp_path / 'r.db'}"})
    summary = run_trial(spec)
    thin_info = json.loads((spec.trial_dir() / "thin.json").read_text())
    assert thin_info["recalibration"]["skipped"] == "the model has no BatchNorm layer"
    assert summary["top1_recalibrated"] == summary["top1_masked"] and summary["top1_source"] == "pruned"


def test_bad_recalibration_settings_are_refused_before_work(spec_dict):
    with pytest.raises(SpecError, match=r"pruning.bn_recalibration.samples: Input should be greater than or equal to 0"):
        parse_spec({**spec_dict, "pruning": {"groups": HEAVY, "bn_recalibration": {"samples": -1}}})
    spec = resolve_spec(parse_spec({**spec_dict, "trial_id": "too-many",
                                    "pruning": {"groups": HEAVY, "bn_recalibration": {"samples": 100000}}}))
    n_train = len(_dataset(spec).train[0])
    from pruneflow.stages import check_plan

    with pytest.raises(SpecError, match=rf"bn_recalibration.samples: 100000 is more than the {n_train} images"):
        check_plan(spec)
    with pytest.raises(TrialFailed, match="bn_recalibration.samples"):
        run_trial(spec)
    assert not (spec.trial_dir() / "thinned.pt").exists()


def test_the_default_recalibrates_on_a_small_split_whole(spec_dict):
    spec = parse_spec({**spec_dict, "trial_id": "small", "pruning": {"groups": HEAVY},
                       "dataset": {**spec_dict["dataset"], "max_train_samples": 100}})
    run_trial(spec)
    assert json.loads((spec.trial_dir() / "thin.json").read_text())["recalibration"]["samples"] == 100
