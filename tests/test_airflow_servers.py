"""End to end with real servers on loopback: `pruneflow airflow up` in a tmp home, a rapid trial
triggered by REST and one by the `airflow` CLI, both run to success by the scheduler and recorded in the
results DB; auth and Param validation of the REST API; `down` leaves no process; a second `up` reuses
the home and keeps every trial.

The tests of this module run in order and share one set of servers (tests/airflow_servers.py).
"""

from __future__ import annotations

import json
import stat
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from airflow_servers import DAG_ID, AirflowServers, airflow_servers, port_open  # noqa: F401

from pruneflow import airflow_cli
from pruneflow.store import ResultsStore

pytestmark = pytest.mark.slow

# A rapid trial as small as the DAG's Params allow: a 16x16 ResNet-20 baseline trained for 2 epochs
# (the first trial trains it, the second reuses it), no fine-tuning, 2 rounds x 20 timed calls.
RAPID = {"image_size": 16, "baseline_epochs": 3, "epochs": 0, "warmup": 5, "rounds": 2, "iterations": 20}
TRIAL_TIMEOUT = 300


def _trial_failure(servers: AirflowServers, client: httpx.Client, run_id: str, run: dict) -> str:
    states = servers.task_states(client, run_id)
    logs = []
    for task_id, state in states.items():
        if state == "failed":
            r = client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/logs/1",
                           headers={"Accept": "text/plain"})
            logs.append(f"--- {task_id}\n{r.text[-4000:]}")
    return f"run {run_id} ended {run.get('state')}: {states}\n" + "\n".join(logs)


def test_up_is_healthy_idempotent_and_keeps_its_password(airflow_servers: AirflowServers):  # noqa: F811
    s = airflow_servers
    print(f"pruneflow airflow up: {s.up_seconds:.1f}s\n{s.up_output}")
    # The health endpoint needs no token and reports every component.
    health = httpx.get(f"{s.url}/api/v2/monitor/health", timeout=30).json()
    assert {k: v["status"] for k, v in health.items()} == {
        "metadatabase": "healthy", "scheduler": "healthy", "dag_processor": "healthy", "triggerer": "healthy"}

    # The password is generated at first init, printed once, and kept owner-only.
    assert stat.S_IMODE(s.passwords_file.stat().st_mode) == 0o600
    assert f"password: {s.password}" in s.up_output
    assert stat.S_IMODE((s.home / "airflow.cfg").stat().st_mode) == 0o600

    pids = s.running()
    assert set(pids) == set(airflow_cli.COMPONENTS)
    # each pid file: the pid and its start in clock ticks after boot (unmoved by a stepped wall clock)
    assert all(airflow_cli.Home(s.home).pidfile(n).read_text().split()[1].isdigit() for n in pids)
    again = s.pruneflow("up", "--port", str(s.port))
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout and s.password not in again.stdout
    assert s.running() == pids, "a second `up` must not start duplicates"

    init = s.pruneflow("init")
    assert init.returncode == 0, init.stderr
    assert s.password not in init.stdout and str(s.passwords_file) in init.stdout

    status = s.pruneflow("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"{s.url}/" in status.stdout and "stopped" not in status.stdout

    # init made the machine-wide CPU pool (a slot per core here) and the benchmark pool (one slot).
    with s.client() as client:
        for name, slots in (("cpu", 2), ("benchmark_cpu", 1)):
            pool = client.get(f"/api/v2/pools/{name}")
            assert pool.status_code == 200 and pool.json()["slots"] == slots, pool.text


def test_rest_needs_a_token(airflow_servers: AirflowServers):  # noqa: F811
    s = airflow_servers
    assert httpx.get(f"{s.url}/api/v2/dags", timeout=60).status_code == 401
    # An invalid token is refused too (Airflow 3.3 answers 403 to a token it cannot decode).
    assert httpx.get(f"{s.url}/api/v2/dags", timeout=60,
                     headers={"Authorization": "Bearer not-a-token"}).status_code in (401, 403)
    bad = httpx.post(f"{s.url}/auth/token", json={"username": "admin", "password": "wrong"}, timeout=60)
    assert bad.status_code == 401
    with s.client() as client:
        assert client.get("/api/v2/dags").status_code == 200


def test_bad_conf_is_refused_and_names_the_field(airflow_servers: AirflowServers):  # noqa: F811
    s = airflow_servers
    with s.client() as client:
        params = s.wait_for_dag(client)["params"]
        assert {"sparsities", "criterion", "rounds", "iterations"} <= set(params)
        r = client.post(f"/api/v2/dags/{DAG_ID}/dagRuns",
                        json={"logical_date": None, "conf": {"sparsities": {"layer3": 1.5}}})
        assert r.status_code == 400, r.text
        assert "sparsities" in r.text and "1.5" in r.text
        r = client.post(f"/api/v2/dags/{DAG_ID}/dagRuns",
                        json={"logical_date": None, "conf": {"criterion": "largest"}})
        assert r.status_code == 400, r.text
        assert "criterion" in r.text
        # a conf never names code to import: refused by the Param schema, before any task runs
        marker = s.out / "marker"
        r = client.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": {
            "model": "os:system", "model_kwargs": {"command": f"touch {marker}"}}})
        assert r.status_code == 400, r.text
        assert "model" in r.text and "os:system" in r.text
        assert not marker.exists()


