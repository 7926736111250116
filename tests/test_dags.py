"""The Airflow side: DAG files parse cleanly and light, prune_trial runs a rapid trial end to end with
dag.test(), bad confs are refused with the field named, failures and re-runs are recorded correctly.

Everything runs against a throw-away Airflow home (tests/airflow_env.py); airflow is imported only
after it is configured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import airflow_env
import pytest

from pruneflow import settings, trial_conf
from pruneflow.constants import ID_RE

# a trial that fine-tunes: one task per stage; a rapid trial: its torch stages in prune_to_export
STAGED = ["validate", "ensure_baseline", "prune", "thinnify", "retrain", "export", "benchmark", "record"]
RAPID = ["validate", "prune_to_export", "benchmark", "record"]
TASKS = STAGED[:-2] + ["prune_to_export"] + STAGED[-2:]


def _rapid_states(**states: str) -> dict[str, str]:
    """The task states of a rapid trial's run: its path as given (default success), the staged one skipped."""
    return {**dict.fromkeys(STAGED[1:-2], "skipped"), **dict.fromkeys(RAPID, "success"), **states}

# a rapid trial on a tiny baseline: 16x16 digits, 1 epoch on 256 samples; short benchmark
# a rapid trial on a small baseline: 16x16 digits, 3 epochs (enough to stay above chance once pruned and
# recalibrated); short benchmark
FAST = {"image_size": 16, "baseline_epochs": 3, "rounds": 2, "iterations": 20, "warmup": 5,
        "sparsities": {"layer1": 0.25, "layer2": 0.25, "layer3": 0.25}}


@pytest.fixture(scope="module")
def af_env(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in airflow_env.RESTORE}
    yield airflow_env.configure(tmp_path_factory.mktemp("af"))
    for k, v in saved.items():  # later test modules see their own PRUNEFLOW_* paths again
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def dagbag(af_env):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(airflow_env.DAGS))


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags["prune_trial"]


def _store():
    from pruneflow.store import ResultsStore

    return ResultsStore(os.environ["PRUNEFLOW_DB"])


def _test(dag, **kwargs):
    """dag.test() on a freshly parsed DAG. In-process, a run's conf overwrites the defaults of the DAG's
    own Param objects (the task's ParamsDict shares them, and updating it with the conf resolves them
    in place), so a second dag.test() on the same object would inherit the first one's conf."""
    from airflow.dag_processing.dagbag import DagBag

    fresh = DagBag(dag_folder=str(airflow_env.DAGS / "prune_trial.py")).dags[dag.dag_id]
    return fresh.test(**kwargs)


def _states(dr) -> dict[str, str]:
    return {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in dr.get_task_instances()}


# ---------------------------------------------------------------- conf -> spec (no Airflow needed)

