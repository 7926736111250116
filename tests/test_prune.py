"""Plans, masks and thinning: thinned == masked over random sparsities on every model pattern."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pruneflow import prune as prune_mod
from pruneflow.models import build_model
from pruneflow.models.patterns import ChannelShuffle, ShuffleNetTiny, ShuffleUnit
from pruneflow.prune import (
    GroupRequest,
    PlanError,
    TraceError,
    build_graph,
    count_params_and_macs,
    coupled_sets,
    make_plan,
    masked_copy,
    max_output_difference,
    prunable_layers,
    register_channel_boundary,
    resolve_groups,
    thin,
)

SHAPE = [1, 3, 16, 16]
# residual additions, concatenation, grouped convs, squeeze-and-excitation, depthwise + inverted residual,
# channel split + shuffle, plain
PATTERN_MODELS = ["resnet20", "densenet_tiny", "resnext_tiny", "se_resnet_tiny", "mobilenet_tiny", "shufflenet_tiny",
                  "vgg11", "smallcnn"]


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


# ----------------------------------------------------------------------------------------- ignored layers
DIGITS = [1, 1, 32, 32]


def _digits_resnet20() -> nn.Module:
    return _randomize(build_model("resnet20", 1, 10), 3)


@pytest.mark.parametrize("ignored", ["layer1.1.conv2", "layer1.1.*"])
def test_ignored_layer_coupled_to_a_target_is_refused(ignored):
    """layer1.*.conv2 share their filters through the residual additions: layer1.1.conv2 cannot keep them."""
    model = _digits_resnet20()
    groups = [GroupRequest("stage1", ["layer1.*.conv2"], 0.5, "l1")]
    pattern = r"layer1\.1\.conv2 \(ignored by pattern '" + ignored.replace(".", r"\.").replace("*", r"\*") + "'\\) "
    with pytest.raises(PlanError, match=pattern + r"is coupled to layer1\.0\.conv2, which group 'stage1' prunes") as info:
        make_plan(model, DIGITS, groups, ignored=[ignored])
    msg = str(info.value)
    assert "conv1, layer1.0.conv2, layer1.1.conv2, layer1.2.conv2" in msg  # the coupled set
    assert "leave these coupled layers out of the patterns of group 'stage1'" in msg
    assert "remove layer1.1.conv2 from pruning.ignored_layers" in msg
    # the same check runs where the trial conf is validated (resolve_groups, before any training)
    with pytest.raises(PlanError, match="is coupled to layer1.0.conv2"):
        resolve_groups(model, DIGITS, groups, [ignored])
    # whatever the sparsity: a sweep must not fail on some trials only
    with pytest.raises(PlanError, match="is coupled to"):
        make_plan(model, DIGITS, [GroupRequest("stage1", ["layer1.*.conv2"], 0.0, "l1")], ignored=[ignored])


def test_ignored_layer_coupled_to_an_untargeted_stem_is_refused():
    model = _digits_resnet20()
    with pytest.raises(PlanError, match=r"conv1 \(ignored by pattern 'conv1'\) is coupled to layer1\.0\.conv2"):
        make_plan(model, DIGITS, [GroupRequest("a", ["layer1.0.conv2"], 0.25, "l1")], ignored=["conv1"])


def test_ignored_layer_keeps_every_filter_when_not_coupled():
    model = _digits_resnet20()
    plan = make_plan(model, DIGITS, [GroupRequest("a", ["layer1.*.conv1", "layer2.*.conv2"], 0.5, "l1")],
                     ignored=["layer1.1.conv1"])
    thinned, _ = thin(model, plan)
    assert thinned.layer1[1].conv1.out_channels == 16
    assert "layer1.1.conv1" not in {e["layer"] for e in plan["layers"]}
    assert thinned.layer2[0].conv2.out_channels == 16


# ------------------------------------------------------------------------------------ group summaries


def _achieved_on_layers(model, thinned, layers) -> tuple[int, int]:
    before, after = dict(model.named_modules()), dict(thinned.named_modules())
    channels = sum(before[n].out_channels for n in layers)
    removed = sum(before[n].out_channels - after[n].out_channels for n in layers)
    return channels, removed


def test_group_coupled_to_another_group_reports_what_its_layers_lost():
    model = _digits_resnet20()
    groups = [GroupRequest("a", ["layer1.0.conv2"], 0.5, "l1"), GroupRequest("b", ["layer1.1.conv2"], 0.5, "l2")]
    plan = make_plan(model, DIGITS, groups)
    thinned, _ = thin(model, plan)
    by = {g["name"]: g for g in plan["groups"]}
    assert by["b"]["layers"] == ["layer1.1.conv2"]
    assert (by["b"]["channels"], by["b"]["removed"], by["b"]["achieved_sparsity"]) == (16, 8, 0.5)
    assert _achieved_on_layers(model, thinned, ["layer1.1.conv2"]) == (16, 8)
    assert by["b"]["merged_with"] == ["a"]
    assert "layer1.1.conv2 coupled to layer1.0.conv2 of group 'a'" in by["b"]["note"]
    assert "ranked by l1" in by["b"]["note"]  # b's own criterion did not rank them
    assert by["a"]["layers"] == ["layer1.0.conv2"] and "merged_with" not in by["a"]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=st.floats(0.0, 0.95), split=st.sampled_from(["layer1.1.conv2", "layer1.2.conv2", "conv1"]))
def test_group_summaries_are_true_about_their_layers(s, split):
    model, _ = _model("resnet20")
    stage = ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    groups = [GroupRequest("a", [n for n in stage if n != split] + ["layer2.0.conv1"], s, "l1"),
              GroupRequest("b", [split], s, "l1")]
    plan = make_plan(model, SHAPE, groups)
    thinned, _ = thin(model, plan)
    for g in plan["groups"]:
        channels, removed = _achieved_on_layers(model, thinned, g["layers"])
        assert (g["channels"], g["removed"]) == (channels, removed)
        assert g["achieved_sparsity"] == pytest.approx(removed / channels)
    assert sorted(plan["groups"][0]["layers"] + plan["groups"][1]["layers"]) == sorted(stage + ["layer2.0.conv1"])


# --------------------------------------------------------------------------------- Distiller's counting


def _wide_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 100, 3, padding=1), nn.BatchNorm2d(100), nn.ReLU(),
        nn.Conv2d(100, 50, 3, padding=1), nn.BatchNorm2d(50), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(50, 10),
    ).eval()


@pytest.mark.parametrize(("layer", "sparsity", "expected"),
                         [("0", 0.29, 28), ("0", 0.57, 56), ("0", 0.58, 57), ("3", 0.58, 28), ("0", 0.3, 30)])
def test_filter_counts_follow_distillers_float_arithmetic(layer, sparsity, expected):
    """Distiller removes floor(s * n) in floating point: 0.29 * 100 == 28.999999999999996 -> 28."""
    model = _wide_model()
    plan = make_plan(model, SHAPE, [GroupRequest("a", [layer], sparsity, "l1")])
    assert len(plan["layers"][0]["removed"]) == expected
    thinned, _ = thin(model, plan)
    assert thinned[int(layer)].out_channels == plan["layers"][0]["channels"] - expected


# ------------------------------------------------------------------------------------------ ShuffleNet


def test_shufflenet_prunes_inside_units_and_not_across_the_shuffle():
    model, sets = _model("shufflenet_tiny")
    layers = prunable_layers(model, SHAPE)
    assert layers == ["conv1.0"] + [f"stage{s}.{u}.branch2.0.0" for s in (2, 3) for u in range(3)] + ["conv5.0"]
    assert sets == [[n] for n in layers]
    plan = make_plan(model, SHAPE, [GroupRequest("units", ["stage*"], 0.5, "l1")])  # skips what cannot go
    assert [e["layer"] for e in plan["layers"]] == layers[1:-1]
    thinned, _ = thin(model, plan)
    x = torch.randn(2, *SHAPE[1:], generator=torch.Generator().manual_seed(5))
    assert max_output_difference(masked_copy(model, plan), thinned, x) <= 1e-4
    assert thinned.stage2[1].branch2[0][0].out_channels == 12 and thinned.stage2[1].branch2[2][0].out_channels == 24
    with pytest.raises(PlanError, match=r"stage2\.0\.branch2\.2\.0 \(its channels reach the channel shuffle "
                                        r"stage2\.0\.shuffle"):
        make_plan(model, SHAPE, [GroupRequest("a", ["stage2.0.branch2.2.0"], 0.5, "l1")])


class _RawShuffle(nn.Module):
    """A channel shuffle a user might write: not pruneflow's ChannelShuffle."""

    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class UserShuffleNet(ShuffleNetTiny):
    def __init__(self, units_per_stage: int):
        super().__init__(3, 10, units_per_stage=units_per_stage)
        for m in self.modules():
            if isinstance(m, ShuffleUnit):
                m.shuffle = _RawShuffle()


