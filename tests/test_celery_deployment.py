"""The distributed deployment on one machine, end to end: `pruneflow airflow up --executor celery` in a
tmp home starts Redis, PostgreSQL, the servers on CeleryExecutor, a training worker (queue default) and
two torch-free benchmark workers (devices cpu0 and cpu1: queues bench_cpu0 and bench_cpu1, .venv-bench),
with the artifacts in a real object store (SeaweedFS); a rapid trial triggered by REST runs its training
stages on the first and its benchmark on the second, each in its own scratch folder, the files travelling
only through the store; secrets stay private; the two devices measure at the same time, each one
benchmark at a time; a sweep survives a restart of redis-server; a results DB whose PostgreSQL server is
down when record runs costs a retry; the benchmark worker killed with SIGKILL during a benchmark costs a
retry, not the trial; `down` leaves nothing.

The tests of this module run in order and share one deployment.
"""

from __future__ import annotations

import json
import shutil
import signal
import stat
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import psutil
import pytest
from airflow_servers import DAG_ID, REPO, AirflowServers, free_port
from pg_server import PgServer, pg_server  # noqa: F401
from s3_server import s3_store  # noqa: F401
from sqlalchemy import create_engine, text

from pruneflow import airflow_cli, services
from pruneflow.artifacts import ArtifactStore
from pruneflow.store import ResultsStore

pytestmark = pytest.mark.slow

BENCH_VENV = REPO / ".venv-bench"
RAPID = {"image_size": 16, "baseline_epochs": 3, "epochs": 0, "warmup": 5, "rounds": 2, "iterations": 20}
TRIAL_TIMEOUT = 420
# A worker lost with its task: the scheduler fails the task instance after this many seconds without a
# heartbeat (default 300) and Airflow retries it (the benchmark task has retries).
HEARTBEAT_TIMEOUT = 20


FAULTS_DB = "faults"


