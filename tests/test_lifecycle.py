"""Trial lifecycle in the library, shared by the CLI, the in-process sweep and the DAG: an attempt starts
from a clean state, and a trial without a baseline checkpoint uses (training on first use) the named one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pruneflow.spec import parse_spec
from pruneflow.stages import STAGE_FILES, TrialFailed, run_trial
from pruneflow.store import ResultsStore


def test_a_rerun_whose_early_stage_fails_records_nothing_of_the_previous_attempt(spec_dict):
    spec = parse_spec({**spec_dict, "trial_id": "again"})
    run_trial(spec)
    trial_dir = spec.trial_dir()
    assert all((trial_dir / f).is_file() for f in ("plan.json", "thin.json", "latency.json"))

    bad = parse_spec({**spec_dict, "trial_id": "again",
                      "pruning": {"groups": [{"name": "g", "patterns": ["no.such.layer"], "sparsity": 0.5}]}})
    with pytest.raises(TrialFailed) as exc:
        run_trial(bad)
    assert exc.value.stage == "prune"
    left = sorted(p.name for p in trial_dir.iterdir())
    for stage in ("prune", "thinnify", "retrain", "export", "benchmark"):
        assert not set(STAGE_FILES[stage]) & set(left), (stage, left)
    store = ResultsStore(spec.db)
    row = store.get_trial("again")
    assert row["status"] == "failed" and row["reason"].startswith("prune:")
    assert row["latency_median_ms"] is None and row["params_after"] is None and not row["sparsities_json"]
    assert json.loads((trial_dir / "error.json").read_text())["stage"] == "prune"
    store.close()


def test_cli_trial_without_a_checkpoint_trains_and_then_reuses_the_named_baseline(tmp_path):
    spec = {"name": "named", "model": {"name": "smallcnn"}, "dataset": {"name": "digits", "image_size": 8},
            "baseline": {"epochs": 1},
            "pruning": {"groups": [{"name": "g", "patterns": ["conv1"], "sparsity": 0.5}]},
            "benchmark": {"rounds": 1, "iterations": 5, "warmup": 1},
            "artifacts": str(tmp_path / "trials"), "db": f"sqlite:///{tmp_path / 'r.db'}"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PRUNEFLOW_BASELINES": str(tmp_path / "baselines")}
    cmd = [sys.executable, "-m", "pruneflow.cli", "trial", str(path), "--json"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    ckpt = Path(tmp_path / "baselines" / "smallcnn-digits-8" / "baseline.pt")
    assert ckpt.is_file()
    assert "baseline: training smallcnn" in first.stderr
    mtime = ckpt.stat().st_mtime_ns
    second = subprocess.run(cmd[:-1] + ["--trial-id", "named-2", "--json"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "baseline: training" not in second.stderr and ckpt.stat().st_mtime_ns == mtime
    assert json.loads(second.stdout)["status"] == "succeeded"


def test_cli_prints_one_line_for_a_factory_that_returns_no_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pruneflow.cli", "inspect", "--model", "builtins:dict"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "expected a torch.nn.Module" in proc.stderr