def test_raw_channel_shuffle_that_breaks_the_graph_names_model_operation_and_fix():
    model = UserShuffleNet(units_per_stage=3).eval()
    with pytest.raises(TraceError) as info:
        make_plan(model, SHAPE, [GroupRequest("a", ["conv5.0"], 0.5, "l1")])
    msg = str(info.value)
    assert isinstance(info.value, ValueError)  # a user error, like every PlanError
    assert "cannot trace model UserShuffleNet" in msg
    assert "ZeroDivisionError" in msg and "mapping channel indices through a view/reshape" in msg
    assert "ViewBackward0" in msg and "after stage" in msg
    assert "test_prune.py:" in msg and ".view(n, 2, c // 2, h, w)" in msg  # the user's line
    assert "pruneflow.models.patterns.ChannelShuffle" in msg and "register_channel_boundary" in msg
    with pytest.raises(TraceError, match="UserShuffleNet"):
        build_graph(model, SHAPE)


def test_raw_channel_shuffle_that_traces_is_refused_where_it_would_be_wrong():
    model = UserShuffleNet(units_per_stage=2).eval()
    build_graph(model, SHAPE)  # two units per stage trace, but the transpose is taken for element-wise
    with pytest.raises(PlanError, match=r"stage2\.0\.branch2\.2\.0: its channels pass through a TransposeBackward0 "
                                        r"\(after stage2\.0\.branch1\.1\.1, stage2\.0\.branch2\.2\.1\) in model UserShuffleNet") as info:
        make_plan(model, SHAPE, [GroupRequest("a", ["stage2.0.branch2.2.0"], 0.5, "l1")])
    assert "ChannelShuffle" in str(info.value)
    plan = make_plan(model, SHAPE, [GroupRequest("a", ["stage2.0.branch2.0.0"], 0.5, "l1")])  # inside a unit
    x = torch.randn(2, *SHAPE[1:])
    assert max_output_difference(masked_copy(model, plan), thin(model, plan)[0], x) <= 1e-4


