"""Sensitivity profiles (pruneflow.sensitivity) and the sweep space they choose (space: auto)."""

from __future__ import annotations

import json

import pytest

from pruneflow.auto_space import AutoSpace, auto_space, set_bound
from pruneflow.sensitivity import parse_sensitivity, run_sensitivity, save_profile
from pruneflow.spec import SpecError
from pruneflow.store import ResultsStore
from pruneflow.sweep import SweepError, parse_sweep


def _points(*rows):
    return [{"sparsity": s, "top1_drop": d, "latency_saved_pct": v} for s, d, v in rows]


#: a hand-made profile: (sparsity, Top-1 drop, latency saved %) per set
PROFILE = {
    "version": 1, "name": "fixture", "model": "resnet20",
    "sets": [
        {"set": "set00", "layers": ["layer1.0.conv1"], "points": _points((0.25, 0.1, 2), (0.5, 0.5, 4), (0.75, 3, 6))},
        {"set": "set01", "layers": ["layer1.1.conv1"], "points": _points((0.25, 0.2, 1), (0.5, 0.8, 2), (0.75, 0.9, 3))},
        # the stem's residual set: already 5 points down at the first sparsity
        {"set": "set02", "layers": ["conv1", "layer1.0.conv2", "layer1.1.conv2"],
         "points": _points((0.25, 5, 8), (0.5, 9, 12), (0.75, 20, 15))},
        # harmless but saves next to nothing
        {"set": "set03", "layers": ["layer2.0.conv1"], "points": _points((0.25, 0, 0.1), (0.5, 0.1, 0.2), (0.75, 0.2, 0.3))},
        # drops past the tolerance at 0.5, back within it at 0.75: the bound stays at 0.25
        {"set": "set04", "layers": ["layer2.1.conv1"], "points": _points((0.25, 0.2, 3), (0.5, 2.0, 5), (0.75, 0.5, 7))},
        {"set": "set05", "layers": ["layer3.0.conv1"], "points": _points((0.25, 0.0, 5), (0.5, 0.3, 9), (0.75, 0.6, 12))},
    ],
}


def test_set_bound_is_the_last_sparsity_before_the_first_drop_past_the_tolerance():
    assert set_bound(PROFILE["sets"][0]["points"], 1.0) == (0.5, 4)
    assert set_bound(PROFILE["sets"][4]["points"], 1.0) == (0.25, 3)
    assert set_bound(PROFILE["sets"][2]["points"], 1.0) == (0.0, 0.0)
    assert set_bound(PROFILE["sets"][2]["points"], 10.0) == (0.5, 12)


def test_auto_space_bounds_each_set_and_leaves_out_the_sensitive_and_the_useless():
    space = auto_space(PROFILE, AutoSpace(profile="p.json", tolerance=1.0))
    assert [(r["name"], r["patterns"], r["high"]) for r in space] == [
        ("set00", ["layer1.0.conv1"], 0.5), ("set01", ["layer1.1.conv1"], 0.75),
        ("set04", ["layer2.1.conv1"], 0.25), ("set05", ["layer3.0.conv1"], 0.75)]
    assert {r["low"] for r in space} == {0.0} and all("step" not in r for r in space)


def test_auto_space_merges_neighbours_of_one_stage_only():
    space = auto_space(PROFILE, AutoSpace(profile="p.json", tolerance=1.0, max_groups=2, step=0.05))
    # layer1's two sets merge (the narrower bound wins); layer2 and layer3 have one set each: no more merging
    assert [(r["name"], r["patterns"], r["high"], r["step"]) for r in space] == [
        ("set00-set01", ["layer1.0.conv1", "layer1.1.conv1"], 0.5, 0.05),
        ("set04", ["layer2.1.conv1"], 0.25, 0.05), ("set05", ["layer3.0.conv1"], 0.75, 0.05)]


def _sweep(tmp_path, **auto):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(PROFILE))
    return {"study": "auto", "space": "auto", "auto": {"profile": str(path), **auto}}


def test_space_auto_in_a_sweep_becomes_the_explicit_space_it_chose(tmp_path):
    sweep = parse_sweep(_sweep(tmp_path, tolerance=1.0))
    assert [(r.name, r.high) for r in sweep.space] == [("set00", 0.5), ("set01", 0.75), ("set04", 0.25),
                                                      ("set05", 0.75)]
    assert sweep.auto.tolerance == 1.0
    # what it chose re-runs as it was: the dumped spec parses to the same space without the profile
    again = parse_sweep(sweep.model_dump(mode="json"))
    assert again.space == sweep.space