@pytest.fixture(scope="module")
def celery(s3_store, pg_server: PgServer) -> AirflowServers:  # noqa: F811
    if not (BENCH_VENV / "bin" / "python").is_file():
        pytest.fail(f"{BENCH_VENV} is missing: `make bench-env` (a dependency of `make test`)")
    # Not under pytest's tmp folder (mode 0700): as root, PostgreSQL runs as the postgres user, who must
    # be able to enter every parent of its data folder.
    root = Path(tempfile.mkdtemp(prefix="pruneflow-celery-"))
    root.chmod(0o711)
    # A second results DB the deployment allows, on a server of its own that a test restarts.
    admin = create_engine(pg_server.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {FAULTS_DB}"))
    admin.dispose()
    # Artifacts through the object store: the workers share no trial folder (each has its own scratch).
    s = AirflowServers(root=root, port=free_port(), executor="celery", devices="cpu0,cpu1",
                       extra_env={"PRUNEFLOW_ALLOWED_DBS": _faults_url(pg_server),"AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
                                  "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
                                  "PRUNEFLOW_ARTIFACTS": f"s3://{s3_store.bucket}/celery-{time.time_ns()}",
                                  **s3_store.env()})
    s.up()
    yield s
    s.down()
    left = s.processes() + services.Services(s.home).processes()
    assert not left, f"processes left after `pruneflow airflow down`: {left}"
    shutil.rmtree(root, ignore_errors=True)


def _faults_url(pg: PgServer) -> str:
    return pg.url.rsplit("/", 1)[0] + "/" + FAULTS_DB


def _svc(s: AirflowServers) -> services.Services:
    return services.Services(s.home)


def _results(s: AirflowServers) -> ResultsStore:
    """The deployment's results DB (its PostgreSQL `pruneflow` database), read by the test with the password."""
    svc = _svc(s)
    url = svc.pg_url(services.RESULTS_DB).replace(
        f"{services.PG_USER}@", f"{services.PG_USER}:{svc.secrets()['postgres_password']}@")
    return ResultsStore(url)


def _trigger(s: AirflowServers, client: httpx.Client, conf: dict) -> str:
    r = client.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
    assert r.status_code == 200, r.text
    return r.json()["dag_run_id"]


def _tis(client: httpx.Client, run_id: str) -> dict[str, dict]:
    r = client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
    return {ti["task_id"]: ti for ti in r.json()["task_instances"]}


def _failure(s: AirflowServers, client: httpx.Client, run_id: str) -> str:
    tis = _tis(client, run_id)
    logs = {name: _log_tail(s, name) for name in ("scheduler", "worker-default", "worker-bench_cpu0",
                                                  "worker-bench_cpu1")}
    return f"{run_id}: {({t: ti['state'] for t, ti in tis.items()})}\n" + "\n".join(
        f"--- {k}\n{v}" for k, v in logs.items())


def _log_tail(s: AirflowServers, name: str, n: int = 30) -> str:
    try:
        return "\n".join((s.home / "logs" / f"{name}.log").read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def test_up_starts_every_service_and_status_lists_queues_and_envs(celery: AirflowServers):
    home = airflow_cli.Home(celery.home)
    assert home.executor() == "celery"
    assert set(airflow_cli.running(home)) == set(airflow_cli.components(home))
    assert {"worker-default", "worker-bench_cpu0", "worker-bench_cpu1"} <= set(airflow_cli.components(home))
    svc = _svc(celery)
    assert svc.pid("redis") and svc.pid("postgres")
    proc = celery.pruneflow("status")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    for device in ("cpu0", "cpu1"):
        assert f"queue bench_{device}" in lines[f"worker-bench_{device}"]
        assert str(BENCH_VENV) in lines[f"worker-bench_{device}"]
    assert "queue default" in lines["worker-default"]
    assert "running" in lines["redis"] and "running" in lines["postgres"]


def _maps(ps: psutil.Process) -> str:
    try:
        return Path(f"/proc/{ps.pid}/maps").read_text()
    except OSError:
        return ""


def test_workers_preload_their_modules_once(celery: AirflowServers):
    """The training worker's pool processes hold torch before any task; the benchmark worker preloads
    OpenVINO and never loads torch (pruneflow_airflow/celery_config.py, [pruneflow] bench_preload)."""
    pids = airflow_cli.running(airflow_cli.Home(celery.home))
    train = psutil.Process(pids["worker-default"]).children(recursive=True)
    assert any("libtorch_cpu" in _maps(c) for c in train), "the training worker has not preloaded torch"
    bench = [psutil.Process(pids["worker-bench_cpu0"]), *psutil.Process(pids["worker-bench_cpu0"]).children(recursive=True)]
    assert any("libopenvino" in _maps(c) for c in bench), "the benchmark worker has not preloaded OpenVINO"
    assert not any("libtorch" in _maps(c) for c in bench)


def test_access_needs_the_generated_secrets(celery: AirflowServers):
    import psycopg2
    import redis

    svc = _svc(celery)
    ports, sec = svc.ports(), svc.secrets()
    for path in (svc.secrets_path, svc.pgpass, svc.redis_conf, celery.home / "airflow.cfg"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=services.HOST, port=ports["redis"], socket_timeout=5).ping()
    assert redis.Redis(host=services.HOST, port=ports["redis"], password=sec["redis_password"], socket_timeout=5).ping()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host=services.HOST, port=ports["postgres"], user=services.PG_USER, dbname="pruneflow",
                         password="wrong-" + sec["postgres_password"], connect_timeout=10)
    # No secret in any log so far (the last test of the module checks logs, tracked files and DB rows again).
    logs = [p for p in celery.home.rglob("*.log") if p.is_file()]
    assert logs
    for value in (sec["redis_password"], sec["postgres_password"], sec["jwt_secret"]):
        for p in logs:
            assert value not in p.read_text(errors="replace"), f"a secret is in {p}"


def test_trial_trains_on_the_default_queue_and_benchmarks_in_the_torch_free_worker(celery: AirflowServers):
    s = celery
    with s.client() as client:
        s.wait_for_dag(client)
        assert client.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}).status_code == 200
        run_id = _trigger(s, client, {**RAPID, "trial_id": "celery-1", "name": "celery-1",
                                      "sparsities": {"layer3": 0.5}})
        run = s.wait_for_run(client, run_id, timeout=TRIAL_TIMEOUT)
        assert run["state"] == "success", _failure(s, client, run_id)
        tis = _tis(client, run_id)
    assert tis["benchmark_cpu0"]["queue"] == "bench_cpu0" and tis["benchmark_cpu0"]["pool"] == "bench_cpu0"
    assert tis["benchmark_cpu1"]["state"] == "skipped"  # the default target is the first device
    assert {tis[t]["queue"] for t in ("prune_to_export", "route_benchmark", "record")} == {"default"}
    assert {tis[t]["state"] for t in ("ensure_baseline", "prune", "thinnify", "retrain", "export")} == {"skipped"}
    row = _results(s).get_trial("celery-1")
    assert row is not None and row["status"] == "succeeded", row
    assert row["bench_queue"] == "bench_cpu0"
    assert Path(row["bench_env"]).resolve() == BENCH_VENV.resolve(), row["bench_env"]
    # the trial's files went through the object store; the benchmark worker fetched only what it reads
    url = s.extra_env["PRUNEFLOW_ARTIFACTS"]
    assert row["artifact_dir"] == f"{url}/celery-1"
    bench_dir = s.home / "scratch" / "worker-bench_cpu0" / "celery-1"
    assert {p.name for p in bench_dir.iterdir()} == {"epochs.json", "reference.npz", "model.xml", "model.bin",
                                                     "latency.json"}
    assert (s.home / "scratch" / "worker-default" / "celery-1" / "thinned.pt").is_file()
    store = ArtifactStore(url, storage_options=s3_store_options(s))
    worker = json.loads(store.fs.cat_file(f"{store.root}/celery-1/latency.json"))["worker"]
    assert worker["queue"] == "bench_cpu0" and Path(worker["env"]).resolve() == BENCH_VENV.resolve(), worker
    assert "latency.json" in store.manifest("celery-1")


