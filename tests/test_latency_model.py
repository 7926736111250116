"""The latency model: a real table of a ResNet-20 space measured with OpenVINO, its prediction checked
against the layer shapes of the model really pruned, the correction against an independent fit, the bad
inputs refused, and a real in-process sweep that skips candidates predicted infeasible."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from pruneflow import analysis
from pruneflow.latency_model import AFFINE_MIN, LatencyModel, build_table, lut_ms, macs, signature_key
from pruneflow.models import build_model
from pruneflow.prune import GroupRequest, make_plan, thin
from pruneflow.sweep import SweepError, open_study, parse_sweep, run_sweep

SPACE = [{"name": "a", "patterns": ["layer1.*.conv1"], "low": 0.0, "high": 0.8, "step": 0.2},
         {"name": "b", "patterns": ["layer3.*.conv1"], "low": 0.0, "high": 0.8, "step": 0.2}]
BENCH = {"rounds": 2, "iterations": 20, "warmup": 5}
SHAPE = [1, 1, 16, 16]


def _sweep_dict(tmp, baseline="unused.pt", **extra) -> dict:
    return {"study": "lm", "space": copy.deepcopy(SPACE), "objective": "latency", "sampler": "random",
            "base": {"dataset": {"name": "digits", "image_size": 16}, "baseline": {"checkpoint": baseline},
                     "benchmark": BENCH, "artifacts": str(tmp / "trials"), "db": f"sqlite:///{tmp / 'r.db'}"},
            **extra}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("table")
    tab = build_table(parse_sweep(_sweep_dict(out)), out)
    assert json.loads((out / "table.json").read_text()) == json.loads(json.dumps(tab))
    return tab, out / "table.json"


def _pruned(params: dict[str, float]) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10)
    reqs = [GroupRequest(r["name"], r["patterns"], params[r["name"]], "l1") for r in SPACE if params[r["name"]] > 0]
    return thin(model, make_plan(model, SHAPE, reqs))[0]


def _shapes_of(model: nn.Module) -> list[dict]:
    """Each conv / linear layer's shape read from the pruned module itself (not from the channel map)."""
    seen = []

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            seen.append(({"kind": "conv", "in": inp[0].shape[1], "out": m.out_channels, "h": inp[0].shape[2],
                          "w": inp[0].shape[3], "k": list(m.kernel_size), "stride": list(m.stride),
                          "pad": list(m.padding), "dilation": list(m.dilation), "groups": m.groups},
                         m.out_channels * (m.in_channels // m.groups) * math.prod(m.kernel_size) * out.shape[2] * out.shape[3]))
        else:
            seen.append(({"kind": "linear", "in": m.in_features, "out": m.out_features}, m.in_features * m.out_features))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(*SHAPE))
    for h in hooks:
        h.remove()
    return seen


def test_the_table_covers_every_shape_and_a_prediction_is_its_entries_summed_plus_the_correction(table):
    tab, _ = table
    assert tab["device"] == "CPU" and tab["dense"]["measured_ms"] > 0 and tab["build_s"]["total"] > 0
    for params in ({"a": 0.0, "b": 0.0}, {"a": 0.4, "b": 0.6}, {"a": 0.8, "b": 0.2}):
        layers = _shapes_of(_pruned(params))
        entries = [tab["entries"][signature_key(sig)] for sig, _ in layers]  # KeyError: a shape not measured
        assert lut_ms(tab, params) == pytest.approx(sum(entries))
        assert macs(tab, params) == sum(m for _, m in layers)
        # the dense calibration alone: a = dense measured - dense table sum, b = 1
        dense_sum = sum(tab["entries"][signature_key(sig)] for sig, _ in _shapes_of(_pruned({"a": 0.0, "b": 0.0})))
        expected = tab["dense"]["measured_ms"] - dense_sum + sum(entries)
        assert LatencyModel(tab, method="table").predict(params) == pytest.approx(expected)
        dense_macs = sum(m for _, m in _shapes_of(_pruned({"a": 0.0, "b": 0.0})))
        assert LatencyModel(tab).predict(params) == pytest.approx(tab["dense"]["measured_ms"] / dense_macs * macs(tab, params))
    assert lut_ms(tab, {"a": 0.8, "b": 0.8}) < lut_ms(tab, {"a": 0.0, "b": 0.0})
    # a sparsity between grid points is taken at the nearest one
    assert lut_ms(tab, {"a": 0.45, "b": 0.55}) == pytest.approx(lut_ms(tab, {"a": 0.4, "b": 0.6}))


def test_the_correction_is_an_offset_then_a_least_squares_fit(table):
    tab, _ = table
    configs = [{"a": a, "b": b} for a in (0.0, 0.4, 0.8) for b in (0.0, 0.4, 0.8)]
    x = np.array([sum(tab["entries"][signature_key(s)] for s, _ in _shapes_of(_pruned(c))) for c in configs])
    wobble = np.linspace(-0.01, 0.01, len(x)) * (x.max() - x.min())
    measured = 0.3 + 0.5 * x + wobble  # a device where the table overstates the differences by 2x
    few = LatencyModel(tab, list(zip(configs[:3], measured[:3], strict=True)), method="table")
    assert few.correction["kind"] == "offset"
    assert few.correction["a"] == pytest.approx(float(np.median(measured[:3] - x[:3])))
    fit = LatencyModel(tab, list(zip(configs, measured, strict=True)), method="table")
    assert len(configs) >= AFFINE_MIN and fit.correction["kind"] == "affine"
    b, a = np.polyfit(x, measured, 1)
    assert (fit.correction["a"], fit.correction["b"]) == (pytest.approx(a), pytest.approx(b))
    assert fit.predict(configs[4]) == pytest.approx(a + b * x[4])
    xm = np.array([macs(tab, c) for c in configs], dtype=float)
    measured = 0.1 + 1e-8 * xm + wobble
    mac = LatencyModel(tab, list(zip(configs, measured, strict=True)), method="macs")
    assert mac.correction["kind"] == "affine"
    b, a = np.polyfit(xm, measured, 1)
    assert mac.predict(configs[4]) == pytest.approx(a + b * xm[4])


def _with_table(tmp_path, tab: dict, **latency_model) -> dict:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(tab))
    return {"table": str(path), **latency_model}


@pytest.mark.parametrize("change, field, allowed", [
    (lambda t, d: t.update(device="GPU"), "latency_model.table", "no table for that device"),
    (lambda t, d: t.update(threads=4), "latency_model.table", "no table for that device"),
    (lambda t, d: t.update(model="resnet56"), "latency_model.table", "the sweep prunes 'resnet20'"),
    (lambda t, d: d["space"][0].update(patterns=["layer2.*.conv1"]), "latency_model.table", "build the table from"),
    (lambda t, d: d["space"][0].update(high=0.9), "latency_model.table", "the space asks [0.0, 0.9]"),
    (lambda t, d: d.update(objective="pareto"), "latency_model.skip_infeasible",
     "top1_under_latency, latency_over_top1"),
    (lambda t, d: d["latency_model"].update(method="flops"), "latency_model.method", "'table' or 'macs'"),
    (lambda t, d: d["latency_model"].update(min_measured=0), "latency_model.min_measured", "greater than or equal"),
    (lambda t, d: t.update(version=99), "latency_model.table", "not a latency table"),
])
def test_bad_latency_model_input_is_refused_with_the_field_named(table, tmp_path, change, field, allowed):
    tab = copy.deepcopy(table[0])
    data = _sweep_dict(tmp_path, objective="latency_over_top1", top1_floor=50)
    data["latency_model"] = {"skip_infeasible": True}
    change(tab, data)
    data["latency_model"] = _with_table(tmp_path, tab, **data["latency_model"])
    with pytest.raises(SweepError) as exc:
        parse_sweep(data)
    assert field in str(exc.value) and allowed in str(exc.value)


def test_a_missing_table_and_a_conf_naming_one_are_refused(tmp_path):
    from pruneflow.sweep_conf import sweep_from_conf

    with pytest.raises(SweepError, match=r"latency_model.table: .*missing.json: cannot read .*pruneflow latency-table"):
        parse_sweep(_sweep_dict(tmp_path, latency_model={"table": str(tmp_path / "missing.json")}))
    with pytest.raises(SweepError, match=r"unknown conf keys \['latency_model'\]"):
        sweep_from_conf({"study": "x", "latency_model": {"table": "/etc/passwd"}})


def test_a_sweep_skips_candidates_predicted_infeasible_and_never_reports_one_best(table, tmp_path, baseline_dir):
    """A device whose table says layer1.*.conv1 with 60 % of its filters or more removed is very slow: those
    candidates are predicted far over the budget and skipped once the dense trial has measured the model's error."""
    from optuna.trial import TrialState

    tab = copy.deepcopy(table[0])
    slow = {signature_key(s) for c in ({"a": 0.6, "b": 0.0}, {"a": 0.8, "b": 0.0}) for s, _ in _shapes_of(_pruned(c))}
    slow -= {signature_key(s) for s, _ in _shapes_of(_pruned({"a": 0.4, "b": 0.0}))}
    assert slow
    # Every other shape costs the same, so only the slow ones can lift a prediction over the budget. With the
    # measured entries (noisy), a full run once predicted a layer3-only candidate over this 1.0x budget too.
    tab["entries"] = {k: 50.0 if k in slow else 0.01 for k in tab["entries"]}
    data = _sweep_dict(tmp_path, baseline=str(baseline_dir / "baseline.pt"), objective="top1_under_latency",
                       latency_budget={"value": 1.0, "unit": "fraction"}, n_trials=7, seed=3,
                       latency_model=_with_table(tmp_path, tab, method="table", skip_infeasible=True,
                                                 min_measured=1))
    sweep = parse_sweep(data)
    summary = run_sweep(sweep)
    rows = analysis.study_rows(data["base"]["db"], "lm")
    skipped = [r for r in rows if r["status"] == "skipped"]
    ran = [r for r in rows if r["status"] != "skipped"]
    assert skipped, "no candidate was skipped"
    assert summary["by_status"]["skipped"] == len(skipped) and len(ran) == 7
    for r in skipped:
        assert r["targets"]["a"] >= 0.6 and r["latency_median_ms"] is None and r["top1_final"] is None
        assert r["reason"].startswith("predicted infeasible: ") and r["latency_predicted_ms"] > 50
    assert not any(r["targets"].get("a", 0) >= 0.6 for r in ran[1:])  # after the dense trial measured the error: none run
    measured = analysis.measured(rows)
    assert measured and all(r["latency_predicted_ms"] is not None for r in measured)  # beside the measurement
    best = summary["best"]
    assert set(best) <= {r["trial_id"] for r in measured}
    assert not set(best) & {r["trial_id"] for r in skipped}
    assert not set(r["trial_id"] for r in analysis.pareto_front(rows)) & {r["trial_id"] for r in skipped}
    study = open_study(sweep)
    told = {t.user_attrs.get("trial_id"): t for t in study.get_trials(deepcopy=False)}
    for r in skipped:  # told to the search as infeasible
        t = told[r["trial_id"]]
        assert t.state == TrialState.COMPLETE and t.user_attrs["constraint"] > 0


def test_the_cli_writes_the_table_where_the_sweep_will_read_it_and_refuses_another_backend(tmp_path, capsys):
    import yaml

    from pruneflow.cli import main

    data = _sweep_dict(tmp_path, objective="latency_over_top1", top1_floor=50,
                       latency_model={"table": str(tmp_path / "lat" / "table.json"), "skip_infeasible": True})
    for r in data["space"]:
        r["step"] = 0.4
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["latency-table", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["table"] == str(tmp_path / "lat" / "table.json") and out["shapes"] > 0
    sweep = parse_sweep(data)  # the table it names exists now and fits the sweep
    assert sweep.latency_model.skip_infeasible
    data["base"]["benchmark"] = {**BENCH, "backend": "onnxruntime"}
    path.write_text(yaml.safe_dump(data))
    assert main(["latency-table", str(path)]) == 2
    err = capsys.readouterr().err
    assert "base.benchmark.backend" in err and "allowed: openvino" in err