@pytest.mark.parametrize(("change", "message"), [
    ({"auto": None}, "auto: required with space: auto"),
    ({"auto": {"tolerance": -1}}, "auto.tolerance"),
    ({"auto": {"tolerance": 0.0, "min_saved_pct": 50}}, "space: auto chose no group"),
    ({"auto": {"profile": "/nonexistent/profile.json"}}, "auto.profile: /nonexistent/profile.json: cannot read"),
    ({"base": {"model": {"name": "vgg11"}}}, "profiles model 'resnet20', the sweep prunes 'vgg11'"),
    ({"auto": {"profile": "PLAIN"}}, "is not a sensitivity profile of version 1"),
])
def test_space_auto_refuses_bad_input_with_the_field_named(tmp_path, change, message):
    data = _sweep(tmp_path)
    (tmp_path / "plain.json").write_text("[1, 2]")
    change = {k: {**v, "profile": str(tmp_path / "plain.json")} if isinstance(v, dict) and v.get("profile") == "PLAIN"
              else v for k, v in change.items()}
    for key, value in change.items():
        if key == "auto" and value is not None:
            data["auto"] = {**data["auto"], **value}
        else:
            data[key] = value
    with pytest.raises(SweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_sweep(data)


@pytest.mark.parametrize(("data", "message"), [
    ({"sparsities": [0.5, 0.97]}, "sparsities"),
    ({"sparsities": [-0.1]}, r"outside \(0, 0.95\]"),
    ({"sparsities": [0.0, 0.5]}, "the dense model is measured anyway"),
    ({"sparsities": [0.125, 0.1254]}, "at most 3 decimals"),
    ({"name": "n" * 81}, "name"),
    ({"trial": {"pruning": {"groups": [{"name": "g", "patterns": ["conv1"], "sparsity": 0.5}]}}},
     "trial.pruning.groups: a sensitivity run prunes each coupled set alone"),
    ({"trial": {"finetune": {"epochs": 2}}}, r"trial.finetune.epochs: 2.*allowed: 0"),
    ({"unknown": 1}, "unknown"),
    ({"sets": []}, "sets"),
])
def test_sensitivity_spec_refuses_bad_input_with_the_field_named(data, message):
    with pytest.raises(SpecError, match=message):
        parse_sensitivity(data)


def test_sensitivity_on_a_tiny_model_gives_one_row_per_set_and_sparsity_and_its_plot(spec_dict, tmp_path):
    from pruneflow.models import build_model
    from pruneflow.prune import coupled_sets

    trial = {k: v for k, v in spec_dict.items() if k not in ("pruning", "name")}
    sens = parse_sensitivity({"name": "tiny", "trial": trial, "sparsities": [0.5, 0.25], "sets": ["layer3.*"]})
    profile = run_sensitivity(sens)
    sets = [s for s in coupled_sets(build_model("resnet20", 1, 10), [1, 1, 16, 16])
            if any(layer.startswith("layer3.") for layer in s)]
    assert len(sets) >= 3
    assert profile["sets"][0]["set"] != "set00"  # numbered among all of the model's sets, whatever is selected
    assert [s["layers"] for s in profile["sets"]] == sets  # one entry per coupled set, in the graph's order
    assert profile["sparsities"] == [0.25, 0.5]
    for s in profile["sets"]:
        assert [p["sparsity"] for p in s["points"]] == [0.25, 0.5]
        for p in s["points"]:
            assert p["top1_drop"] == pytest.approx(profile["dense"]["top1"] - p["top1"], abs=2e-3)
            assert p["latency_ms"] > 0
            assert p["latency_saved_ms"] == pytest.approx(profile["dense"]["latency_ms"] - p["latency_ms"], abs=1e-4)
    # every point was really pruned: its plan removed filters of its set's layers only
    plan = json.loads((tmp_path / "trials" / f"tiny-{profile['sets'][0]['set']}-s500" / "plan.json").read_text())
    pruned = {layer["layer"] for layer in plan["layers"] if layer["removed"]}
    assert pruned and pruned <= set(sets[0])
    files = save_profile(profile, spec_dict["db"], tmp_path / "out")
    assert json.loads((tmp_path / "out" / "profile.json").read_text()) == profile
    store = ResultsStore(spec_dict["db"])
    assert store.get_sensitivity("tiny") == profile
    # the dense model and every point are trials of the study "tiny", with the interleaved run's latency
    rows = {r["trial_id"]: r for r in store.list_trials(study="tiny")}
    store.close()
    assert len(rows) == 1 + 2 * len(sets) and rows["tiny-dense"]["status"] == "succeeded"
    assert rows["tiny-dense"]["latency_median_ms"] == pytest.approx(profile["dense"]["latency_ms"], abs=1e-5)
    assert all(r["status"] in ("succeeded", "abandoned") and r["latency_median_ms"] > 0 for r in rows.values())
    assert (tmp_path / "out" / "sensitivity.png").stat().st_size > 1000
    table = (tmp_path / "out" / "profile.txt").read_text().splitlines()
    assert len(table) == 3 + len(sets) * 2 and files["plot"].endswith("sensitivity.png")
    # the profile feeds space: auto
    assert auto_space(profile, AutoSpace(profile="x", tolerance=100, min_saved_pct=0))


def test_the_examples_parse(tmp_path):
    import yaml

    from pruneflow.sensitivity import load_sensitivity

    assert load_sensitivity("examples/sensitivity_resnet20.yaml").trial_spec().finetune.epochs == 0
    data = yaml.safe_load(open("examples/sweep_auto.yaml"))
    assert data["space"] == "auto"
    data["auto"]["profile"] = _sweep(tmp_path)["auto"]["profile"]  # the fixture profile in place of a measured one
    assert [r.name for r in parse_sweep(data).space] == ["set00", "set01", "set04", "set05"]


def test_auto_space_merges_the_neighbours_with_the_closest_bounds_first():
    # one stage, bounds 0.5 0.5 0.25 0.25; the middle pair saves least, but merging it would cut set01 to 0.25
    rows = [((0.25, 0, 5), (0.5, 0, 10)), ((0.25, 0, 1), (0.5, 0, 1)), ((0.25, 0, 1), (0.5, 9, 1)),
            ((0.25, 0, 10), (0.5, 9, 10))]
    sets = [{"set": f"set{i:02d}", "layers": [f"layer2.{i}.conv1"], "points": _points(*r)} for i, r in enumerate(rows)]
    space = auto_space({"sets": sets}, AutoSpace(profile="p", tolerance=1.0, min_saved_pct=0, max_groups=2))
    assert [(r["name"], r["high"]) for r in space] == [("set00-set01", 0.5), ("set02-set03", 0.25)]