def test_conf_defaults_are_the_embedded_default_rapid_trial(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEFLOW_ARTIFACTS", str(tmp_path / "a"))
    monkeypatch.setenv("PRUNEFLOW_DB", "sqlite:///rel/results.db")
    monkeypatch.setenv("PRUNEFLOW_BASELINES", str(tmp_path / "b"))
    monkeypatch.setenv("PRUNEFLOW_HOME", str(tmp_path))
    spec = trial_conf.spec_from_conf({}, "manual__2026-11-02T10:00:00.123456+00:00")
    assert spec.trial_id == "manual__2026-11-02T10_00_00.123456_00_00"
    assert (spec.model.name, spec.dataset.name, spec.dataset.image_size) == ("resnet20", "digits", 32)
    assert [(g.name, g.patterns, g.sparsity) for g in spec.pruning.groups] == [
        (f"layer{i}", [f"layer{i}.*.conv1"], 0.5) for i in (1, 2, 3)]
    assert spec.finetune.epochs == 0
    assert spec.artifacts == str(tmp_path / "a")
    assert spec.db == f"sqlite:///{tmp_path}/rel/results.db"  # relative to the project home, not the cwd
    assert spec.baseline.checkpoint == str(tmp_path / "b" / "resnet20-digits-32" / "baseline.pt")

    mine = str(tmp_path / "b" / "mine.pt")
    s = trial_conf.spec_from_conf({"sparsities": {"layer3": 0.75}, "trial_id": "mine", "baseline": mine,
                                   "spec_overrides": {"finetune": {"batch_size": 32}}}, "ignored")
    assert [g.sparsity for g in s.pruning.groups] == [0.5, 0.5, 0.75]
    assert (s.trial_id, s.baseline.checkpoint, s.finetune.batch_size) == ("mine", mine, 32)


def test_trial_id_from_run_id_is_stable_and_valid():
    long = "scheduled__" + "x" * 200
    for run_id in ("manual__2026-11-02T10:00:00+00:00", "__weird run/id:1", long, "+++"):
        tid = settings.safe_id(run_id)
        assert tid == settings.safe_id(run_id)
        assert ID_RE.match(tid), tid
    assert settings.safe_id(long) != settings.safe_id(long + "y")
    # a cleared form field ("") counts as not set
    spec = trial_conf.spec_from_conf({"trial_id": "", "study": "", "baseline": ""}, "manual__x")
    assert (spec.trial_id, spec.study) == ("manual__x", None)


def test_spec_from_conf_names_the_conf_key():
    from pruneflow.spec import SpecError

    cases = [
        ({"backend": "onnxruntime", "precision": "f16"}, "precision='f16' is not supported with backend='onnxruntime'"),
        ({"sparsity": 0.5}, "sparsity: unknown conf key"),
        ({"sparsities": {"layer9": 0.1}}, "sparsities.layer9: no group named 'layer9'"),
        ({"groups": [{"name": "a", "patterns": ["x"], "sparsity": 1.5}]}, "groups.0.sparsity: Input should be less"),
        ({"device": "cpu"}, "device: Value error, device 'cpu'"),
        ({"spec_overrides": {"finetune": {"batch_size": 0}}}, "(spec field finetune.batch_size)"),
    ]
    for conf, expected in cases:
        with pytest.raises(SpecError) as exc:
            trial_conf.spec_from_conf(conf, "r")
        assert expected in str(exc.value), (conf, str(exc.value))


# ---------------------------------------------------------------- DAG files

def test_dag_folder_imports_and_prune_trial_reads_like_the_pipeline(dagbag, dag):
    assert dagbag.import_errors == {}
    assert [t.task_id for t in dag.topological_sort()] == TASKS
    assert dag.task_dict["validate"].downstream_task_ids == {"ensure_baseline", "prune_to_export"}
    for path in (STAGED[1:], RAPID[1:]):
        for up, down in zip(path, path[1:], strict=False):
            assert dag.task_dict[up].downstream_task_ids == {down}
    assert str(dag.task_dict["benchmark"].trigger_rule) in (
        "none_failed_min_one_success", "TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS")
    assert dag.schedule is None and dag.catchup is False
    assert {t.task_id: t.retries for t in dag.tasks} == {t: 2 if t in ("benchmark", "record") else 0 for t in TASKS}
    assert all(t.execution_timeout for t in dag.tasks)
    assert str(dag.task_dict["record"].trigger_rule) in ("none_failed", "TriggerRule.NONE_FAILED")
    bench = dag.task_dict["benchmark"]
    assert (bench.pool, bench.queue) == ("benchmark_cpu", "default")
    # every user-facing field is a typed Param whose default is the configured default
    params = dag.params
    assert set(params.keys()) == set(trial_conf.defaults())
    for key, default in trial_conf.defaults().items():
        p = params.get_param(key)
        assert p.value == default, key
        assert p.schema.get("type") and p.description, key


def test_a_lane_retries_but_not_when_the_dense_trial_failed_for_good(dagbag, tmp_path):
    """A lane is retried (Airflow can fail a deferred task on a late executor event, and a lane picks up
    where it was), but a dense trial that failed DENSE_ATTEMPTS times fails it at once: retries would not
    change that."""
    import optuna
    from airflow.sdk.exceptions import AirflowFailException

    from pruneflow.sweep import DENSE_ATTEMPTS, open_study, parse_sweep, slot_key

    lane = dagbag.dags["prune_sweep"].task_dict["run_trials"]
    assert lane.retries >= 1
    sweep = parse_sweep({"study": "lane", "base": {"baseline": {"checkpoint": "unused.pt"},
                                                   "artifacts": str(tmp_path / "trials"),
                                                   "db": f"sqlite:///{tmp_path / 'r.db'}"},
                         "space": [{"name": "a", "patterns": ["layer1.*.conv1"], "low": 0.0, "high": 0.8}],
                         "objective": "top1_under_latency", "latency_budget": {"value": 0.8, "unit": "fraction"}})
    study = open_study(sweep)
    for _ in range(DENSE_ATTEMPTS):
        t = study.ask()
        t.set_user_attr("dense", True)
        t.set_user_attr("slot", slot_key("run", 0))
        study.tell(t, state=optuna.trial.TrialState.FAIL)
    from pruneflow_airflow.sweep_lane import SweepLaneOperator

    operator = SweepLaneOperator(task_id="lane_test", items=[{"slot": 0}])
    with pytest.raises(AirflowFailException, match="the dense trial failed"):
        operator._current(sweep, "run")


def test_prune_sweep_form_is_the_sweep_spec(dagbag):
    from pruneflow.sweep_conf import sweep_defaults

    params = dagbag.dags["prune_sweep"].params
    assert set(params.keys()) == set(sweep_defaults())
    for key, default in sweep_defaults().items():
        assert params.get_param(key).value == default, key
    assert params.get_param("sampler").schema["enum"] == ["tpe", "random", "grid", "nsga2"]


def test_dag_files_parse_without_torch_and_take_queue_and_pool_from_config(af_env):
    code = (
        "import sys, json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(airflow_env.DAGS)!r})\n"
        "t = bag.dags['prune_trial'].task_dict['benchmark']\n"
        "s = bag.dags['prune_sensitivity'].task_dict['benchmark']\n"
        "print(json.dumps({'errors': list(bag.import_errors), 'heavy': sorted(m for m in ('torch', 'openvino', "
        "'onnxruntime', 'torch_pruning', 'pruneflow.stages') if m in sys.modules), "
        "'queue': t.queue, 'pool': t.pool, 'sensitivity': [s.queue, s.pool]}))\n"
    )
    env = {**os.environ, "AIRFLOW__PRUNEFLOW__BENCHMARK_QUEUE": "npu-host-1",
           "AIRFLOW__PRUNEFLOW__BENCHMARK_POOL": "npu0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"errors": [], "heavy": [], "queue": "npu-host-1", "pool": "npu0",
                      "sensitivity": ["npu-host-1", "npu0"]}


# ---------------------------------------------------------------- bad confs are refused

@pytest.mark.parametrize("conf, param", [
    ({"groups": [{"name": "layer1", "patterns": ["layer1.*.conv1"], "sparsity": 1.5}]}, "groups"),
    ({"sparsities": {"layer3": 1.5}}, "sparsities"),
    ({"criterion": "foo"}, "criterion"),
    ({"image_size": 4}, "image_size"),
    ({"model": "os:system", "model_kwargs": {"command": "touch marker"}}, "model"),  # no code from a conf
])
def test_params_refuse_bad_values_at_trigger_time(dag, conf, param):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=f"Invalid input for param {param}:"):
        _test(dag, run_conf=conf)


