"""The output checks judged at the scale of the outputs: thinned against masked, exported against torch.

A model with logits in the thousands that thins and exports correctly passes; the same model with a
perturbed weight in its exported graph, exported to take its input in the wrong layout or with a layer
dropped, fails, and so does a thinning with two kept filters swapped; a model with tiny logits and a
wrong export fails too.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from pruneflow import analysis
from pruneflow.bench.output_check import EXPORT_ATOL, EXPORT_RTOL, compare_outputs, describe
from pruneflow.checkpoint import save_checkpoint
from pruneflow.data import DatasetSpec
from pruneflow.spec import parse_spec
from pruneflow.stages import TrialFailed, run_trial
from pruneflow.store import ResultsStore

USER_MODEL = "user_models:tiny"
DIGITS16 = {"name": "digits", "image_size": 16}


@pytest.fixture(scope="module")
def scaled_baselines(tmp_path_factory) -> dict[float, str]:
    """The tiny user model trained briefly on digits (above chance, so a rapid trial is not abandoned) with
    its head scaled by 1e4 (logits in the thousands) or 1e-3 (tiny logits), as baseline checkpoints:
    {scale: path}. Scaling the head does not change the predicted classes."""
    from pruneflow.baseline import train_baseline
    from pruneflow.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("scaled")
    train_baseline(USER_MODEL, DatasetSpec(**DIGITS16), epochs=2, out_dir=out, lr=0.05)
    paths = {}
    for scale in (1e4, 1e-3):
        model, payload = load_checkpoint(out / "baseline.pt")
        with torch.no_grad():
            model.fc.weight.mul_(scale)
            model.fc.bias.mul_(scale)
        meta = {k: v for k, v in payload["meta"].items() if k not in ("val_top1", "val_loss")}
        paths[scale] = str(save_checkpoint(out / f"head{scale:g}.pt", model.eval(), payload["model"],
                                           payload["input_shape"], meta=meta))
    return paths


def _spec(tmp_path, baseline: str, trial_id: str):
    return parse_spec({
        "name": "scaled", "trial_id": trial_id, "model": {"name": USER_MODEL}, "dataset": DIGITS16,
        "baseline": {"checkpoint": baseline},
        "pruning": {"groups": [{"name": "c1", "patterns": ["conv1"], "sparsity": 0.5}]},
        "benchmark": {"rounds": 2, "iterations": 10, "warmup": 2},
        "artifacts": str(tmp_path / "trials"), "db": f"sqlite:///{tmp_path / 'results.db'}",
    })


def _logit_scale(spec) -> float:
    return float(np.abs(np.load(spec.trial_dir() / "reference.npz")["output"]).max())


@pytest.mark.parametrize("scale", [1e4, 1e-3])
def test_correct_thinning_and_export_pass_at_any_output_scale(tmp_path, scaled_baselines, scale):
    spec = _spec(tmp_path, scaled_baselines[scale], f"ok-{scale:g}")
    assert run_trial(spec)["status"] == "succeeded"
    d = spec.trial_dir()
    logits = _logit_scale(spec)
    assert logits > 1e3 if scale > 1 else logits < 1e-2
    thin = json.loads((d / "thin.json").read_text())["check"]
    parity = json.loads((d / "parity.json").read_text())
    checks = [thin, *parity["checks"].values()]
    assert parity["passed"] and set(parity["checks"]) == {"onnxruntime", "openvino"}
    for c in checks:
        assert c["passed"] and c["max_abs_diff"] <= c["tolerance"] and c["argmax_agreement"] == 1.0
        # at either scale it is the relative part that carries the bound: the floor is for outputs near 0
        assert c["decided_by"] == ("rtol" if scale > 1 else "atol")
        assert c["diff_over_tolerance"] == pytest.approx(c["max_abs_diff"] / c["tolerance"])
    if scale > 1:
        assert parity["checks"]["openvino"]["tolerance"] > 1e-3  # wider than the old absolute 1e-3
    latency = json.loads((d / "latency.json").read_text())
    assert latency["check"]["passed"] and latency["check"]["check_rtol"] == spec.export.parity_rtol


def _perturbed_weight(path):
    """One filter of the first convolution of the exported graph scaled by 1.05: a different function."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    init = next(i for i in m.graph.initializer if numpy_helper.to_array(i).ndim == 4)
    w = numpy_helper.to_array(init).copy()
    w[0] *= 1.05
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(m, str(path))


