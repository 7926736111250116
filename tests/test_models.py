"""Tests for the model registry (pruneflow.models)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from pruneflow.models import build_model, list_models, register_model
from pruneflow.models import registry as registry_mod
from pruneflow.models.patterns import ChannelShuffle
from pruneflow.prune import build_graph

TESTS_DIR = Path(__file__).resolve().parent

EXPECTED_MODELS = sorted(
    [
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "vgg11",
        "vgg16",
        "mobilenetv2",
        "smallcnn",
        "densenet_tiny",
        "resnext_tiny",
        "se_resnet_tiny",
        "mobilenet_tiny",
        "shufflenet_tiny",
    ]
)

# A conv in the middle of each model whose output channels get pruned (chosen to hit the hard cases:
# residual coupling, concat, grouped-conv input, depthwise chain, squeeze-excitation multiply).
MIDDLE_CONV = {
    "resnet20": "layer2.0.conv2",
    "resnet32": "layer2.0.conv2",
    "resnet44": "layer2.0.conv2",
    "resnet56": "layer2.0.conv2",
    "resnet110": "layer2.0.conv2",
    "vgg11": "features.8",
    "vgg16": "features.14",
    "mobilenetv2": "features.5.conv.2",
    "smallcnn": "conv2",
    "densenet_tiny": "block1.1.conv",
    "resnext_tiny": "layer1.0.conv1",
    "se_resnet_tiny": "layer2.conv2",
    "mobilenet_tiny": "features.3.conv.0.0",
    "shufflenet_tiny": "stage2.1.branch2.0.0",
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny CPU workloads: intra-op threads only add overhead (and crawl on a loaded 2-core box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def user_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS_DIR))


def _spread_idxs(channels: int) -> list[int]:
    """25% of the channels, the same relative positions in every group of 4 (safe for grouped convs)."""
    return list(range(0, channels, 4))


# --------------------------------------------------------------------------- registry contents


def test_list_models_is_sorted_and_complete() -> None:
    names = list_models()
    assert names == sorted(names)
    assert names == EXPECTED_MODELS
    assert set(MIDDLE_CONV) == set(names)


@pytest.mark.parametrize("name", EXPECTED_MODELS)
@pytest.mark.parametrize(("in_channels", "num_classes"), [(1, 10), (3, 7)])
def test_build_and_forward(name: str, in_channels: int, num_classes: int) -> None:
    model = build_model(name, in_channels, num_classes).eval()
    assert isinstance(model, nn.Module)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == in_channels
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert last_linear.out_features == num_classes
    with torch.no_grad():
        for size in (8, 32):
            out = model(torch.randn(2, in_channels, size, size))
            assert out.shape == (2, num_classes), (name, size)
            assert torch.isfinite(out).all()


def test_odd_input_size_and_train_mode() -> None:
    for name in ("resnet20", "vgg11", "mobilenetv2", "densenet_tiny", "smallcnn"):
        model = build_model(name, 3, 5).train()
        out = model(torch.randn(2, 3, 11, 11))
        assert out.shape == (2, 5)


# --------------------------------------------------------------------------- ResNet (Distiller names)


def _named_layers(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d | nn.Linear)}


def test_resnet20_distiller_layer_names() -> None:
    expected = {"conv1", "bn1", "fc"}
    for stage in (1, 2, 3):
        for block in (0, 1, 2):
            for leaf in ("conv1", "bn1", "conv2", "bn2"):
                expected.add(f"layer{stage}.{block}.{leaf}")
    expected |= {
        "layer2.0.downsample.0",
        "layer2.0.downsample.1",
        "layer3.0.downsample.0",
        "layer3.0.downsample.1",
    }
    model = build_model("resnet20", 3, 10)
    assert _named_layers(model) == expected
    modules = dict(model.named_modules())
    assert isinstance(modules["relu"], nn.ReLU)
    assert isinstance(modules["avgpool"], nn.AdaptiveAvgPool2d)
    for stage in ("layer2", "layer3"):
        ds_conv = modules[f"{stage}.0.downsample.0"]
        assert isinstance(ds_conv, nn.Conv2d)
        assert ds_conv.kernel_size == (1, 1) and ds_conv.stride == (2, 2) and ds_conv.bias is None
        assert isinstance(modules[f"{stage}.0.downsample.1"], nn.BatchNorm2d)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    widths = {s: modules[f"layer{s}.0.conv2"].out_channels for s in (1, 2, 3)}
    assert widths == {1: 16, 2: 32, 3: 64}
    assert modules["fc"].in_features == 64


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_resnet_blocks_per_stage(depth: int) -> None:
    model = build_model(f"resnet{depth}", 3, 10)
    n = (depth - 2) // 6
    for stage in (model.layer1, model.layer2, model.layer3):
        assert len(stage) == n
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth - 1 + 2  # 6n+1 3x3 convs (fc is the +1 of depth) + 2 downsample convs


def test_resnet56_has_nine_blocks_per_stage() -> None:
    model = build_model("resnet56", 3, 10)
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [9, 9, 9]


def test_resnet20_parameter_count() -> None:
    model = build_model("resnet20", 3, 10)
    params = sum(p.numel() for p in model.parameters())
    assert 260_000 <= params <= 280_000


# --------------------------------------------------------------------------- pattern models


def test_pattern_models_have_their_patterns() -> None:
    dense = build_model("densenet_tiny", 3, 10)
    layer = dense.block1[0]
    x = torch.randn(1, layer.conv.in_channels, 8, 8)
    assert layer(x).shape[1] == layer.conv.in_channels + layer.conv.out_channels  # concat

    resnext = build_model("resnext_tiny", 3, 10)
    grouped = [m for m in resnext.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert grouped and all(m.groups < m.in_channels for m in grouped)  # grouped, not depthwise

    se = build_model("se_resnet_tiny", 3, 10)
    assert any(isinstance(m, nn.Sigmoid) for m in se.modules())
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in se.layer1.se.modules())

    mb = build_model("mobilenet_tiny", 3, 10)
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in mb.modules())
    assert any(getattr(m, "use_res_connect", False) for m in mb.modules())

    sh = build_model("shufflenet_tiny", 3, 10).eval()
    shuffles = [m for m in sh.modules() if isinstance(m, ChannelShuffle)]
    assert len(shuffles) == 6 and all(m.groups == 2 for m in shuffles)
    unit = sh.stage2[1]
    assert unit.branch1 is None and unit.branch2[1][0].groups == unit.branch2[1][0].in_channels  # split + depthwise
    x = torch.randn(1, 48, 4, 4)
    with torch.no_grad():
        x1, x2 = x.chunk(2, dim=1)
        cat = torch.cat((x1, unit.branch2(x2)), 1)
        out = unit(x)
    assert torch.equal(out[:, 0::2], cat[:, :24]) and torch.equal(out[:, 1::2], cat[:, 24:])  # shuffled halves
    assert build_model("shufflenet_tiny", 1, 10, units_per_stage=1).eval()(torch.randn(1, 1, 8, 8)).shape == (1, 10)


def test_model_kwargs() -> None:
    vgg8 = build_model("vgg11", 3, 10, input_size=8)
    vgg32 = build_model("vgg11", 3, 10)
    n_pools = lambda m: sum(isinstance(x, nn.MaxPool2d) for x in m.modules())  # noqa: E731
    assert n_pools(vgg32) == 5 and n_pools(vgg8) == 3
    assert build_model("vgg16", 3, 10, input_size=8).eval()(torch.randn(1, 3, 8, 8)).shape == (1, 10)
    no_bn = build_model("vgg11", 3, 10, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn.modules())

    half = build_model("mobilenetv2", 3, 10, width_mult=0.5)
    full = build_model("mobilenetv2", 3, 10)
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in full.parameters())
    assert half.eval()(torch.randn(1, 3, 8, 8)).shape == (1, 10)

    wide = build_model("smallcnn", 3, 10, width=8)
    assert wide.conv3.out_channels == 32


def test_unknown_kwarg_raises_type_error() -> None:
    with pytest.raises(TypeError, match=r"'resnet20'.*'bogus_option'|'bogus_option'.*'resnet20'"):
        build_model("resnet20", 3, 10, bogus_option=1)
    with pytest.raises(TypeError, match="width_mul"):
        build_model("mobilenetv2", 3, 10, width_mul=0.5)
    with pytest.raises(TypeError, match="width_mult"):  # lists what is accepted
        build_model("mobilenetv2", 3, 10, width_mul=0.5)


def test_bad_channel_counts() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        build_model("smallcnn", 0, 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("smallcnn", 3, 0)


# --------------------------------------------------------------------------- Torch-Pruning


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_torch_pruning_dependency_graph_and_prune(name: str) -> None:
    """The graph pruneflow builds (Torch-Pruning's, with channel shuffles as boundaries) prunes every model."""
    in_ch, num_classes = 3, 10
    model = build_model(name, in_ch, num_classes).eval()
    dg = build_graph(model, [1, in_ch, 32, 32])
    conv = dict(model.named_modules())[MIDDLE_CONV[name]]
    assert isinstance(conv, nn.Conv2d)
    before = conv.out_channels
    idxs = _spread_idxs(before)
    group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs)
    assert dg.check_pruning_group(group)
    group.prune()
    assert conv.out_channels == before - len(idxs) == before * 3 // 4
    with torch.no_grad():
        for size in (8, 32):
            assert model(torch.randn(2, in_ch, size, size)).shape == (2, num_classes)


