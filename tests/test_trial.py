"""A whole rapid trial end to end, recording twice, failures and abandonment, stage by stage."""

import json

import pytest

from pruneflow import stages
from pruneflow.checkpoint import load_checkpoint
from pruneflow.spec import SpecError, parse_spec
from pruneflow.stages import TrialFailed, run_trial
from pruneflow.store import ResultsStore


def test_rapid_trial_end_to_end(spec_dict):
    spec = parse_spec({**spec_dict, "trial_id": "e2e"})
    summary = run_trial(spec)
    d = spec.trial_dir()
    for name in ("spec.json", "plan.json", "masked_metrics.json", "thinned.pt", "thin.json", "epochs.json",
                 "model.onnx", "model.xml", "model.bin", "parity.json", "latency.json", "result.json"):
        assert (d / name).is_file(), name
    assert not (d / "model.onnx.data").exists()
    assert summary["status"] == "succeeded"
    assert summary["sparsities"]["layer1"]["achieved"] == 0.5
    assert summary["sparsities"]["layer3"]["achieved"] == 0.75
    thin = json.loads((d / "thin.json").read_text())
    assert thin["params_after"] < thin["params_before"] and thin["macs_after"] < thin["macs_before"]
    assert thin["max_abs_diff"] <= 1e-4
    parity = json.loads((d / "parity.json").read_text())
    assert parity["passed"] and parity["samples"] == 8
    assert parity["onnxruntime_max_abs_diff"] < 1e-3 and parity["openvino_max_abs_diff"] < 1e-3
    assert parity["onnxruntime_argmax_agreement"] == 1.0
    latency = json.loads((d / "latency.json").read_text())
    assert latency["check_max_abs_diff"] < 1e-3  # outputs checked before timing
    assert latency["settings"]["precision"] == "f32"
    assert latency["compiled_properties"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert len(latency["round_medians_ms"]) == 2
    # the thinned checkpoint is weights only and rebuilds the thinned shape
    model, payload = load_checkpoint(d / "thinned.pt")
    assert model.layer1[0].conv1.out_channels == 8 and model.layer3[0].conv1.out_channels == 16
    row = ResultsStore(spec.db).get_trial("e2e")
    assert row["status"] == "succeeded" and row["latency_median_ms"] > 0
    assert row["top1_masked"] == summary["top1_masked"]
    assert row["spec_json"]["pruning"]["groups"][0]["name"] == "layer1"
    assert row["versions_json"]["torch"].startswith("2.13")
    assert row["host"]


def test_recording_twice_does_not_duplicate(spec_dict):
    spec = parse_spec({**spec_dict, "trial_id": "twice", "finetune": {"epochs": 1}})
    run_trial(spec)
    stages.record(spec)
    stages.benchmark(spec)
    stages.record(spec)
    store = ResultsStore(spec.db)
    assert [r["trial_id"] for r in store.list_trials()] == ["twice"]
    assert len(store.epochs("twice")) == 1
    assert len(store.benchmarks("twice")) == 1


def test_fine_tuning_recovers_and_records_epochs(spec_dict):
    spec = parse_spec({**spec_dict, "trial_id": "ft", "finetune": {"epochs": 2, "lr": 0.02}})
    summary = run_trial(spec)
    epochs = ResultsStore(spec.db).epochs("ft")
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert summary["top1_final"] == epochs[-1]["val_top1"]
    assert summary["top1_final"] > summary["top1_masked"]
    assert (spec.trial_dir() / "finetuned.pt").is_file()


def test_chance_level_network_is_abandoned(spec_dict):
    # an impossible learning rate keeps the network at chance; it is stopped after chance_patience epochs
    # (at the default margin of 0.5 points: tests/test_chance.py checks the margin itself)
    spec = parse_spec({**spec_dict, "trial_id": "chance", "finetune": {"epochs": 3, "lr": 10, "chance_patience": 1}})
    summary = run_trial(spec)
    assert summary["status"] == "abandoned"
    assert "chance" in summary["reason"]
    row = ResultsStore(spec.db).get_trial("chance")
    assert row["status"] == "abandoned" and "chance" in row["reason"] and row["epochs_run"] == 1
    assert not (spec.trial_dir() / "model.onnx").exists()  # no export or benchmark of an abandoned trial


def test_failing_stage_records_the_reason(spec_dict):
    spec = parse_spec({**spec_dict, "trial_id": "fail", "export": {"parity_atol": 1e-12, "parity_rtol": 1e-12}})
    with pytest.raises(TrialFailed) as exc:
        run_trial(spec)
    assert exc.value.stage == "export"
    row = ResultsStore(spec.db).get_trial("fail")
    assert row["status"] == "failed"
    assert row["reason"].startswith("export: export parity failed")
    assert "export.parity_atol" in row["reason"] and "export.parity_rtol" in row["reason"]
    assert "> tolerance" in row["reason"]
    assert json.loads((spec.trial_dir() / "error.json").read_text())["stage"] == "export"


def test_glob_matching_nothing_fails_before_work(spec_dict):
    groups = [{"name": "g", "patterns": ["layer7.*"], "sparsity": 0.5}]
    spec = parse_spec({**spec_dict, "trial_id": "glob", "pruning": {"groups": groups}})
    with pytest.raises(TrialFailed, match=r"layer7.*prunable layers: conv1"):
        run_trial(spec)
    assert not (spec.trial_dir() / "thinned.pt").exists()


def test_missing_or_mismatched_baseline_is_a_spec_error(spec_dict, tmp_path):
    with pytest.raises(Exception, match="checkpoint not found"):
        run_trial(parse_spec({**spec_dict, "baseline": {"checkpoint": str(tmp_path / "nope.pt")}}))
    with pytest.raises(SpecError, match="dataset: gives input"):
        run_trial(parse_spec({**spec_dict, "dataset": {"name": "digits", "image_size": 32}}))
    with pytest.raises(SpecError, match="model.name"):
        run_trial(parse_spec({**spec_dict, "model": {"name": "resnet32"}}))
    assert ResultsStore(spec_dict["db"]).list_trials() == []


def test_onnxruntime_backend_and_distiller_schedule(spec_dict):
    pruning = {"groups": [], "distiller_schedule": "examples/distiller_resnet20.yaml"}
    spec = parse_spec({**spec_dict, "trial_id": "ort", "pruning": pruning, "benchmark": {
        "backend": "onnxruntime", "rounds": 2, "iterations": 10, "warmup": 2}})
    summary = run_trial(spec)
    assert summary["status"] == "succeeded"
    plan = json.loads((spec.trial_dir() / "plan.json").read_text())
    removed = {e["layer"]: len(e["removed"]) for e in plan["layers"]}
    assert removed["layer1.0.conv1"] == 4 and removed["layer2.0.conv1"] == 16 and removed["layer3.0.conv1"] == 44
    assert json.loads((spec.trial_dir() / "latency.json").read_text())["backend"] == "onnxruntime"


def test_benchmark_and_record_stages_run_without_torch(spec_dict):
    """The benchmark worker has no torch: its stages must import and run without it."""
    import subprocess
    import sys

    spec = parse_spec({**spec_dict, "trial_id": "notorch"})
    run_trial(spec)
    code = (
        "import sys, json; sys.modules['torch'] = None\n"
        "from pruneflow import stages\nfrom pruneflow.spec import parse_spec\n"
        f"spec = parse_spec(json.loads({spec.model_dump_json()!r}))\n"
        "out = stages.benchmark(spec); stages.record(spec)\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m] is not None)\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["latency_median_ms"] > 0
    assert len(ResultsStore(spec.db).benchmarks("notorch")) == 1


def _thin_then_perturb(monkeypatch, delta: float) -> None:
    """pruneflow.prune.thin (as thinnify imports it) returns a model whose last bias is off by delta:
    the thinned model no longer computes the masked model's function, by exactly delta on one logit."""
    import torch

    from pruneflow import prune

    real_thin = prune.thin

    def thin(model, plan):
        thinned, history = real_thin(model, plan)
        last = [m for m in thinned.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.bias[0] += delta
        return thinned, history

    monkeypatch.setattr(prune, "thin", thin)


def test_thinned_model_that_differs_from_the_masked_one_fails_the_trial(spec_dict, monkeypatch):
    import re

    _thin_then_perturb(monkeypatch, 0.25)
    spec = parse_spec({**spec_dict, "trial_id": "mismatch"})
    with pytest.raises(TrialFailed) as exc:
        run_trial(spec)
    assert exc.value.stage == "thinnify"
    measured = re.search(r"thinned model differs from the masked model: max abs diff (\S+) \(relative \S+\) > tolerance "
                         r"1e-06 \+ 0.0001 x output scale", exc.value.reason)
    assert measured, exc.value.reason
    assert float(measured.group(1)) == pytest.approx(0.25, abs=1e-3)  # the injected difference, measured
    row = ResultsStore(spec.db).get_trial("mismatch")
    assert row["status"] == "failed" and row["reason"] == f"thinnify: {exc.value.reason}"
    assert json.loads((spec.trial_dir() / "error.json").read_text())["stage"] == "thinnify"
    assert not (spec.trial_dir() / "thinned.pt").exists()  # nothing downstream sees the wrong model


def test_thinned_model_within_the_tolerance_passes(spec_dict, monkeypatch):
    _thin_then_perturb(monkeypatch, 5e-5)  # below thinnify's tolerance, 1e-6 + 1e-4 x max |output| (about 5e-4 here)
    spec = parse_spec({**spec_dict, "trial_id": "within"})
    stages.prepare(spec)
    stages.prune(spec)
    out = stages.thinnify(spec)
    assert out["max_abs_diff"] == pytest.approx(5e-5, abs=2e-5)
    assert (spec.trial_dir() / "thinned.pt").is_file()