def test_spec_error_fails_fast_in_validate_with_the_field_named(dag):
    # a combination no single Param can refuse: onnxruntime runs f32 only
    dr = _test(dag, run_conf={**FAST, "trial_id": "bad-spec", "backend": "onnxruntime", "precision": "f16"})
    states = _states(dr)
    assert str(dr.state) in ("failed", "DagRunState.FAILED")
    assert states["validate"] == "failed"
    assert {states[t] for t in TASKS[1:]} == {"upstream_failed"}  # nothing trained
    row = _store().get_trial("bad-spec")
    assert row["status"] == "failed"
    assert row["reason"].startswith("validate: invalid trial conf")
    assert "precision='f16' is not supported with backend='onnxruntime'" in row["reason"]


# ---------------------------------------------------------------- end to end

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture(scope="module")
def trial_run(dag):
    """One rapid trial through prune_trial, on a baseline that ensure_baseline trains (tiny)."""
    dr = _test(dag, run_conf=FAST, logical_date=T0, run_after=T0)
    return dr, settings.safe_id(dr.run_id)


def test_rapid_trial_end_to_end_is_recorded(trial_run):
    dr, trial_id = trial_run
    assert _states(dr) == _rapid_states()
    assert str(dr.state) in ("success", "DagRunState.SUCCESS")
    baseline = os.path.join(os.environ["PRUNEFLOW_BASELINES"], "resnet20-digits-16", "baseline.pt")
    assert os.path.isfile(baseline)  # trained and registered by ensure_baseline
    row = _store().get_trial(trial_id)
    assert row["status"] == "succeeded", row["reason"]
    assert row["latency_median_ms"] > 0
    assert row["top1_final"] is not None and row["top1_masked"] is not None
    assert {g: s["achieved"] for g, s in row["sparsities_json"].items()} == {"layer1": 0.25, "layer2": 0.25,
                                                                               "layer3": 0.25}
    assert row["top1_recalibrated"] > row["top1_masked"] and row["top1_source"] == "recalibrated"
    assert row["params_after"] < row["params_before"]
    assert row["spec_json"]["baseline"]["checkpoint"] == baseline
    assert len(_store().benchmarks(trial_id)) == 1


