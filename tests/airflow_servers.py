"""Real Airflow servers on loopback for the end-to-end tests, started the way a user starts them:
`pruneflow airflow up --home TMP --port P`, with every PRUNEFLOW_* path inside the tmp folder.

One set of servers is shared by every test module of a pytest session that asks for the
`airflow_servers` fixture (import it: `from airflow_servers import airflow_servers`); a module run on
its own starts its own. The servers are stopped (`pruneflow airflow down`) when the session ends.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from pruneflow import airflow_cli

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "prune_trial"
# every minute: the scheduler's next "night" comes within a minute (the test pauses the DAG after one run)
NIGHTLY_SCHEDULE = "* * * * *"
UP_TIMEOUT = 240  # seconds; about 20 s on an idle 2-core machine, more when it is busy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class AirflowServers:
    root: Path  # the tmp folder: home/ and out/
    port: int
    up_output: str = ""
    up_seconds: float = 0.0
    executor: str = "local"  # or "celery": Redis, PostgreSQL and Celery workers (`up --executor celery`)
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. AIRFLOW__SECTION__KEY overrides
    devices: str = ""  # celery: `up --devices` (benchmark targets), e.g. "cpu0,cpu1"

    @property
    def home(self) -> Path:
        return self.root / "airflow-home"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def results_db(self) -> str:
        return f"sqlite:///{self.out / 'pruneflow.db'}"

    @property
    def passwords_file(self) -> Path:
        return self.home / airflow_cli.PASSWORDS_FILE

    @property
    def password(self) -> str:
        return json.loads(self.passwords_file.read_text())[airflow_cli.USER]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PRUNEFLOW_"))}
        env.update(PRUNEFLOW_ARTIFACTS=str(self.out / "trials"), PRUNEFLOW_DB=self.results_db,
                   PRUNEFLOW_BASELINES=str(self.out / "baselines"), PRUNEFLOW_REPORTS=str(self.out / "reports"),
                   PRUNEFLOW_HOME=str(REPO))
        env.update(self.extra_env)
        return env

    def pruneflow(self, command: str, *args: str, timeout: float = UP_TIMEOUT) -> subprocess.CompletedProcess:
        """`pruneflow airflow COMMAND --home HOME ...`, as a user runs it."""
        cmd = [sys.executable, "-m", "pruneflow.cli", "airflow", command, "--home", str(self.home), *args]
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def airflow(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The `airflow` CLI of this home (what `pruneflow airflow` drives)."""
        env = self.env()
        env.update(AIRFLOW_HOME=str(self.home), AIRFLOW_CONFIG=str(self.home / "airflow.cfg"),
                   PYTHONPATH=str(REPO))
        return subprocess.run([airflow_cli.airflow_executable(), *args], env=env, capture_output=True,
                              text=True, timeout=timeout, cwd=REPO)

    def up(self) -> None:
        t0 = time.monotonic()
        proc = self.pruneflow("up", "--port", str(self.port), "--timeout", str(UP_TIMEOUT - 20),
                              "--executor", self.executor, *(["--devices", self.devices] if self.devices else []))
        self.up_seconds = time.monotonic() - t0
        self.up_output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                             for p in sorted((self.home / "logs").glob("*.log")))
            self.down()
            raise RuntimeError(f"pruneflow airflow up failed ({proc.returncode}):\n{self.up_output}\n{logs}")

    def down(self) -> subprocess.CompletedProcess:
        return self.pruneflow("down", timeout=120)

    def processes(self) -> list[airflow_cli.Proc]:
        """Every live process of these servers (components, their groups and descendants)."""
        return airflow_cli.server_processes(airflow_cli.Home(self.home))

    def running(self) -> dict[str, int]:
        return airflow_cli.running(airflow_cli.Home(self.home))

    def is_up(self) -> bool:
        home = airflow_cli.Home(self.home)
        return len(self.running()) == len(airflow_cli.components(home)) and port_open(self.port)

    def token(self) -> str:
        r = httpx.post(f"{self.url}/auth/token", json={"username": airflow_cli.USER, "password": self.password},
                       timeout=60)
        assert r.status_code in (200, 201), r.text
        return r.json()["access_token"]

    def client(self, token: str | None = None) -> httpx.Client:
        """A REST client with a bearer token (generous timeouts: the machine may be busy training)."""
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {token or self.token()}"})

    def wait_for_dag(self, client: httpx.Client, dag_id: str = DAG_ID, timeout: float = 120) -> dict:
        """Wait until the dag-processor has parsed and serialized the DAG; returns its details."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = client.get(f"/api/v2/dags/{dag_id}/details")
            if last.status_code == 200:
                return last.json()
            time.sleep(1)
        errors = client.get("/api/v2/importErrors").text
        raise AssertionError(f"DAG {dag_id} not available after {timeout}s: {last.status_code if last else None} "
                             f"{last.text if last else ''}; import errors: {errors}")

    def wait_for_run(self, client: httpx.Client, run_id: str, dag_id: str = DAG_ID,
                     timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        run: dict = {}
        while time.monotonic() < deadline:
            r = client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            if r.status_code == 200:
                run = r.json()
                if run["state"] in ("success", "failed"):
                    return run
            time.sleep(2)
        return run or {"state": "unknown"}

    def patch(self, client: httpx.Client, url: str, body: dict, tries: int = 6) -> httpx.Response:
        """PATCH, tried again on a 500: on the SQLite metadata DB (WAL), a write whose read snapshot another
        process's commit made stale fails at once with "database is locked" (no busy wait), which the API
        server answers as "Database error". Seen in CI on pausing a DAG while its run was ending."""
        for _ in range(tries - 1):
            r = client.patch(url, json=body)
            if r.status_code != 500:
                return r
            time.sleep(1)
        return client.patch(url, json=body)

    def set_paused(self, client: httpx.Client, dag_id: str, paused: bool) -> None:
        r = self.patch(client, f"/api/v2/dags/{dag_id}", {"is_paused": paused})
        assert r.status_code == 200 and r.json()["is_paused"] is paused, r.text

    def task_states(self, client: httpx.Client, run_id: str, dag_id: str = DAG_ID) -> dict[str, str]:
        r = client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        return {ti["task_id"]: ti["state"] for ti in r.json().get("task_instances", [])}


_shared: AirflowServers | None = None


def shared_servers(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> AirflowServers:
    """The session's servers: started on first use (or restarted if a test stopped them), stopped when
    the session ends."""
    global _shared
    if _shared is None:
        root = tmp_path_factory.mktemp("airflow")
        # the nightly continuation is configured as a user configures it (test_sweep_airflow runs it)
        _shared = AirflowServers(root=root, port=free_port(), extra_env={
            "AIRFLOW__PRUNEFLOW__NIGHTLY_SCHEDULE": NIGHTLY_SCHEDULE,
            "PRUNEFLOW_NIGHTLY": str(root / "out" / "nightly.yaml")})
        config.add_cleanup(_stop_shared)
    if not _shared.is_up():
        _shared.up()
    return _shared


def _stop_shared() -> None:
    global _shared
    if _shared is not None:
        _shared.down()
        left = _shared.processes()
        _shared = None
        assert not left, f"server processes left after `pruneflow airflow down`: {left}"


@pytest.fixture(scope="module")
def airflow_servers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AirflowServers:
    return shared_servers(request.config, tmp_path_factory)