def test_register_channel_boundary_makes_a_user_shuffle_prunable(monkeypatch):
    monkeypatch.setattr(prune_mod, "_CHANNEL_BOUNDARY_TYPES", list(prune_mod._CHANNEL_BOUNDARY_TYPES))
    model = _randomize(UserShuffleNet(units_per_stage=3), 4)
    with pytest.raises(TraceError):
        build_graph(model, SHAPE)
    assert register_channel_boundary(_RawShuffle) is _RawShuffle
    layers = prunable_layers(model, SHAPE)
    assert layers == prunable_layers(build_model("shufflenet_tiny", 3, 10), SHAPE)
    plan = make_plan(model, SHAPE, [GroupRequest("a", layers, 0.4, "l2")])
    x = torch.randn(2, *SHAPE[1:])
    assert max_output_difference(masked_copy(model, plan), thin(model, plan)[0], x) <= 1e-4
    with pytest.raises(TypeError):
        register_channel_boundary(len)


def test_forward_failure_is_reported_as_such():
    with pytest.raises(TraceError, match=r"model Sequential cannot be traced for pruning: its forward pass on an input "
                                         r"of shape \[1, 5, 8, 8\] raised RuntimeError"):
        build_graph(nn.Sequential(nn.Conv2d(3, 4, 3)), [1, 5, 8, 8])


def test_channel_shuffle_is_a_permutation():
    x = torch.arange(12.0).view(1, 12, 1, 1)
    out = ChannelShuffle(3)(x).flatten().tolist()
    assert out == [k * 4 + i for i in range(4) for k in range(3)]  # out channel i*g+k = in channel k*C/g+i
    with pytest.raises(ValueError, match="cannot be split"):
        ChannelShuffle(5)(x)