def test_rerunning_benchmark_and_record_does_not_duplicate(dag, trial_run):
    dr, trial_id = trial_run
    latency = os.path.join(os.environ["PRUNEFLOW_ARTIFACTS"], trial_id, "latency.json")
    before = os.stat(latency).st_mtime_ns
    # the same run again (same run id -> same trial); only validate, benchmark and record really run
    dr2 = _test(dag, run_conf=FAST, logical_date=T0, run_after=T0, mark_success_pattern="prune_to_export")
    assert dr2.run_id == dr.run_id
    assert _states(dr2) == _rapid_states()
    assert os.stat(latency).st_mtime_ns > before  # benchmark measured again
    store = _store()
    assert [r["trial_id"] for r in store.list_trials() if r["trial_id"] == trial_id] == [trial_id]
    assert len(store.benchmarks(trial_id)) == 1
    assert store.get_trial(trial_id)["status"] == "succeeded"


def test_failing_stage_fails_the_run_and_records_the_reason(dag, trial_run):
    dr = _test(dag, run_conf={**FAST, "trial_id": "parity-fail", "parity_atol": 1e-12, "parity_rtol": 1e-12})
    states = _states(dr)
    assert str(dr.state) in ("failed", "DagRunState.FAILED")
    assert states == _rapid_states(prune_to_export="failed", benchmark="upstream_failed", record="upstream_failed")
    row = _store().get_trial("parity-fail")
    assert row["status"] == "failed"
    assert row["reason"].startswith("export: export parity failed")
    assert row["top1_masked"] is not None  # what earlier stages measured is kept
    error = json.loads((Path(os.environ["PRUNEFLOW_ARTIFACTS"]) / "parity-fail" / "error.json").read_text())
    assert error["stage"] == "export"


def test_abandoned_trial_skips_export_and_benchmark_and_is_recorded(dag, trial_run):
    # an impossible learning rate keeps the network at chance: retrain abandons it after one epoch
    dr = _test(dag, run_conf={**FAST, "trial_id": "gave-up", "epochs": 1, "lr": 10, "finetune_chance_patience": 1})
    assert str(dr.state) in ("success", "DagRunState.SUCCESS")
    assert _states(dr) == {**dict.fromkeys(STAGED, "success"), "prune_to_export": "skipped", "export": "skipped",
                           "benchmark": "skipped"}
    row = _store().get_trial("gave-up")
    assert row["status"] == "abandoned" and "chance" in row["reason"]
    assert row["latency_median_ms"] is None and _store().benchmarks("gave-up") == []


