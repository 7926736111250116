"""Tests for pruneflow.distiller: importing Intel Distiller compression schedules."""

from __future__ import annotations

import math
import textwrap
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pruneflow.distiller import (
    DistillerGroup,
    DistillerSchedule,
    ScheduleError,
    filters_to_remove,
    load_schedule,
)

DATA = Path(__file__).parent / "data" / "distiller"


def _yaml(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def _one_pruner(body: str, name: str = "p", policy: bool = True) -> str:
    """A schedule with one pruner (``body`` is its indented definition) and a policy applying it."""
    text = (
        "version: 1\npruners:\n  "
        + name
        + ":\n"
        + textwrap.indent(textwrap.dedent(body).strip(), "    ")
        + "\n"
    )
    if policy:
        text += f"policies:\n  - pruner:\n      instance_name: {name}\n    epochs: [0]\n"
    return text


# ---------------------------------------------------------------------------------------------- sample files


def test_resnet20_filters_file() -> None:
    path = DATA / "resnet20_filters.yaml"
    s = load_schedule(path)
    assert isinstance(s, DistillerSchedule)
    assert s.source == str(path)
    assert s.warnings == []  # net_thinning (FilterRemover) and lr_schedulers are silently accepted
    assert [g.name for g in s.groups] == ["filter_pruner_30", "filter_pruner_50", "filter_pruner_70"]
    assert [g.sparsity for g in s.groups] == [0.3, 0.5, 0.7]
    for stage, g in enumerate(s.groups, start=1):
        assert g.layers == [f"layer{stage}.{b}.conv1" for b in range(3)]
        assert g.criterion == "l1"
        assert g.pruner_class == "L1RankedStructureParameterPruner"
    assert s.layer_sparsity()["layer3.2.conv1"] == 0.7
    # a str path works as well as a Path
    assert load_schedule(str(path)).groups == s.groups


def test_resnet56_reg_regims_file() -> None:
    s = load_schedule(DATA / "resnet56_reg_regims.yaml")
    assert [g.name for g in s.groups] == [
        "filter_pruner@0.6",
        "filter_pruner@0.5",
        "filter_pruner@0.1",
        "filter_pruner@0.3",
    ]
    by_name = {g.name: g for g in s.groups}
    assert by_name["filter_pruner@0.6"].layers == [f"layer1.{b}.conv1" for b in range(9)]
    assert by_name["filter_pruner@0.5"].layers == [f"layer2.{b}.conv1" for b in (1, 2, 3, 4, 6, 7)]
    assert by_name["filter_pruner@0.1"].layers == ["layer3.1.conv1"]
    assert by_name["filter_pruner@0.3"].sparsity == 0.3
    assert all(g.criterion == "l1" for g in s.groups)
    assert len(s.layer_sparsity()) == 9 + 6 + 1 + 6
    assert s.warnings == []


def test_agp_file_collapses_to_final_sparsity() -> None:
    s = load_schedule(DATA / "resnet20_filters_agp.yaml")
    low, high = s.groups
    assert (low.name, low.sparsity, low.criterion) == ("low_pruner", 0.4, "l1")
    assert (high.name, high.sparsity, high.criterion) == ("high_pruner", 0.6, "l2")
    assert high.pruner_class == "L2RankedStructureParameterPruner_AGP"
    agp = [w for w in s.warnings if "AGP" in w]
    assert len(agp) == 2 and "collapsed into one step" in agp[0] and "0.1 -> final_sparsity 0.4" in agp[0]
    assert any("group_dependency" in w and "high_pruner" in w for w in s.warnings)


def test_channels_file_is_rejected() -> None:
    with pytest.raises(ScheduleError) as e:
        load_schedule(DATA / "resnet56_channels.yaml")
    msg = str(e.value)
    assert "resnet56_channels.yaml" in msg and "channel_pruner" in msg and "Channels" in msg
    assert "only supports filter pruning" in msg


# ---------------------------------------------------------------------------------------------- mapping


@pytest.mark.parametrize(
    ("cls", "criterion"),
    [
        ("L1RankedStructureParameterPruner", "l1"),
        ("L2RankedStructureParameterPruner", "l2"),
        ("RandomRankedFilterPruner", "random"),
        ("BernoulliFilterPruner", "random"),
        ("GradientRankedFilterPruner", "taylor"),
    ],
)
def test_class_mapping(cls: str, criterion: str) -> None:
    s = load_schedule(
        _one_pruner(f"class: {cls}\ngroup_type: Filters\ndesired_sparsity: 0.25\nweights: [conv1.weight]")
    )
    assert s.groups == [
        DistillerGroup(name="p", layers=["conv1"], sparsity=0.25, criterion=criterion, pruner_class=cls)
    ]
    assert s.source == "<text>"


@pytest.mark.parametrize(
    ("cls", "criterion"),
    [
        ("L1RankedStructureParameterPruner_AGP", "l1"),
        ("RandomRankedFilterPruner_AGP", "random"),
        ("GradientRankedFilterPruner_AGP", "taylor"),
        ("BernoulliFilterPruner_AGP", "random"),
    ],
)
def test_agp_class_mapping(cls: str, criterion: str) -> None:
    s = load_schedule(
        _one_pruner(f"class: {cls}\ngroup_type: 3D\nfinal_sparsity: 0.5\nweights: [conv1.weight]")
    )
    assert (s.groups[0].criterion, s.groups[0].sparsity) == (criterion, 0.5)
    assert any("collapsed" in w for w in s.warnings)


def test_agp_needs_final_sparsity() -> None:
    text = _one_pruner(
        "class: L1RankedStructureParameterPruner_AGP\ngroup_type: Filters\ninitial_sparsity: 0.1\nweights: [c.weight]"
    )
    with pytest.raises(ScheduleError, match="final_sparsity"):
        load_schedule(text)


def test_random_level_pruner_uses_midpoint() -> None:
    s = load_schedule(
        _one_pruner(
            "class: RandomLevelStructureParameterPruner\nsparsity_range: [0.1, 0.2]\ngroup_type: Filters\n"
            "weights: [module.layer1.0.conv1.weight]"
        )
    )
    g = s.groups[0]
    assert (g.sparsity, g.criterion, g.layers) == (0.15, "l1", ["layer1.0.conv1"])
    assert any("random" in w and "0.15" in w for w in s.warnings)


@pytest.mark.parametrize(
    "cls", ["ActivationAPoZRankedFilterPruner", "ActivationMeanRankedFilterPruner", "MysteryPruner"]
)
def test_unsupported_class(cls: str) -> None:
    with pytest.raises(ScheduleError) as e:
        load_schedule(
            _one_pruner(
                f"class: {cls}\ngroup_type: Filters\ndesired_sparsity: 0.5\nweights: [c.weight]", name="trim"
            )
        )
    msg = str(e.value)
    assert "'trim'" in msg and cls in msg
    assert (
        "Supported classes" in msg
        and "L1RankedStructureParameterPruner" in msg
        and "GradientRankedFilterPruner" in msg
    )


@pytest.mark.parametrize(
    "body",
    [
        "class: SparsityLevelParameterPruner\nlevels: {conv1.weight: 0.5}",
        "class: AutomatedGradualPruner\ninitial_sparsity: 0.05\nfinal_sparsity: 0.7\nweights: [conv1.weight]",
    ],
)
def test_element_wise_pruners_rejected(body: str) -> None:
    with pytest.raises(ScheduleError, match=r"element-wise .*only supports filter pruning"):
        load_schedule(_one_pruner(body))


@pytest.mark.parametrize("structure", ["Channels", "Rows", "Cols"])
def test_non_filter_reg_regims_rejected(structure: str) -> None:
    body = f"class: L1RankedStructureParameterPruner\nreg_regims:\n  conv1.weight: [0.5, {structure}]"
    with pytest.raises(ScheduleError) as e:
        load_schedule(_one_pruner(body))
    assert structure in str(e.value) and "filter pruning" in str(e.value) and "conv1.weight" in str(e.value)


def test_bare_float_reg_regim_is_element_wise() -> None:
    body = "class: L1RankedStructureParameterPruner\nreg_regims:\n  module.conv1.weight: 0.5"
    with pytest.raises(ScheduleError, match=r"bare sparsity \(0.5\) means element-wise"):
        load_schedule(_one_pruner(body))


def test_group_type_required_and_checked() -> None:
    with pytest.raises(ScheduleError, match="no 'group_type'"):
        load_schedule(
            _one_pruner("class: L1RankedStructureParameterPruner\ndesired_sparsity: 0.5\nweights: [c.weight]")
        )
    with pytest.raises(ScheduleError, match="unknown group type 'Filterz'"):
        load_schedule(
            _one_pruner(
                "class: L1RankedStructureParameterPruner\ngroup_type: Filterz\ndesired_sparsity: 0.5\nweights: [c.weight]"
            )
        )


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("value", ["0.96", "-0.1", "1.0", "half", "true"])
def test_bad_desired_sparsity(value: str) -> None:
    body = f"class: L1RankedStructureParameterPruner\ngroup_type: Filters\ndesired_sparsity: {value}\nweights: [c.weight]"
    with pytest.raises(ScheduleError) as e:
        load_schedule(_one_pruner(body, name="greedy"))
    msg = str(e.value)
    assert "'greedy'" in msg and "desired_sparsity" in msg
    assert value in msg or value.title() in msg


def test_sparsity_limits_are_inclusive() -> None:
    for value in (0, 0.95):
        body = f"class: L1RankedStructureParameterPruner\ngroup_type: Filters\ndesired_sparsity: {value}\nweights: [c.weight]"
        assert load_schedule(_one_pruner(body)).groups[0].sparsity == value


@pytest.mark.parametrize("weight", ["layer1.0.bn1.bias", "layer1.0.conv1", "weight", "module..weight"])
def test_weight_must_be_a_module_weight(weight: str) -> None:
    body = f"class: L1RankedStructureParameterPruner\ngroup_type: Filters\ndesired_sparsity: 0.5\nweights: ['{weight}']"
    with pytest.raises(ScheduleError) as e:
        load_schedule(_one_pruner(body))
    assert f"'{weight}' is not a module's weight tensor" in str(e.value)


def test_module_prefix_normalisation() -> None:
    body = (
        "class: L1RankedStructureParameterPruner\ngroup_type: Filters\ndesired_sparsity: 0.5\n"
        "weights: [module.layer1.0.conv1.weight, features.module.0.weight, fc.weight]"
    )
    assert load_schedule(_one_pruner(body)).groups[0].layers == ["layer1.0.conv1", "features.0", "fc"]


def test_same_layer_in_two_pruners() -> None:
    text = _yaml(
        """
        pruners:
          first:
            class: L1RankedStructureParameterPruner
            group_type: Filters
            desired_sparsity: 0.3
            weights: [module.layer1.0.conv1.weight]
          second:
            class: L2RankedStructureParameterPruner
            group_type: Filters
            desired_sparsity: 0.5
            weights: [layer1.0.conv1.weight]
        policies:
          - pruner: {instance_name: first}
            epochs: [0]
          - pruner: {instance_name: second}
            epochs: [0]
        """
    )
    with pytest.raises(ScheduleError) as e:
        load_schedule(text)
    msg = str(e.value)
    assert "'layer1.0.conv1'" in msg and "'first'" in msg and "'second'" in msg


def test_same_layer_twice_in_one_pruner() -> None:
    body = (
        "class: L1RankedStructureParameterPruner\ngroup_type: Filters\ndesired_sparsity: 0.5\n"
        "weights: [module.conv1.weight, conv1.weight]"
    )
    with pytest.raises(ScheduleError, match="listed twice"):
        load_schedule(_one_pruner(body))


def test_unreferenced_pruner_is_excluded_with_warning() -> None:
    text = _yaml(
        """
        pruners:
          used:
            class: L1RankedStructureParameterPruner
            group_type: Filters
            desired_sparsity: 0.3
            weights: [conv1.weight]
          spare:
            class: ActivationAPoZRankedFilterPruner
            group_type: Filters
            desired_sparsity: 0.5
            weights: [conv1.weight]
        policies:
          - pruner:
              instance_name: used
            starting_epoch: 0
            ending_epoch: 1
            frequency: 1
        """
    )
    s = load_schedule(text)
    assert [g.name for g in s.groups] == ["used"]
    assert any("'spare'" in w and "not applied by any policy" in w for w in s.warnings)


def test_policy_naming_unknown_pruner() -> None:
    text = _one_pruner(
        "class: L1RankedStructureParameterPruner\ngroup_type: Filters\ndesired_sparsity: 0.5\nweights: [c.weight]"
    )
    text += "  - pruner: {instance_name: ghost}\n    epochs: [1]\n"
    with pytest.raises(ScheduleError) as e:
        load_schedule(text)
    assert "'ghost'" in str(e.value) and "not defined" in str(e.value) and "defined: p" in str(e.value)


def test_no_policy_applies_a_pruner() -> None:
    text = _one_pruner(
        "class: L1RankedStructureParameterPruner\ngroup_type: Filters\ndesired_sparsity: 0.5\nweights: [c.weight]",
        policy=False,
    )
    with pytest.raises(ScheduleError, match="no pruner is applied"):
        load_schedule(text)


def test_other_sections_warn() -> None:
    text = _one_pruner(
        "class: L1RankedStructureParameterPruner\ngroup_type: Filters\ndesired_sparsity: 0.5\nweights: [c.weight]"
    )
    text += _yaml(
        """
        quantizers:
          linear_quantizer:
            class: QuantAwareTrainRangeLinearQuantizer
            bits_activations: 8
        regularizers:
          lasso:
            class: GroupLassoRegularizer
            reg_regims:
              module.layer1.0.conv1.weight: [0.0002, Filters]
        extensions:
          net_thinning:
            class: FilterRemover
            thinning_func_str: remove_filters
          stats:
            class: ActivationStatsCollector
        """
    )
    s = load_schedule(text)
    assert len(s.groups) == 1
    joined = "\n".join(s.warnings)
    assert "'quantizers' section ignored" in joined and "'regularizers' section ignored" in joined
    assert "extension 'stats'" in joined and "net_thinning" not in joined


# ---------------------------------------------------------------------------------------------- malformed input


def test_malformed_yaml() -> None:
    with pytest.raises(ScheduleError, match="not valid YAML"):
        load_schedule("pruners:\n  p: [unclosed\n")


def test_duplicate_keys_rejected() -> None:
    text = _one_pruner(
        "class: L1RankedStructureParameterPruner\ngroup_type: Filters\ndesired_sparsity: 0.5\ndesired_sparsity: 0.9\nweights: [c.weight]"
    )
    with pytest.raises(ScheduleError, match="duplicate key 'desired_sparsity'"):
        load_schedule(text)


def test_missing_pruners_section() -> None:
    with pytest.raises(ScheduleError, match="no 'pruners' section"):
        load_schedule("version: 1\nlr_schedulers:\n  lr: {class: StepLR}\n")
    with pytest.raises(ScheduleError, match="'pruners' must be a mapping"):
        load_schedule("version: 1\npruners: [a, b]\n")


def test_not_a_mapping_and_empty() -> None:
    with pytest.raises(ScheduleError, match="expected a YAML mapping"):
        load_schedule("- just\n- a list\n")
    with pytest.raises(ScheduleError, match="empty"):
        load_schedule("# nothing here\n\n")


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ScheduleError, match="does not exist") as e:
        load_schedule(missing)
    assert str(missing) in str(e.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(
        "pruners:\n  p:\n    class: L1RankedStructureParameterPruner\n    group_type: Rows\n"
        "    desired_sparsity: 0.5\n    weights: [fc.weight]\npolicies:\n  - pruner: {instance_name: p}\n"
    )
    with pytest.raises(ScheduleError, match=r"bad\.yaml: pruner 'p' prunes 'Rows'"):
        load_schedule(f)


# ---------------------------------------------------------------------------------------------- rounding


def _distiller_count(n_elems: int, group_len: int, fraction: float) -> int:
    """Distiller's num_structs_to_prune (distiller/norms.py) with rounding_fn=math.floor, restated."""
    k = math.floor(fraction * n_elems)
    k = int(math.floor(k * 1.0 / group_len) * group_len)
    return n_elems - group_len if k == n_elems and fraction != 1.0 else k


@pytest.mark.parametrize(
    ("n", "s", "expected"),
    [
        (16, 0.6, 9),
        (10, 0.3, 3),
        (64, 0.95, 60),
        (32, 0.0, 0),
        (100, 0.29, 28),  # 0.29 * 100 == 28.999999999999996 in floating point, as in Distiller
        (100, 0.57, 56),
        (100, 0.58, 57),
        (50, 0.58, 28),
        (90, 0.7, 62),
        (100, 0.3, 30),
        (10, 0.7, 7),
        (7, 1, 7),  # an explicit 1 removes everything, in Distiller too
        (0, 0.5, 0),
    ],
)
def test_filters_to_remove_examples(n: int, s: float, expected: int) -> None:
    assert filters_to_remove(n, s) == expected


def test_filters_to_remove_differs_from_exact_decimals_where_distiller_does() -> None:
    for n, s in ((100, 0.29), (100, 0.57), (100, 0.58)):
        assert filters_to_remove(n, s) == math.floor(Fraction(str(s)) * n) - 1 == _distiller_count(n, 1, s)


@given(n=st.integers(min_value=1, max_value=4096), s=st.floats(min_value=0.0, max_value=1.0))
def test_filters_to_remove_is_distillers_count(n: int, s: float) -> None:
    assert filters_to_remove(n, s) == _distiller_count(n, 1, s)


@given(n=st.integers(min_value=1, max_value=4096), k=st.integers(min_value=0, max_value=10_000))
def test_filters_to_remove_at_four_decimals(n: int, k: int) -> None:
    s = k / 10_000
    assert filters_to_remove(n, s) == math.floor(s * n)  # never rounds up to n: the n - 1 rule is not hit
    assert filters_to_remove(n, s) < n or s == 1


def test_filters_to_remove_never_removes_everything_below_one() -> None:
    """Distiller's rule: when the product reaches n although the fraction is not 1, remove n - 1. A float
    below 1 never gets there; a 28-digit Decimal does (0.999...9 * 3 rounds to 3)."""
    almost = Decimal("0." + "9" * 30)
    assert almost * 3 == 3 and almost != 1
    assert filters_to_remove(3, almost) == 2
    assert filters_to_remove(100, almost) == 99
    assert filters_to_remove(100, math.nextafter(1.0, 0.0)) == 99
    assert filters_to_remove(100, 1.0) == 100


def test_filters_to_remove_numpy_and_exact_types() -> None:
    import numpy as np

    assert filters_to_remove(10, np.float32(0.7)) == 7  # float32 arithmetic: float32(0.7) * 10 rounds to 7.0
    assert filters_to_remove(100, np.float64(0.29)) == 28
    assert filters_to_remove(10, np.float64(0.3)) == 3
    assert filters_to_remove(3, Fraction(2, 3)) == 2
    assert filters_to_remove(np.int64(20), 0.35) == 7
    assert isinstance(filters_to_remove(np.int64(20), np.float32(0.35)), int)


def test_filters_to_remove_rejects_bad_input() -> None:
    for n, s in ((-1, 0.5), (10, 1.5), (10, -0.1), (10, float("nan")), (2.5, 0.5), (10, "0.5"), (True, 0.5),
                 (10, Decimal("NaN")), (10, float("inf"))):
        with pytest.raises(ValueError):
            filters_to_remove(n, s)  # type: ignore[arg-type]