def _mask_group(dg: tp.DependencyGraph, group) -> None:
    """Make the channels about to be pruned exactly zero (producer weights/bias and BN affine = 0)."""
    with torch.no_grad():
        for dep, idxs in group:
            if not dg.is_out_channel_pruning_fn(dep.handler):
                continue
            mod, ii = dep.target.module, [int(i) for i in idxs]
            if isinstance(mod, nn.Conv2d | nn.BatchNorm2d):
                if mod.weight is not None:
                    mod.weight[ii] = 0
                if mod.bias is not None:
                    mod.bias[ii] = 0


@pytest.mark.parametrize(
    ("name", "conv_name"),
    [
        ("resnet20", "layer2.0.conv2"),  # residual coupling incl. downsample
        ("densenet_tiny", "block1.0.conv"),  # concat index mapping
        ("resnext_tiny", "layer1.0.conv1"),  # feeds a grouped conv
        ("resnext_tiny", "layer1.0.conv2"),  # the grouped conv itself
        ("se_resnet_tiny", "layer2.conv2"),  # SE multiply + residual
        ("mobilenetv2", "features.5.conv.0.0"),  # expand conv -> depthwise conv
    ],
)
def test_pruning_zeroed_channels_preserves_function(name: str, conv_name: str) -> None:
    """Pruning channels that are exactly zero must not change the output (TP pruned the right slices)."""
    model = build_model(name, 3, 10).eval()
    for m in model.modules():  # non-trivial BN statistics so wrong index mapping would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32), verbose=False)
    conv = dict(model.named_modules())[conv_name]
    group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, _spread_idxs(conv.out_channels))
    assert dg.check_pruning_group(group)
    _mask_group(dg, group)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        group.prune()
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- ONNX export


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # legacy TorchScript exporter
@pytest.mark.parametrize(
    "name", ["smallcnn", "resnet20", "densenet_tiny", "resnext_tiny", "se_resnet_tiny", "shufflenet_tiny"]
)
def test_onnx_export(name: str, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    model = build_model(name, 3, 10).eval()
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)))