def _wait_for_task(servers: AirflowServers, client: httpx.Client, run_id: str, task_id: str,
                   timeout: float = TRIAL_TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = servers.task_states(client, run_id).get(task_id)
        if state in ("success", "failed", "upstream_failed", "skipped"):
            return state
        time.sleep(2)
    return str(state)


# a task's process starts before its stage registers, and ends after
MARGIN = timedelta(seconds=2)


def _interval(ti: dict) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"])


def test_trials_triggered_by_rest_and_cli_run_to_success(airflow_servers: AirflowServers):  # noqa: F811
    """One trial triggered by REST, one by `airflow dags trigger -c JSON` once the first has trained
    the shared baseline; they overlap, except for their benchmarks, which run alone on the CPU."""
    s = airflow_servers
    with s.client() as client:
        s.wait_for_dag(client)
        s.set_paused(client, DAG_ID, False)
        conf = {**RAPID, "trial_id": "e2e-rest", "name": "e2e-rest", "sparsities": {"layer3": 0.5}}
        t0 = time.monotonic()
        r = client.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
        assert r.status_code == 200, r.text
        rest_run = r.json()["dag_run_id"]
        assert r.json()["conf"]["trial_id"] == "e2e-rest"

        # The second trial reuses the baseline the first one trains (in prune_to_export: a rapid trial).
        state = _wait_for_task(s, client, rest_run, "prune_to_export")
        assert state == "success", _trial_failure(s, client, rest_run, {"state": state})
        print(f"baseline trained by the first trial after {time.monotonic() - t0:.1f}s")
        cli_conf = {**RAPID, "trial_id": "e2e-cli", "name": "e2e-cli", "criterion": "l2",
                    "sparsities": {"layer1": 0.25, "layer3": 0.75}}
        proc = s.airflow("dags", "trigger", DAG_ID, "-c", json.dumps(cli_conf), "-r", "e2e-cli-run")
        assert proc.returncode == 0, proc.stdout + proc.stderr

        for run_id in (rest_run, "e2e-cli-run"):
            run = s.wait_for_run(client, run_id, timeout=TRIAL_TIMEOUT)
            print(f"{run_id}: {run.get('state')} after {time.monotonic() - t0:.1f}s")
            assert run["state"] == "success", _trial_failure(s, client, run_id, run)
        assert client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/e2e-cli-run").json()["conf"] == cli_conf

        tis = [ti for run_id in (rest_run, "e2e-cli-run") for ti in
               client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()["task_instances"]]
    benches = [ti for ti in tis if ti["task_id"] == "benchmark"]
    assert {(b["pool"], b["pool_slots"]) for b in benches} == {("benchmark_cpu", 1)}
    (a0, a1), (b0, b1) = sorted(_interval(b) for b in benches)
    assert a1 <= b0, f"the two benchmarks overlapped: {a0}..{a1} and {b0}..{b1}"
    torch_tasks = [ti for ti in tis if ti["task_id"] not in ("benchmark", "record") and ti["state"] != "skipped"]
    assert {t["task_id"] for t in torch_tasks} == {"validate", "prune_to_export"}  # a rapid trial's path
    assert {t["task_id"]: (t["pool"], t["pool_slots"]) for t in torch_tasks} == {
        "validate": ("default_pool", 1), "prune_to_export": ("cpu", 1)}
    # A torch task running through a whole benchmark task (with a margin for its own start and end) was
    # registered while the benchmark measured, so the benchmark stopped it (pruneflow.cpu_pause).
    for b in benches:
        b0, b1 = _interval(b)
        covering = [t for t in torch_tasks if _interval(t)[0] < b0 - MARGIN and _interval(t)[1] > b1 + MARGIN]
        trial = {rest_run: "e2e-rest", "e2e-cli-run": "e2e-cli"}[b["dag_run_id"]]
        paused = json.loads((s.out / "trials" / trial / "latency.json").read_text())["paused_cpu_tasks"]
        assert paused >= len(covering), (b, covering, paused)

    store = ResultsStore(s.results_db)
    for trial_id in ("e2e-rest", "e2e-cli"):
        row = store.get_trial(trial_id)
        assert row is not None and row["status"] == "succeeded", row
        assert row["latency_median_ms"] and row["latency_median_ms"] > 0
        assert row["params_after"] < row["params_before"]
        assert (row["artifact_dir"] or "").startswith(str(s.out / "trials"))


def test_executor_workers_hold_torch_before_any_task(airflow_servers: AirflowServers):  # noqa: F811
    """The embedded default's executor imports [pruneflow] preload in its worker processes, so the task
    processes they fork start with torch loaded (pruneflow_airflow/executor.py)."""
    cfg = (airflow_servers.home / "airflow.cfg").read_text()
    assert "executor = pruneflow_airflow.executor.PreloadingLocalExecutor" in cfg
    workers = [p for p in airflow_servers.processes()
               if Path(f"/proc/{p.pid}/cmdline").read_bytes().startswith(b"airflow worker -- LocalExecutor")]
    assert workers, f"no LocalExecutor worker among {airflow_servers.processes()}"
    for p in workers:
        maps = Path(f"/proc/{p.pid}/maps").read_text()
        assert "libtorch_cpu" in maps and "openvino" in maps, f"worker {p.pid} has not preloaded torch/openvino"


def test_down_stops_everything_and_up_keeps_home_and_trials(airflow_servers: AirflowServers):  # noqa: F811
    s = airflow_servers
    before = s.processes()
    assert len(before) >= len(airflow_cli.COMPONENTS)
    cfg = (s.home / "airflow.cfg").read_text()
    password = s.password

    t0 = time.monotonic()
    down = s.down()
    print(f"pruneflow airflow down: {time.monotonic() - t0:.1f}s ({len(before)} processes)\n{down.stdout}")
    assert down.returncode == 0, down.stdout + down.stderr
    assert [p for p in before if p.alive()] == []
    assert s.processes() == []
    assert not port_open(s.port)
    assert not list((s.home / "run").glob("*.pid"))
    status = s.pruneflow("status")
    assert status.returncode != 0 and status.stdout.count("stopped") == len(airflow_cli.COMPONENTS)
    assert "nothing running" in s.down().stdout

    # A pool setting edited while down resizes the pool at the next `up` (a DAG file's benchmark in the CPU
    # pool asks for every slot of the new size, and a task asking more slots than its pool has never runs).
    (s.home / "airflow.cfg").write_text(cfg.replace("cpu_pool_slots = 2", "cpu_pool_slots = 3"))
    s.up()
    assert "pool cpu: 3 slot(s)" in s.up_output, s.up_output
    with s.client() as client:
        assert client.get("/api/v2/pools/cpu").json()["slots"] == 3
    assert s.down().returncode == 0
    (s.home / "airflow.cfg").write_text(cfg)

    # A second `up` reuses the home: same config and secrets, same password, every trial and run kept.
    s.up()
    assert "pool cpu: 2 slot(s)" in s.up_output, s.up_output
    assert "password:" not in s.up_output.replace("password: in", "")
    assert (s.home / "airflow.cfg").read_text() == cfg and s.password == password
    trials = {t["trial_id"]: t["status"] for t in ResultsStore(s.results_db).list_trials()}
    assert trials == {"e2e-rest": "succeeded", "e2e-cli": "succeeded"}
    with s.client() as client:
        runs = client.get(f"/api/v2/dags/{DAG_ID}/dagRuns").json()
        assert {"e2e-cli-run"} <= {r["dag_run_id"] for r in runs["dag_runs"]}
        assert runs["total_entries"] == 2