def _interval(ti: dict) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"])


def test_two_devices_measure_at_once_and_each_device_one_benchmark_at_a_time(celery: AirflowServers):
    """Four trials, two per target (benchmark.target): each benchmark runs on its device's queue; the two
    devices' benchmarks overlap in time, the two of one device never do (intervals from the task records)."""
    s = celery
    # several seconds of timed calls each, so that the two devices' benchmarks meet
    confs = [{**RAPID, "trial_id": f"two-dev-{i}", "name": f"two-dev-{i}", "bench_target": f"cpu{i % 2}",
              "sparsities": {"layer3": 0.25 * (1 + i % 2)}, "rounds": 3, "iterations": 15000} for i in range(4)]
    with s.client() as client:
        run_ids = [_trigger(s, client, conf) for conf in confs]
        for run_id in run_ids:
            run = s.wait_for_run(client, run_id, timeout=TRIAL_TIMEOUT)
            assert run["state"] == "success", _failure(s, client, run_id)
        tis = [_tis(client, run_id) for run_id in run_ids]
    by_device: dict[str, list[tuple[datetime, datetime]]] = {"cpu0": [], "cpu1": []}
    for conf, ti in zip(confs, tis, strict=True):
        device = conf["bench_target"]
        other = "cpu1" if device == "cpu0" else "cpu0"
        bench = ti[f"benchmark_{device}"]
        assert (bench["queue"], bench["pool"], ti[f"benchmark_{other}"]["state"]) == (
            f"bench_{device}", f"bench_{device}", "skipped")
        assert _results(s).get_trial(conf["trial_id"])["bench_queue"] == f"bench_{device}"
        by_device[device].append(_interval(bench))
    for device, ((a0, a1), (b0, b1)) in ((d, sorted(v)) for d, v in by_device.items()):
        assert a1 <= b0, f"two benchmarks on {device} overlapped: {a0}..{a1} and {b0}..{b1}"
    assert any(x0 < y1 and y0 < x1 for x0, x1 in by_device["cpu0"] for y0, y1 in by_device["cpu1"]), \
        f"the two devices never measured at the same time: {by_device}"


SPACE = [{"name": "layer1", "patterns": ["layer1.*.conv1"], "low": 0.0, "high": 0.8, "step": 0.2},
         {"name": "layer3", "patterns": ["layer3.*.conv1"], "low": 0.0, "high": 0.8, "step": 0.2}]