def test_fashion_mnist_trial_on_a_subset_through_prune_trial(dag, trial_run):
    """The form's data set keys: Fashion-MNIST from Debian's folder, a subset, augmentation on."""
    # a short baseline (3 epochs of 400 images: about 25% Top-1), pruned lightly so the trial is not at chance
    conf = {**FAST, "trial_id": "fm-dag", "dataset": "fashion-mnist", "dataset_max_train_samples": 800,
            "dataset_val_fraction": 0.02, "baseline_epochs": 3, "images_per_epoch": 400,
            "augment_crop_padding": 2, "augment_hflip": True,
            "sparsities": {"layer1": 0.0, "layer2": 0.0, "layer3": 0.25}}
    dr = _test(dag, run_conf=conf)
    assert str(dr.state) in ("success", "DagRunState.SUCCESS"), _states(dr)
    row = _store().get_trial("fm-dag")
    assert row["status"] == "succeeded" and row["latency_median_ms"] > 0
    ds = row["spec_json"]["dataset"]
    assert (ds["name"], ds["images_per_epoch"], ds["augment"]) == ("fashion-mnist", 400, {"crop_padding": 2, "hflip": True})
    baseline = json.loads((Path(os.environ["PRUNEFLOW_BASELINES"]) / "resnet20-fashion-mnist-16" / "baseline.json").read_text())
    assert [h["images"] for h in baseline["history"]] == [400] * 3  # images per epoch reached the baseline's training


