"""Bad trial specs are rejected before any work, with the field named and what is allowed."""

import copy

import pytest

from pruneflow.spec import SpecError, load_spec, parse_spec

GOOD = {
    "name": "t",
    "baseline": {"checkpoint": "x.pt"},
    "pruning": {"groups": [{"name": "layer1", "patterns": ["layer1.*.conv1"], "sparsity": 0.5}]},
}


def _with(path: str, value):
    spec = copy.deepcopy(GOOD)
    node = spec
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
    last = keys[-1]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return spec


BAD = [
    ("pruning.groups.0.sparsity", 0.96, "pruning.groups.0.sparsity", "less than or equal to 0.95"),
    ("pruning.groups.0.sparsity", -0.1, "pruning.groups.0.sparsity", "greater than or equal to 0"),
    ("pruning.groups.0.patterns", [], "pruning.groups.0.patterns", "at least 1"),
    ("pruning.groups.0.name", "bad name!", "pruning.groups.0.name", "letters, digits"),
    ("pruning.groups.0.criterion", "l3", "pruning.groups.0.criterion", "'l1', 'l2', 'bn-scale', 'taylor' or 'random'"),
    ("pruning.criterion", "magnitude", "pruning.criterion", "'l1', 'l2', 'bn-scale', 'taylor' or 'random'"),
    ("pruning.round_to", 0, "pruning.round_to", "greater than or equal to 1"),
    ("pruning.colour", 1, "pruning.colour", "Extra inputs are not permitted"),
    ("finetune.epochs", -1, "finetune.epochs", "greater than or equal to 0"),
    ("finetune.optimizer", "rmsprop", "finetune.optimizer", "'sgd' or 'adam'"),
    ("finetune.lr", 0, "finetune.lr", "greater than 0"),
    ("finetune.batch_size", 0, "finetune.batch_size", "greater than or equal to 1"),
    ("finetune.chance_patience", 0, "finetune.chance_patience", "greater than or equal to 1"),
    ("export.parity_atol", 0, "export.parity_atol", "greater than 0"),
    ("export.opset", 7, "export.opset", "greater than or equal to 13"),
    ("export.exporter", "tf", "export.exporter", "'torchscript' or 'dynamo'"),
    ("benchmark.backend", "tensorrt", "benchmark.backend", "'openvino' or 'onnxruntime'"),
    ("benchmark.precision", "int8", "benchmark.precision", "'f32', 'f16' or 'bf16'"),
    ("benchmark.threads", 0, "benchmark.threads", "greater than or equal to 1"),
    ("benchmark.rounds", 0, "benchmark.rounds", "greater than or equal to 1"),
    ("benchmark.iterations", 0, "benchmark.iterations", "greater than or equal to 1"),
    ("benchmark.warmup", -1, "benchmark.warmup", "greater than or equal to 0"),
    ("benchmark.hint", "fast", "benchmark.hint", "'latency' or 'throughput'"),
    ("benchmark.device", "cpu!!", "benchmark.device", "device"),
    ("dataset.name", "mnist", "dataset.name", "'digits', 'fashion-mnist', 'cifar10' or 'imagefolder'"),
    ("dataset.image_size", 4, "dataset.image_size", "greater than or equal to 8"),
    ("model.input_shape", [3, 32, 32], "model.input_shape", "[1, C, H, W]"),
    ("seed", -1, "seed", "greater than or equal to 0"),
    ("db", "not a url", "db", "SQLAlchemy URL"),
    ("trial_id", "a/b", "trial_id", "letters, digits"),
    ("baseline.epochs", 0, "baseline.epochs", "greater than or equal to 1"),
    ("bogus", 1, "bogus", "Extra inputs are not permitted"),
]


@pytest.mark.parametrize("path,value,field,allowed", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_field_is_named(path, value, field, allowed):
    with pytest.raises(SpecError) as exc:
        parse_spec(_with(path, value))
    msg = str(exc.value)
    assert f"{field}:" in msg
    assert allowed in msg


def test_cifar10_needs_a_path():
    with pytest.raises(SpecError, match="path"):
        parse_spec({**GOOD, "dataset": {"name": "cifar10"}})


def test_onnxruntime_only_on_cpu():
    with pytest.raises(SpecError, match="benchmark.*device"):
        parse_spec({**GOOD, "benchmark": {"backend": "onnxruntime", "device": "GPU"}})


def test_duplicate_group_names():
    g = GOOD["pruning"]["groups"][0]
    with pytest.raises(SpecError, match="duplicate group names"):
        parse_spec({**GOOD, "pruning": {"groups": [g, g]}})


def test_every_bad_field_is_reported_at_once():
    spec = _with("finetune.epochs", -1)
    spec["benchmark"] = {"rounds": 0}
    msg = str(pytest.raises(SpecError, parse_spec, spec).value)
    assert "finetune.epochs" in msg and "benchmark.rounds" in msg


def test_good_spec_and_defaults():
    spec = parse_spec(GOOD)
    assert spec.model.name == "resnet20"
    assert spec.dataset.name == "digits" and spec.dataset.image_size == 32
    assert spec.benchmark.backend == "openvino" and spec.benchmark.precision == "f32"
    assert spec.finetune.epochs == 0
    a, b = spec.with_id(), spec.with_id()
    assert a.trial_id.startswith("t-") and a.trial_id != b.trial_id
    assert a.with_id().trial_id == a.trial_id


def test_load_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(lst)


def test_example_spec_is_valid():
    spec = load_spec("examples/resnet20_digits.yaml")
    assert [g.name for g in spec.pruning.groups] == ["layer1", "layer2", "layer3"]
