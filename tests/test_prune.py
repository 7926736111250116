"""Plans, masks and thinning: thinned == masked over random sparsities on every model pattern."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pruneflow.models import build_model
from pruneflow.prune import (
    GroupRequest,
    PlanError,
    count_params_and_macs,
    coupled_sets,
    make_plan,
    masked_copy,
    max_output_difference,
    prunable_layers,
    thin,
)

SHAPE = [1, 3, 16, 16]
# residual additions, concatenation, grouped convs, squeeze-and-excitation, depthwise + inverted residual, plain
PATTERN_MODELS = ["resnet20", "densenet_tiny", "resnext_tiny", "se_resnet_tiny", "mobilenet_tiny", "vgg11", "smallcnn"]


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a wrongly masked channel would show in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


_models: dict[str, tuple[nn.Module, list[list[str]]]] = {}


def _model(name: str):
    if name not in _models:
        m = _randomize(build_model(name, 3, 10), 0)
        _models[name] = (m, coupled_sets(m, SHAPE))
    return _models[name]


@pytest.mark.parametrize("name", PATTERN_MODELS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_thinned_equals_masked(name, data):
    model, sets = _model(name)
    criterion = data.draw(st.sampled_from(["l1", "l2", "random", "bn-scale"]), label="criterion")
    round_to = data.draw(st.sampled_from([None, None, 2, 4]), label="round_to")
    chosen = data.draw(st.lists(st.integers(0, len(sets) - 1), min_size=1, max_size=len(sets), unique=True))
    groups = []
    for i in chosen:
        s = data.draw(st.floats(0.0, 0.95), label=f"sparsity[{i}]")
        groups.append(GroupRequest(f"g{i}", list(sets[i]), s, criterion))
    try:
        plan = make_plan(model, SHAPE, groups, round_to=round_to, seed=1)
    except PlanError as exc:  # bn-scale on a layer without BatchNorm is a legitimate refusal
        assert criterion == "bn-scale" and "BatchNorm" in str(exc)
        return
    masked = masked_copy(model, plan)
    thinned, history = thin(model, plan)
    x = torch.randn(4, *SHAPE[1:], generator=torch.Generator().manual_seed(2))
    assert max_output_difference(masked, thinned, x) <= 1e-4
    modules = dict(thinned.named_modules())
    for entry in plan["layers"]:
        m = modules[entry["layer"]]
        out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        assert out == entry["kept"] == entry["channels"] - len(entry["removed"])
        if round_to and entry["removed"] and entry["channel_groups"] == 1:
            assert entry["kept"] % round_to == 0 or entry["kept"] == entry["channels"]
    if any(e["removed"] for e in plan["layers"]):
        assert count_params_and_macs(thinned, SHAPE)[0] < count_params_and_macs(model, SHAPE)[0]
        assert history


def test_floor_rounding_like_distiller():
    model, _ = _model("resnet20")
    plan = make_plan(model, SHAPE, [GroupRequest("a", ["layer1.0.conv1"], 0.6, "l1"),
                                    GroupRequest("b", ["layer3.0.conv1"], 0.3, "l1")])
    by = {e["layer"]: e for e in plan["layers"]}
    assert len(by["layer1.0.conv1"]["removed"]) == 9  # floor(16 * 0.6)
    assert len(by["layer3.0.conv1"]["removed"]) == 19  # floor(64 * 0.3)


def test_l1_removes_the_smallest_filters():
    model, _ = _model("resnet20")
    w = model.layer2[1].conv1.weight.detach()
    norms = w.abs().sum((1, 2, 3))
    plan = make_plan(model, SHAPE, [GroupRequest("a", ["layer2.1.conv1"], 0.25, "l1")])
    assert plan["layers"][0]["removed"] == sorted(torch.argsort(norms)[:8].tolist())


def test_round_to_keeps_multiples():
    model, _ = _model("resnet20")
    plan = make_plan(model, SHAPE, [GroupRequest("a", ["layer3.*.conv1"], 0.3, "l1")], round_to=8)
    for e in plan["layers"]:
        assert e["kept"] % 8 == 0 and e["kept"] >= 64 - 19  # never removes more than asked


def test_glob_matching_nothing_names_available_layers():
    model, _ = _model("resnet20")
    with pytest.raises(PlanError, match=r"layer9\.\*.*prunable layers: conv1, layer1\.0\.conv1"):
        make_plan(model, SHAPE, [GroupRequest("a", ["layer9.*"], 0.5, "l1")])


def test_classifier_is_not_prunable():
    model, _ = _model("resnet20")
    assert "fc" not in prunable_layers(model, SHAPE)
    with pytest.raises(PlanError, match="matches no prunable layer"):
        make_plan(model, SHAPE, [GroupRequest("a", ["fc"], 0.5, "l1")])


def test_coupled_layers_with_different_sparsities_are_refused():
    model, _ = _model("resnet20")
    with pytest.raises(PlanError, match="coupled"):
        make_plan(model, SHAPE, [GroupRequest("a", ["layer1.0.conv2"], 0.5, "l1"),
                                 GroupRequest("b", ["layer1.1.conv2"], 0.25, "l1")])


def test_residual_coupling_is_found():
    model, sets = _model("resnet20")
    stage1 = next(s for s in sets if "layer1.0.conv2" in s)
    assert {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"} <= set(stage1)


def test_layer_in_two_groups_is_refused():
    model, _ = _model("resnet20")
    with pytest.raises(PlanError, match="matched by groups"):
        make_plan(model, SHAPE, [GroupRequest("a", ["layer1.*.conv1"], 0.5, "l1"),
                                 GroupRequest("b", ["layer1.0.conv1"], 0.5, "l1")])


def test_ignored_layers_are_kept():
    model, _ = _model("resnet20")
    plan = make_plan(model, SHAPE, [GroupRequest("a", ["layer1.*.conv1"], 0.5, "l1")], ignored=["layer1.1.*"])
    assert [e["layer"] for e in plan["layers"]] == ["layer1.0.conv1", "layer1.2.conv1"]


def test_taylor_needs_and_uses_a_calibration_batch():
    model, _ = _model("smallcnn")
    x = torch.randn(8, *SHAPE[1:])
    y = torch.randint(0, 10, (8,))
    with pytest.raises(PlanError, match="calibration"):
        make_plan(model, SHAPE, [GroupRequest("a", ["conv2"], 0.5, "taylor")])
    plan = make_plan(model, SHAPE, [GroupRequest("a", ["conv2"], 0.5, "taylor")], calib=(x, y))
    assert len(plan["layers"][0]["removed"]) == plan["layers"][0]["channels"] // 2
    assert all(p.grad is None for p in model.parameters())


def test_plan_does_not_change_the_model():
    model, _ = _model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = make_plan(model, SHAPE, [GroupRequest("a", ["layer2.*.conv1"], 0.5, "l2")])
    masked_copy(model, plan)
    thin(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
