"""Which benchmark worker measures a trial (pruneflow.bench_targets): the deployment's targets and a
trial's pick among them, refused with the field and the allowed values named."""

import pytest

from pruneflow.bench_targets import BenchTarget, bench_targets, route
from pruneflow.spec import SpecError, parse_spec
from pruneflow.trial_conf import spec_from_conf

TARGETS = bench_targets("cpu1, cpu0, ncs2", "bench_cpu0", "bench_cpu0")


def test_targets_one_per_device_default_first():
    assert [t.name for t in TARGETS] == ["cpu0", "cpu1", "ncs2"]
    assert TARGETS[1] == BenchTarget("cpu1", "bench_cpu1", "bench_cpu1")
    # no devices (the embedded default): the one configured queue and pool, unnamed
    assert bench_targets(" ", "default", "benchmark_cpu") == (BenchTarget("", "default", "benchmark_cpu"),)
    with pytest.raises(ValueError, match=r"\[pruneflow\] devices: 'cpu 1'"):
        bench_targets("cpu0,cpu 1", "bench_cpu0", "")


def test_route_by_target_then_legacy_device_then_default():
    assert route("CPU", None, TARGETS).name == "cpu0"
    assert route("CPU", "cpu1", TARGETS).queue == "bench_cpu1"
    assert route("MYRIAD", None, TARGETS).queue == "bench_ncs2"
    assert route("AUTO:MYRIAD,CPU", "ncs2", TARGETS).name == "ncs2"
    assert route("CPU", "ncs2", TARGETS).name == "ncs2"  # the NCS2 host's own CPU is a device too


@pytest.mark.parametrize("device, target, targets, message", [
    ("CPU", "cpu9", TARGETS, "benchmark.target: 'cpu9' is not a benchmark target of this deployment "
                             "(allowed: cpu0, cpu1, ncs2"),
    ("MYRIAD", "cpu1", TARGETS, "benchmark.device: 'MYRIAD' runs only on the legacy worker of queue bench_ncs2"),
    ("MYRIAD", None, bench_targets("cpu0", "bench_cpu0", ""), "add ncs2 to [pruneflow] devices"),
    ("MYRIAD", None, bench_targets("", "default", "benchmark_cpu"), "targets: none (no [pruneflow] devices"),
    ("CPU", "cpu0", bench_targets("", "default", "benchmark_cpu"), "allowed: none"),
])
def test_bad_routes_name_the_field_and_the_allowed_values(device, target, targets, message):
    with pytest.raises(SpecError) as exc:
        route(device, target, targets)
    assert message in str(exc.value)


def test_target_is_a_trial_spec_field_and_a_conf_key():
    spec = spec_from_conf({"bench_target": "cpu1"}, "run")
    assert spec.benchmark.target == "cpu1"
    assert spec_from_conf({"bench_target": ""}, "run").benchmark.target is None  # a cleared form field
    with pytest.raises(SpecError, match="benchmark.target"):
        parse_spec({"benchmark": {"target": "no spaces allowed"}})