class _TransposedInput(torch.nn.Module):
    """Exported in place of the model: takes its image with height and width swapped."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.transpose(2, 3))


@pytest.mark.parametrize("scale", [1e4, 1e-3])
@pytest.mark.parametrize("fault", ["weight", "layout", "dropped"])
def test_a_wrong_export_fails_at_any_output_scale(tmp_path, scaled_baselines, monkeypatch, scale, fault):
    from pruneflow import export as export_module

    real = export_module.export_onnx

    def wrong_export(model, shape, path, *args, **kwargs):
        if fault == "layout":
            return real(_TransposedInput(model), shape, path, *args, **kwargs)
        if fault == "dropped":  # the second BatchNorm left out of the exported graph
            dropped = copy.deepcopy(model)
            dropped.bn2 = torch.nn.Identity()
            return real(dropped, shape, path, *args, **kwargs)
        out = real(model, shape, path, *args, **kwargs)
        _perturbed_weight(out)
        return out

    monkeypatch.setattr(export_module, "export_onnx", wrong_export)
    spec = _spec(tmp_path, scaled_baselines[scale], f"{fault}-{scale:g}")
    with pytest.raises(TrialFailed) as info:
        run_trial(spec)
    assert info.value.stage == "export"
    reason = ResultsStore(spec.db).get_trial(spec.trial_id)["reason"]
    assert reason.startswith("export: export parity failed") and "> tolerance" in reason
    assert "relative" in reason and "x output scale" in reason  # the numbers that decided it
    parity = json.loads((spec.trial_dir() / "parity.json").read_text())
    assert not parity["passed"]
    for c in parity["checks"].values():
        assert not c["within_tolerance"] and c["diff_over_tolerance"] > 1
        # not a rounding difference: far beyond what any correct export of the registry showed (1.4e-6)
        assert c["relative_diff"] > 1e-3


def test_a_wrong_thinning_fails(tmp_path, scaled_baselines, monkeypatch):
    from pruneflow import prune

    real = prune.thin

    def swapped(model, plan):
        thinned, history = real(model, plan)
        with torch.no_grad():  # two kept filters of conv1 trade places; bn1 and conv2 still expect the old order
            thinned.conv1.weight[[0, 1]] = thinned.conv1.weight[[1, 0]].clone()
            thinned.conv1.bias[[0, 1]] = thinned.conv1.bias[[1, 0]].clone()
        return thinned, history

    monkeypatch.setattr(prune, "thin", swapped)
    spec = _spec(tmp_path, scaled_baselines[1e4], "swapped")
    with pytest.raises(TrialFailed) as info:
        run_trial(spec)
    assert info.value.stage == "thinnify"
    assert "thinned model differs from the masked model" in info.value.reason
    assert "> tolerance" in info.value.reason and "x output scale" in info.value.reason
    assert not (spec.trial_dir() / "thinned.pt").exists()
    assert ResultsStore(spec.db).get_trial("swapped")["status"] == "failed"


def test_compare_outputs_is_relative_to_the_reference():
    ref = np.array([[1000.0, -500.0, 2.0], [800.0, 0.0, -3.0]])
    ok = compare_outputs(ref * (1 + 1e-6), ref, atol=EXPORT_ATOL, rtol=EXPORT_RTOL)
    assert ok["passed"] and ok["decided_by"] == "rtol" and ok["tolerance"] == pytest.approx(EXPORT_ATOL + 0.1)
    tiny = ref * 1e-6
    wrong = compare_outputs(tiny * 1.01, tiny, atol=EXPORT_ATOL, rtol=EXPORT_RTOL)
    assert not wrong["passed"] and wrong["decided_by"] == "atol" and wrong["relative_diff"] == pytest.approx(0.01)
    assert "> tolerance" in describe(wrong)
    flipped = ref.copy()
    flipped[0, :2] = flipped[0, [1, 0]]
    # within a huge bound, but the class changed on a sample no margin excuses
    rec = compare_outputs(flipped, ref, atol=1e9, rtol=0.0, tie_margin=0.0)
    assert rec["within_tolerance"] and not rec["passed"] and rec["argmax_agreement"] == 0.5
    # by default a sample whose top-two margin a difference within the bound could close does not count
    assert compare_outputs(flipped, ref, atol=1e9, rtol=0.0)["argmax_decisive_samples"] == 0


def test_rank_correlation_of_few_pairs_is_not_a_finding():
    few = analysis.rank_correlation([1, 2, 3, 4], [4, 3, 1, 2])
    assert few["n"] == 4 and not few["meaningful"] and few["rho_interval"] is None
    assert few["spearman"] == pytest.approx(-0.8)  # kept in the summary, not shown as a figure
    text = analysis.describe_rank_correlation(few)
    assert text.startswith("n = 4: too few pairs") and "-0.8" not in text
    rng = np.random.default_rng(3)
    x = list(range(20))
    y = [v + float(rng.normal(0, 4)) for v in x]
    many = analysis.rank_correlation(x, y)
    lo, hi = many["rho_interval"]
    assert many["meaningful"] and lo <= many["spearman"] <= hi and lo < hi
    text = analysis.describe_rank_correlation(many)
    assert f"Spearman rho {many['spearman']:.2f}" in text and "95% bootstrap interval" in text and "n = 20" in text
    assert analysis.rank_correlation(x, y) == many  # the bootstrap is seeded: the report does not change on rebuild