def test_a_sweep_survives_a_redis_restart(celery: AirflowServers):
    """redis-server stops (SIGTERM: it writes its append-only file) and starts again while a sweep's
    trials run: the sweep finishes, every asked trial is told once, none is lost or run twice."""
    import optuna

    s = celery
    svc = _svc(celery)
    conf = {"study": "celery-sweep", "n_trials": 2, "parallel": 2, "sampler": "random", "space": SPACE,
            "trial": {k: v for k, v in RAPID.items() if k != "epochs"}}
    with s.client() as client:
        s.wait_for_dag(client, "prune_sweep")
        assert client.patch("/api/v2/dags/prune_sweep", json={"is_paused": False}).status_code == 200
        r = client.post("/api/v2/dags/prune_sweep/dagRuns", json={"logical_date": None, "conf": conf})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + TRIAL_TIMEOUT
        while True:  # until a trial of the sweep has started a task
            runs = [t for t in client.get(f"/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 100}).json()["dag_runs"]
                    if (t.get("conf") or {}).get("study") == "celery-sweep"]
            if any(ti["state"] == "running" for t in runs for ti in _tis(client, t["dag_run_id"]).values()):
                break
            assert time.monotonic() < deadline, f"no trial of the sweep started: {runs}"
            time.sleep(0.5)
        redis_pid = svc.pid("redis")
        psutil.Process(redis_pid).terminate()
        psutil.wait_procs([psutil.Process(redis_pid)], timeout=30)
        time.sleep(2)  # clients see the broker gone
        svc.start(say=lambda *_: None)
        assert svc.pid("redis") not in (None, redis_pid)

        deadline = time.monotonic() + 2 * TRIAL_TIMEOUT
        while True:
            sweeps = client.get("/api/v2/dags/prune_sweep/dagRuns", params={"limit": 100}).json()["dag_runs"]
            states = [r["state"] for r in sweeps]
            assert "failed" not in states, _log_tail(s, "scheduler")
            if sweeps and all(x == "success" for x in states):
                break
            assert time.monotonic() < deadline, f"sweep not finished: {states}"
            time.sleep(2)
        trial_runs = [t for t in client.get(f"/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 100}).json()["dag_runs"]
                      if (t.get("conf") or {}).get("study") == "celery-sweep"]
    assert len(trial_runs) == 2
    rows = [r for r in _results(s).list_trials() if r["trial_id"].startswith("celery-sweep-")]
    assert sorted(r["trial_id"] for r in rows) == [f"celery-sweep-{i:04d}" for i in range(2)]
    assert all(r["status"] in ("succeeded", "abandoned") for r in rows), \
        [(r["trial_id"], r["status"], r.get("reason")) for r in rows]
    study = optuna.load_study(study_name="celery-sweep", storage=_results(s).engine.url.render_as_string(hide_password=False))
    assert len(study.trials) == 2
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)


def test_results_db_down_when_record_runs_costs_a_retry(celery: AirflowServers, pg_server: PgServer):  # noqa: F811
    """The trial's results DB (one the deployment allows, on a PostgreSQL server of its own) stops while the
    trial measures and starts again once record has failed against it: record is retried and the trial is
    recorded once, whole."""
    s = celery
    trial = "pg-restart"
    conf = {**RAPID, "trial_id": trial, "name": trial, "db": _faults_url(pg_server), "sparsities": {"layer2": 0.25},
            "rounds": 3, "iterations": 5000}
    with s.client() as client:
        run_id = _trigger(s, client, conf)
        deadline = time.monotonic() + TRIAL_TIMEOUT
        while _tis(client, run_id)["benchmark_cpu0"]["state"] != "running":
            assert time.monotonic() < deadline, _failure(s, client, run_id)
            time.sleep(0.2)
        pg_server.stop()
        try:
            while (record := _tis(client, run_id)["record"])["state"] != "up_for_retry":
                assert record["state"] not in ("success", "failed"), _failure(s, client, run_id)
                assert time.monotonic() < deadline, _failure(s, client, run_id)
                time.sleep(0.2)
        finally:
            pg_server.start()
        run = s.wait_for_run(client, run_id, timeout=TRIAL_TIMEOUT)
        assert run["state"] == "success", _failure(s, client, run_id)
        record = _tis(client, run_id)["record"]
    assert record["try_number"] == 2, record
    store = ResultsStore(_faults_url(pg_server))
    try:
        assert [r["trial_id"] for r in store.list_trials()] == [trial]
        row = store.get_trial(trial)
        assert row["status"] == "succeeded" and row["latency_median_ms"] > 0, row
        assert len(store.benchmarks(trial)) == 1
    finally:
        store.close()


def s3_store_options(s: AirflowServers) -> dict:
    env = s.extra_env
    return {"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": env["AWS_ENDPOINT_URL"], "region_name": env["AWS_DEFAULT_REGION"]}}