# --------------------------------------------------------------------------- user models & errors


def test_user_model_import_path_with_kwargs(user_path: None) -> None:
    model = build_model("user_models:tiny", 3, 10, width=4)
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 4
    assert model.eval()(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    # in_channels / num_classes given by keyword are the user factory's own arguments
    model = build_model("user_models:tiny", 3, 10, in_channels=3, num_classes=7, width=2)
    assert model.conv1.in_channels == 3 and model.conv1.out_channels == 2 and model.fc.out_features == 7


def test_user_model_gets_only_kwargs(user_path: None) -> None:
    model = build_model("user_models:tiny", 3, 7)  # in/num are for registry models only
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10


def test_unknown_name_lists_models_and_import_form() -> None:
    with pytest.raises(ValueError) as info:
        build_model("resnet21", 3, 10)
    msg = str(info.value)
    assert "resnet21" in msg
    for name in EXPECTED_MODELS:
        assert name in msg
    assert "package.module:factory" in msg


def test_bad_import_path() -> None:
    with pytest.raises(ValueError, match=r"no_such_pkg_pf\.sub.*ModuleNotFoundError"):
        build_model("no_such_pkg_pf.sub:factory", 3, 10)


def test_missing_attribute(user_path: None) -> None:
    with pytest.raises(ValueError, match=r"user_models.*does_not_exist"):
        build_model("user_models:does_not_exist", 3, 10)


def test_non_module_return(user_path: None) -> None:
    with pytest.raises(TypeError, match=r"user_models:not_a_model.*dict.*nn\.Module"):
        build_model("user_models:not_a_model", 3, 10)
    with pytest.raises(TypeError, match="not callable"):
        build_model("user_models:NOT_CALLABLE", 3, 10)


@pytest.mark.parametrize("spec", [":tiny", "user_models:", "a:b:c"])
def test_malformed_import_path(spec: str) -> None:
    with pytest.raises(ValueError, match="package.module:factory"):
        build_model(spec, 3, 10)


def test_import_error_inside_user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pf_broken_user_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(ValueError, match=r"pf_broken_user_mod.*RuntimeError: boom at import"):
        build_model("pf_broken_user_mod:f", 3, 10)


def test_register_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_mod, "_REGISTRY", dict(registry_mod._REGISTRY))

    @register_model("pf_test_custom")
    def custom(in_channels: int, num_classes: int, hidden: int = 4) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(hidden, num_classes),
        )

    assert "pf_test_custom" in list_models()
    model = build_model("pf_test_custom", 2, 3, hidden=6)
    assert model(torch.randn(1, 2, 8, 8)).shape == (1, 3)
    with pytest.raises(TypeError, match="hidde"):
        build_model("pf_test_custom", 2, 3, hidde=6)
    with pytest.raises(ValueError, match="already registered"):
        register_model("pf_test_custom")(lambda in_channels, num_classes: nn.Identity())
    importlib.reload(importlib.import_module("pruneflow.models.small"))  # re-registering on reload is fine
    assert build_model("smallcnn", 3, 10).fc.out_features == 10
    with pytest.raises(ValueError, match="':'"):
        register_model("a:b")

    @register_model("pf_test_bad_return")
    def bad(in_channels: int, num_classes: int) -> nn.Module:
        return "nope"  # type: ignore[return-value]

    with pytest.raises(TypeError, match="pf_test_bad_return"):
        build_model("pf_test_bad_return", 3, 10)