def test_several_benchmark_targets_branch_to_the_trials_own(dag, trial_run, monkeypatch):
    """[pruneflow] devices names two targets: one benchmark task per target on its queue and pool, behind
    route_benchmark, which follows the trial's benchmark.target; a target or a device the deployment has
    no worker for is refused in validate, before anything is trained."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.pool import Pool

    monkeypatch.setenv("AIRFLOW__PRUNEFLOW__DEVICES", "cpu0,cpu1")
    monkeypatch.setenv("AIRFLOW__PRUNEFLOW__BENCHMARK_QUEUE", "bench_cpu0")
    monkeypatch.setenv("AIRFLOW__PRUNEFLOW__BENCHMARK_POOL", "bench_cpu0")
    for pool in ("bench_cpu0", "bench_cpu1"):
        Pool.create_or_update_pool(pool, 1, "one benchmark at a time", include_deferred=False)
    routed = DagBag(dag_folder=str(airflow_env.DAGS / "prune_trial.py")).dags["prune_trial"]
    assert routed.task_dict["export"].downstream_task_ids == {"route_benchmark"}
    assert routed.task_dict["prune_to_export"].downstream_task_ids == {"route_benchmark"}
    assert routed.task_dict["route_benchmark"].downstream_task_ids == {"benchmark_cpu0", "benchmark_cpu1"}
    assert {t: (routed.task_dict[t].queue, routed.task_dict[t].pool, routed.task_dict[t].pool_slots)
            for t in ("benchmark_cpu0", "benchmark_cpu1")} == {
        "benchmark_cpu0": ("bench_cpu0", "bench_cpu0", 1), "benchmark_cpu1": ("bench_cpu1", "bench_cpu1", 1)}

    dr = routed.test(run_conf={**FAST, "trial_id": "on-cpu1", "bench_target": "cpu1"})
    states = _states(dr)
    assert str(dr.state) in ("success", "DagRunState.SUCCESS"), states
    assert (states["route_benchmark"], states["benchmark_cpu1"], states["benchmark_cpu0"], states["record"]) == (
        "success", "success", "skipped", "success")
    assert _store().get_trial("on-cpu1")["bench_queue"] == "bench_cpu1"

    for trial_id, conf, message in (
            ("no-cpu9", {"bench_target": "cpu9"}, "benchmark.target: 'cpu9' is not a benchmark target of this "
                                                   "deployment (allowed: cpu0, cpu1"),
            ("no-ncs2", {"device": "MYRIAD", "precision": "f16"}, "add ncs2 to [pruneflow] devices")):
        dr = DagBag(dag_folder=str(airflow_env.DAGS / "prune_trial.py")).dags["prune_trial"].test(
            run_conf={**FAST, "trial_id": trial_id, **conf})
        assert _states(dr)["validate"] == "failed" and _states(dr)["prune_to_export"] == "upstream_failed"
        row = _store().get_trial(trial_id)
        assert row["status"] == "failed" and message in row["reason"], row["reason"]


def test_preload_imports_what_it_can_and_skips_the_rest(af_env):
    """The preloading executor's worker start: a module that cannot be imported is skipped (the task
    imports it again and fails with the real error), the others are imported."""
    from pruneflow_airflow.preload import preload_modules

    assert preload_modules(" json, pruneflow.spec,, no_such_module_pf ,") == ["json", "pruneflow.spec"]
    assert preload_modules("") == []


def test_torch_work_registers_the_task_for_benchmarks_to_pause_unless_turned_off(af_env, tmp_path, monkeypatch):
    """Every stage that runs torch (stage_environment) and a baseline trained in ensure_baseline run as
    torch_work: the task's process is registered in the host's folder of CPU tasks while it works."""
    from pruneflow.cpu_pause import registered_tasks
    from pruneflow_airflow.operators import torch_work

    folder = tmp_path / "cpu-tasks"
    monkeypatch.setenv("PRUNEFLOW_CPU_TASKS", str(folder))
    with torch_work("t ensure_baseline"):
        entry = json.loads((folder / f"{os.getpid()}.json").read_text())
        assert entry["pid"] == os.getpid() and entry["label"] == "t ensure_baseline"
    assert registered_tasks(folder) == [] and not list(folder.glob("*.json"))
    monkeypatch.setenv("AIRFLOW__PRUNEFLOW__BENCHMARK_PAUSES_TORCH_TASKS", "False")
    with torch_work("t"):
        assert not list(folder.glob("*.json"))


def test_prune_sensitivity_writes_the_profile_its_table_and_plot(dagbag, trial_run, tmp_path, monkeypatch):
    """One prune_sensitivity run on the baseline the trial above trained: validate, measure_points,
    benchmark, write_profile; the profile holds one row per set and sparsity, in the reports folder."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("PRUNEFLOW_REPORTS", str(tmp_path / "reports"))
    assert dagbag.import_errors == {}
    dag = DagBag(dag_folder=str(airflow_env.DAGS / "prune_sensitivity.py")).dags["prune_sensitivity"]
    assert [t.task_id for t in dag.topological_sort()] == ["validate", "measure_points", "benchmark",
                                                           "write_profile"]
    assert set(dag.params.keys()) == {"name", "sparsities", "sets", "trial"}
    trial = {k: v for k, v in FAST.items() if k != "sparsities"}
    dr = dag.test(run_conf={"name": "sens-dag", "sparsities": [0.5], "sets": ["layer3.2.*"], "trial": trial})
    assert str(dr.state) in ("success", "DagRunState.SUCCESS"), _states(dr)
    profile = json.loads((tmp_path / "reports" / "sensitivity" / "sens-dag" / "profile.json").read_text())
    assert profile["model"] == "resnet20" and profile["dataset"]["image_size"] == 16
    assert profile["sets"] and all(any(layer.startswith("layer3.2.") for layer in s["layers"]) for s in profile["sets"])
    assert [[p["sparsity"] for p in s["points"]] for s in profile["sets"]] == [[0.5]] * len(profile["sets"])
    assert (tmp_path / "reports" / "sensitivity" / "sens-dag" / "sensitivity.png").is_file()
    assert _store().get_sensitivity("sens-dag") == profile  # and in the deployment's results DB

    # bad input is refused in validate, with the field named, before any point is measured
    bad = DagBag(dag_folder=str(airflow_env.DAGS / "prune_sensitivity.py")).dags["prune_sensitivity"].test(
        run_conf={"name": "sens-bad", "sparsities": [0.99], "trial": trial})
    states = _states(bad)
    assert states["validate"] == "failed" and states["measure_points"] == "upstream_failed"
    assert not (Path(os.environ["PRUNEFLOW_ARTIFACTS"]) / "sens-bad-dense").exists()
