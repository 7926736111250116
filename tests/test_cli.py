"""The `pruneflow` command line, run as a user would run it (a subprocess per command)."""

import json
import subprocess
import sys

import yaml


def pf(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "pruneflow.cli", *map(str, args)], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_baseline_command(tmp_path):
    out = tmp_path / "b"
    proc = pf("baseline", "--model", "smallcnn", "--dataset", "digits", "--image-size", "8", "--epochs", "1",
              "--out", out, "--json")
    metrics = json.loads(proc.stdout)
    assert (out / "baseline.pt").is_file() and (out / "baseline.json").is_file()
    assert metrics["epochs"] == 1 and 0 <= metrics["val_top1"] <= 100
    assert "epoch 1/1" in proc.stderr  # progress goes to stderr


def test_inspect_distiller_schedule_json():
    proc = pf("inspect", "--model", "resnet20", "--distiller-schedule", "examples/distiller_resnet20.yaml", "--json")
    report = json.loads(proc.stdout)
    rows = {r["layer"]: r for r in report["layers"]}
    assert rows["layer1.0.conv1"]["out_before"] == 16 and rows["layer1.0.conv1"]["out_after"] == 12  # 16 - floor(4.8)
    assert rows["layer1.0.conv2"]["in_after"] == 12 and rows["layer1.0.conv2"]["out_after"] == 16
    assert rows["layer3.2.conv1"]["out_after"] == 64 - 44
    assert rows["layer3.2.conv1"]["macs_after"] < rows["layer3.2.conv1"]["macs_before"]
    assert report["total"]["params_after"] < report["total"]["params_before"]
    assert rows["fc"]["out_after"] == 10


def test_inspect_spec_table_and_coupling(tmp_path):
    spec = {"baseline": {"checkpoint": "unused.pt"}, "pruning": {"groups": [
        {"name": "stage1", "patterns": ["layer1.*.conv2"], "sparsity": 0.5}]}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = pf("inspect", "--spec", path).stdout
    assert "layer1.0.conv2" in out and "total: params" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("conv1 "))
    assert "layer1.0.conv2" in line  # the stem is coupled to the residual stream it feeds


def test_errors_are_clear_and_exit_2(tmp_path):
    proc = pf("inspect", "--model", "resnet21", check=False)
    assert proc.returncode == 2 and "resnet20" in proc.stderr and "package.module:factory" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"baseline": {"checkpoint": "x"}, "benchmark": {"threads": 0}}))
    proc = pf("trial", bad, check=False)
    assert proc.returncode == 2 and "benchmark.threads" in proc.stderr
    proc = pf("bench", tmp_path / "missing.xml", check=False)
    assert proc.returncode == 2 and "missing.xml" in proc.stderr


def test_trial_bench_and_trials_commands(spec_dict, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**spec_dict, "trial_id": "cli"}))
    result = json.loads(pf("trial", path, "--json").stdout)
    assert result["status"] == "succeeded"
    table = pf("trial", path).stdout  # second run of the same trial id: an update
    assert "cli" in table and "succeeded" in table
    listing = json.loads(pf("trials", "--db", spec_dict["db"], "--json").stdout)
    assert [r["trial_id"] for r in listing] == ["cli"]
    assert "layer3" in pf("trials", "--db", spec_dict["db"]).stdout
    xml = tmp_path / "trials" / "cli" / "model.xml"
    bench = json.loads(pf("bench", xml, "--rounds", "2", "--iterations", "10", "--json").stdout)
    assert bench["settings"]["rounds"] == 2 and bench["latency_ms"]["median"] > 0
    onnx = tmp_path / "trials" / "cli" / "model.onnx"
    text = pf("bench", onnx, "--backend", "onnxruntime", "--rounds", "2", "--iterations", "10").stdout
    assert "onnxruntime" in text


def test_sensitivity_and_auto_sweep_refuse_bad_input_before_any_work(tmp_path):
    bad = tmp_path / "sens.yaml"
    bad.write_text(yaml.safe_dump({"name": "s", "sparsities": [0.5, 1.2],
                                   "trial": {"artifacts": str(tmp_path / "trials")}}))
    proc = pf("sensitivity", bad, check=False)
    assert proc.returncode == 2 and "sparsities" in proc.stderr and "(0, 0.95]" in proc.stderr, proc.stderr
    assert not (tmp_path / "trials").exists()  # nothing was pruned
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"study": "a", "space": "auto",
                                     "auto": {"profile": str(tmp_path / "none.json"), "tolerance": 1}}))
    proc = pf("sweep", sweep, check=False)
    assert proc.returncode == 2 and "auto.profile" in proc.stderr and "pruneflow sensitivity" in proc.stderr
