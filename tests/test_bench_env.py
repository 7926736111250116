"""The benchmark worker's own environment, .venv-bench (``make bench-env``, requirements-bench.lock): no
torch, yet everything the benchmark task of prune_trial loads imports there and a real benchmark runs,
recording who measured it (latency.json ``worker``, the trial's ``bench_*`` columns).

The tests run under the main venv and drive .venv-bench's interpreter by subprocess. A missing
.venv-bench fails them (never skips): ``make test`` builds it first.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import airflow_env
import pytest

from pruneflow import stages
from pruneflow.spec import parse_spec
from pruneflow.store import ResultsStore

REPO = Path(__file__).resolve().parents[1]
BENCH_VENV = REPO / ".venv-bench"
BENCH_PY = BENCH_VENV / "bin" / "python"
STAMP = BENCH_VENV / ".installed"

#: what the benchmark task (and its failure callback) of prune_trial imports on the benchmark worker
WORKER_MODULES = ("pruneflow.bench", "pruneflow.stages", "pruneflow.spec", "pruneflow.store", "pruneflow.settings",
                  "pruneflow.migrations", "pruneflow.trial_conf", "pruneflow.data", "pruneflow.threads",
                  "pruneflow_airflow.params", "pruneflow_airflow.operators", "openvino", "onnxruntime",
                  "celery", "redis", "airflow.providers.celery.executors.celery_executor",
                  "pruneflow.artifacts", "s3fs", "pruneflow_airflow.preload", "pruneflow_airflow.celery_config")
#: what the benchmark worker must not have
NOT_THERE = ("torch", "torch_pruning", "sklearn", "onnx", "onnxscript", "torchvision")
_TORCHISH = ("torch", "torch_pruning", "sklearn", "onnxscript", "torchvision")


@pytest.fixture(scope="module")
def bench_python() -> Path:
    if not BENCH_PY.is_file() or not STAMP.is_file():
        pytest.fail(f"{BENCH_VENV} is missing or incomplete: run `make bench-env` (it builds the benchmark "
                    "worker's environment from requirements-bench.lock)", pytrace=False)
    return BENCH_PY


def _run(python: Path, code: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in ``python`` outside the repo (so only the installed pruneflow is importable)."""
    full = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    full.pop("PYTHONPATH", None)
    return subprocess.run([str(python), "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full, cwd="/", timeout=timeout)


def _last_json(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_env_is_a_separate_python_311_venv(bench_python):
    out = _last_json(_run(bench_python, "import json, sys; print(json.dumps([sys.prefix, sys.version_info[:2]]))"))
    assert Path(out[0]).resolve() == BENCH_VENV.resolve()
    assert out[1] == [3, 11]


def test_torch_and_friends_are_not_installed(bench_python):
    code = f"""
        import importlib, json
        out = {{}}
        for name in {NOT_THERE!r}:
            try:
                importlib.import_module(name)
                out[name] = "imported"
            except ModuleNotFoundError as exc:
                out[name] = "ModuleNotFoundError" if exc.name == name else f"ModuleNotFoundError({{exc.name}})"
            except Exception as exc:
                out[name] = type(exc).__name__
        print(json.dumps(out))
    """
    assert _last_json(_run(bench_python, code)) == dict.fromkeys(NOT_THERE, "ModuleNotFoundError")


def test_every_module_the_benchmark_worker_loads_imports_without_torch(bench_python, tmp_path):
    code = f"""
        import importlib, json, sys, traceback
        errors = {{}}
        for name in {WORKER_MODULES!r}:
            try:
                importlib.import_module(name)
            except Exception:
                errors[name] = traceback.format_exc(limit=3)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {_TORCHISH!r})
        print(json.dumps({{"errors": errors, "loaded": loaded}}))
    """
    out = _last_json(_run(bench_python, code, env=airflow_env.env_for(tmp_path)))
    assert out["errors"] == {}
    assert out["loaded"] == []


def test_prune_trial_dag_parses_in_the_bench_env(bench_python, tmp_path):
    """A Celery worker parses the DAG file before it runs one of its tasks."""
    code = f"""
        import json, sys
        from airflow.dag_processing.dagbag import DagBag
        bag = DagBag(dag_folder={str(REPO / 'dags' / 'prune_trial.py')!r})
        dag = bag.dags.get("prune_trial")
        print(json.dumps({{"errors": {{k: str(v)[-2000:] for k, v in bag.import_errors.items()}},
                          "tasks": sorted(dag.task_dict) if dag else None,
                          "bench_class": type(dag.task_dict["benchmark"]).__name__ if dag else None,
                          "torch": sorted(m for m in sys.modules if m.split(".")[0] in {_TORCHISH!r})}}))
    """
    out = _last_json(_run(bench_python, code, env=airflow_env.env_for(tmp_path)))
    assert out["errors"] == {}
    assert "benchmark" in out["tasks"] and out["bench_class"] == "BenchmarkOperator"
    assert out["torch"] == []


def _exported_trial(spec_dict: dict, trial_id: str):
    """A trial taken through export with the main venv (torch): what the benchmark worker receives."""
    spec = stages.resolve_spec(parse_spec({**spec_dict, "trial_id": trial_id}))
    stages.ensure_baseline(spec)
    stages.prepare(spec)
    for stage in ("prune", "thinnify", "retrain", "export"):
        getattr(stages, stage)(spec)
    assert not (spec.trial_dir() / "latency.json").exists()
    return spec


def test_a_real_benchmark_runs_in_the_bench_env_and_records_the_worker(bench_python, spec_dict):
    spec = _exported_trial({**spec_dict, "benchmark": {**spec_dict["benchmark"], "backend": "openvino"}}, "benv")
    code = f"""
        import json, sys
        from pruneflow import stages
        from pruneflow.spec import parse_spec
        spec = parse_spec(json.loads({spec.model_dump_json()!r}))
        out = stages.benchmark(spec, worker={{"queue": "bench_test_q"}})
        stages.record(spec)
        assert not [m for m in sys.modules if m.split(".")[0] in {_TORCHISH!r}]
        print(json.dumps(out, default=str))
    """
    out = _last_json(_run(bench_python, code))
    assert out["latency_median_ms"] > 0
    lat = json.loads((spec.trial_dir() / "latency.json").read_text())
    assert lat["latency_ms"]["median"] > 0 and lat["backend"] == "openvino"
    worker = lat["worker"]
    assert Path(worker["env"]).resolve() == BENCH_VENV.resolve()
    assert Path(worker["python"]).parent.resolve() == BENCH_PY.parent.resolve()
    assert worker["queue"] == "bench_test_q"
    assert worker["host"] == socket.gethostname()
    assert worker["cpu_model"] == lat["cpu_model"]
    assert lat["versions"]["openvino"]  # measured with the bench env's runtime
    store = ResultsStore(spec.db)
    try:
        row = store.get_trial("benv")
        assert row["status"] == "succeeded" and row["latency_median_ms"] == lat["latency_ms"]["median"]
        assert (row["bench_host"], row["bench_queue"]) == (socket.gethostname(), "bench_test_q")
        assert Path(row["bench_env"]).resolve() == BENCH_VENV.resolve()
        assert row["versions_json"]["torch"] is None  # recorded by the worker, which has no torch
        assert len(store.benchmarks("benv")) == 1
    finally:
        store.close()


def test_the_failure_callback_records_in_the_bench_env(bench_python, spec_dict, tmp_path):
    """BenchmarkOperator's on_failure_callback (pruneflow_airflow.operators.record_failure) runs on the
    benchmark worker: it marks the trial failed there, keeping what the earlier stages measured."""
    spec = _exported_trial(spec_dict, "benvfail")
    code = f"""
        import json
        from types import SimpleNamespace
        from pruneflow.spec import parse_spec
        from pruneflow_airflow.operators import BenchmarkOperator, record_failure
        task = BenchmarkOperator(task_id="benchmark", queue="bench_test_q")
        task._trial_spec = parse_spec(json.loads({spec.model_dump_json()!r}))
        record_failure({{"ti": SimpleNamespace(task_id="benchmark"), "task": task,
                        "exception": RuntimeError("device unplugged")}})
        print(json.dumps("ok"))
    """
    assert _last_json(_run(bench_python, code, env=airflow_env.env_for(tmp_path))) == "ok"
    store = ResultsStore(spec.db)
    try:
        row = store.get_trial("benvfail")
    finally:
        store.close()
    assert (row["status"], row["reason"]) == ("failed", "benchmark: device unplugged")
    assert row["params_after"] is not None and row["bench_host"] is None  # no benchmark ran
    assert json.loads((spec.trial_dir() / "error.json").read_text())["stage"] == "benchmark"


def test_in_process_trial_records_this_process_as_the_worker(spec_dict):
    """run_trial (no Airflow, no queue): the DB row says this host and this Python environment measured it."""
    spec = parse_spec({**spec_dict, "trial_id": "inproc"})
    stages.run_trial(spec)
    store = ResultsStore(spec.db)
    try:
        row = store.get_trial("inproc")
    finally:
        store.close()
    assert row["status"] == "succeeded"
    assert (row["bench_host"], row["bench_queue"], row["bench_env"]) == (socket.gethostname(), None, sys.prefix)


def test_benchmark_operator_passes_its_queue_to_the_library(bench_python, tmp_path):
    """In a subprocess: airflow may be imported in the test process only after tests/airflow_env.configure()."""
    code = """
        import json
        from pruneflow import stages
        from pruneflow_airflow.operators import BenchmarkOperator
        calls = []
        stages.abandoned_reason = lambda spec: None
        stages.benchmark = lambda spec, progress, **kw: calls.append(kw) or {"ok": 1}
        op = BenchmarkOperator(task_id="benchmark", queue="bench_cpu_host1")
        print(json.dumps([op.run_stage(object(), {}), calls]))
    """
    out = _last_json(_run(bench_python, code, env=airflow_env.env_for(tmp_path)))
    assert out == [{"ok": 1}, [{"worker": {"queue": "bench_cpu_host1"}}]]