def _bench_worker_tree(s: AirflowServers) -> list[psutil.Process]:
    pid = airflow_cli.running(airflow_cli.Home(s.home))["worker-bench_cpu0"]
    ps = psutil.Process(pid)
    return [ps, *ps.children(recursive=True)]


def test_benchmark_worker_killed_mid_benchmark_costs_a_retry_not_the_trial(celery: AirflowServers):
    """SIGKILL to the benchmark worker and every process under it (its host died) while it measures;
    the worker comes back (`up` starts what is missing); the task is retried and the trial succeeds,
    with one trial row and one benchmark row."""
    s = celery
    # long enough to be caught in the middle: tens of thousands of timed calls
    conf = {**RAPID, "trial_id": "celery-kill", "name": "celery-kill", "sparsities": {"layer2": 0.5},
            "rounds": 3, "iterations": 20000}
    with s.client() as client:
        run_id = _trigger(s, client, conf)
        deadline = time.monotonic() + TRIAL_TIMEOUT
        while True:  # until the benchmark's task process runs under the worker
            tree = _bench_worker_tree(s)
            if _tis(client, run_id)["benchmark_cpu0"]["state"] == "running" and len(tree) >= 3:
                break
            assert time.monotonic() < deadline, _failure(s, client, run_id)
            assert s.wait_for_run(client, run_id, timeout=0)["state"] not in ("success", "failed"), \
                _failure(s, client, run_id)
            time.sleep(0.2)
        for ps in tree:
            ps.send_signal(signal.SIGKILL)
        psutil.wait_procs(tree, timeout=10)
        assert "worker-bench_cpu0" not in airflow_cli.running(airflow_cli.Home(s.home))
        proc = s.pruneflow("up")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        run = s.wait_for_run(client, run_id, timeout=TRIAL_TIMEOUT)
        assert run["state"] == "success", _failure(s, client, run_id)
        bench = _tis(client, run_id)["benchmark_cpu0"]
    assert bench["try_number"] >= 2, bench
    store = _results(s)
    assert [r["trial_id"] for r in store.list_trials() if r["trial_id"] == "celery-kill"] == ["celery-kill"]
    assert store.get_trial("celery-kill")["status"] == "succeeded"
    assert len(store.benchmarks("celery-kill")) == 1


def test_no_secret_in_a_log_a_tracked_file_or_a_database_row(celery: AirflowServers):
    """After every trial and sweep of this module: the generated secrets and the object store's key appear
    in no log of the deployment, no file the repository tracks, and no row of the results or metadata DB."""
    import subprocess

    from sqlalchemy import MetaData

    s = celery
    sec = _svc(s).secrets()
    values = [sec[k] for k in services.SECRET_KEYS] + [s.extra_env["AWS_SECRET_ACCESS_KEY"]]
    texts = {str(p): p.read_text(errors="replace") for p in s.home.rglob("*.log") if p.is_file()}
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    texts.update({name: (REPO / name).read_text(errors="replace") for name in tracked.stdout.split("\0")
                  if name and (REPO / name).is_file()})
    results = _results(s)
    for db in (services.RESULTS_DB, "airflow"):
        engine = create_engine(results.engine.url.set(database=db))
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            for table in meta.sorted_tables:
                texts[f"{db}.{table.name}"] = "\n".join(repr(tuple(row)) for row in conn.execute(table.select()))
        engine.dispose()
    assert any(k.startswith("airflow.dag_run") for k in texts) and any("pf_trials" in k for k in texts)
    for value in values:
        assert len(value) >= 16
        for where, text_ in texts.items():
            assert value not in text_, f"a secret is in {where}"
