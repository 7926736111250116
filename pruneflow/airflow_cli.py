"""`pruneflow airflow {init,up,down,status}`: the embedded Airflow of one machine.

A project-local Airflow home (default `<repo>/.airflow`) holds `airflow.cfg` (rendered once from
`airflow.cfg.template`), the metadata DB, the admin password, the servers' logs (`logs/*.log`) and pid files
(`run/*.pid`). The servers are the `airflow` executable of this interpreter's environment, started as
background processes each in its own process group, with `AIRFLOW_HOME` and the `PRUNEFLOW_*` settings in
their environment. Trial results live in `PRUNEFLOW_DB` (default `<repo>/out/pruneflow.db`), outside the
home: neither `down` nor a new `up` touches them.

With `--executor celery` (chosen at the first init, kept by the home) the same home runs the distributed
deployment on one machine, loopback only: Redis and PostgreSQL (pruneflow.services), the four servers on
CeleryExecutor, a Celery worker for the training stages (queue `default`) and, per `[pruneflow] devices`,
a benchmark worker on queue `bench_<device>` with concurrency 1, run by `[pruneflow] bench_python`.

This module never imports Airflow (DAG-free and fast); it only drives the `airflow` command, and finds
and stops its processes with psutil.
"""

from __future__ import annotations

import argparse
import base64
import configparser
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import psutil

from pruneflow.services import ServiceError, Services, free_port, port_open, start_ticks, write_private

# The repository (dags/, plugins/, out/); PRUNEFLOW_HOME points elsewhere, e.g. a deployed copy.
REPO = Path(os.environ.get("PRUNEFLOW_HOME") or Path(__file__).resolve().parents[1]).resolve()
TEMPLATE = Path(__file__).resolve().parents[1] / "airflow.cfg.template"
DEFAULT_PORT = 8080
DEFAULT_HOST = "127.0.0.1"
USER = "admin"
PASSWORDS_FILE = "simple_auth_manager_passwords.json"
# Started in this order, stopped in reverse. The api-server is last up and first down.
COMPONENTS = ("scheduler", "dag-processor", "triggerer", "api-server")
# local: the LocalExecutor whose workers import torch once, before they fork the task processes.
EXECUTORS = {"local": "pruneflow_airflow.executor.PreloadingLocalExecutor", "celery": "CeleryExecutor"}
WORKER_PREFIX = "worker-"
# The torch-free part of [pruneflow] preload: what a benchmark worker's tasks import (the DAG file, the
# benchmark and record stages).
BENCH_PRELOAD = ("airflow.sdk, airflow.sdk.execution_time.task_runner, pruneflow_airflow.operators, "
                 "pruneflow_airflow.params, openvino, onnxruntime, pruneflow.bench, pruneflow.store, pruneflow.stages")
# Marks every process this module starts (and, through inheritance, their children): `down` finds
# stragglers by it, and nothing else carries it.
MARKER = "PRUNEFLOW_AIRFLOW_SERVER"
HEALTH_PATH = "/api/v2/monitor/health"
# Keys of /api/v2/monitor/health that must report "healthy", and the heartbeat field of each.
HEALTH_KEYS = {"scheduler": "latest_scheduler_heartbeat", "dag_processor": "latest_dag_processor_heartbeat",
               "triggerer": "latest_triggerer_heartbeat"}


class AirflowCliError(RuntimeError):
    pass


@dataclass
class Home:
    path: Path

    @property
    def cfg(self) -> Path:
        return self.path / "airflow.cfg"

    @property
    def passwords(self) -> Path:
        return self.path / PASSWORDS_FILE

    @property
    def run(self) -> Path:
        return self.path / "run"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def pidfile(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    def logfile(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def settings(self) -> configparser.RawConfigParser:
        parser = configparser.RawConfigParser(strict=False)
        parser.read(self.cfg)
        return parser

    def executor(self) -> str | None:
        """"local" or "celery" as rendered into airflow.cfg at init; None before init."""
        if not self.cfg.is_file():
            return None
        name = self.settings().get("core", "executor", fallback="LocalExecutor").strip()
        return "celery" if name.endswith("CeleryExecutor") else "local"

    def url(self) -> str:
        s = self.settings()
        return s.get("api", "base_url", fallback=f"http://{DEFAULT_HOST}:{DEFAULT_PORT}").rstrip("/")

    def host_port(self) -> tuple[str, int]:
        s = self.settings()
        return s.get("api", "host", fallback=DEFAULT_HOST), s.getint("api", "port", fallback=DEFAULT_PORT)


def resolve_home(arg: str | None) -> Home:
    raw = arg or os.environ.get("PRUNEFLOW_AIRFLOW_HOME") or str(REPO / ".airflow")
    return Home(Path(raw).expanduser().resolve())


def airflow_executable() -> str:
    """The `airflow` script next to this interpreter (the same venv), else the one on PATH."""
    exe = Path(sys.executable).parent / "airflow"
    if exe.is_file():
        return str(exe)
    found = shutil.which("airflow")
    if not found:
        raise AirflowCliError("cannot find the `airflow` command: install apache-airflow in this environment")
    return found


def server_env(home: Home) -> dict[str, str]:
    """Environment of every airflow command run for this home. PRUNEFLOW_* already set win."""
    env = dict(os.environ)
    env["AIRFLOW_HOME"] = str(home.path)
    env["AIRFLOW_CONFIG"] = str(home.cfg)
    env.setdefault("PRUNEFLOW_HOME", str(REPO))
    out = REPO / "out"
    env.setdefault("PRUNEFLOW_ARTIFACTS", str(out / "trials"))
    env.setdefault("PRUNEFLOW_DB", f"sqlite:///{out / 'pruneflow.db'}")
    env.setdefault("PRUNEFLOW_BASELINES", str(out / "baselines"))
    # DAG files and task processes import pruneflow_airflow from the repository.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if home.executor() == "celery":
        # The home's PostgreSQL: results and studies in its `pruneflow` database (the URL has no
        # password; libpq reads it from PGPASSFILE).
        env.update(Services(home.path).env())
    return env


# ------------------------------------------------------------------------------- celery deployment

@dataclass(frozen=True)
class Worker:
    name: str  # component name, e.g. worker-bench_cpu0
    queue: str
    concurrency: int
    python: str  # the interpreter that runs `-m airflow celery worker`
    serve_logs: bool


DEFAULT_DEVICES = ("cpu0",)


def devices(home: Home) -> list[str]:
    raw = home.settings().get("pruneflow", "devices", fallback=",".join(DEFAULT_DEVICES))
    return [d.strip() for d in raw.split(",") if d.strip()]


def check_devices(executor: str, bench_devices: tuple[str, ...] | None) -> None:
    """``--devices``: names of benchmark targets (:mod:`pruneflow.bench_targets`), for the celery executor only."""
    if bench_devices is None:
        return
    if executor != "celery":
        raise AirflowCliError("--devices: only with --executor celery (the embedded default measures on this CPU, "
                              "on one queue)")
    if not bench_devices:
        raise AirflowCliError("--devices: name at least one device, e.g. cpu0")
    from pruneflow.bench_targets import bench_targets

    try:
        bench_targets(",".join(bench_devices), "", "")
    except ValueError as exc:
        raise AirflowCliError(f"--devices: {exc}".replace("[pruneflow] devices: ", "")) from None


def _note_kept_devices(home: Home, bench_devices: tuple[str, ...] | None, say) -> None:
    """--devices counts at the first init only: say so when an existing airflow.cfg names others."""
    if bench_devices is not None and tuple(bench_devices) != tuple(devices(home)):
        say(f"note: {home.cfg} keeps devices = {', '.join(devices(home))} (edit it, then `pruneflow airflow "
            "down`, `init` and `up`)")


def bench_python(home: Home) -> str:
    """`[pruneflow] bench_python`, else the repository's torch-free `.venv-bench`, else this interpreter."""
    configured = home.settings().get("pruneflow", "bench_python", fallback="").strip()
    if configured:
        return configured
    bench = REPO / ".venv-bench" / "bin" / "python"
    return str(bench) if bench.is_file() else sys.executable


def workers(home: Home) -> list[Worker]:
    if home.executor() != "celery":
        return []
    s = home.settings()
    found = [Worker(WORKER_PREFIX + "default", s.get("operators", "default_queue", fallback="default"),
                    s.getint("celery", "worker_concurrency", fallback=2), sys.executable, serve_logs=True)]
    # One worker per device: concurrency 1 (one measurement at a time); its task logs are files in the
    # shared log folder, so only the training worker serves logs on [logging] worker_log_server_port.
    found += [Worker(f"{WORKER_PREFIX}bench_{d}", f"bench_{d}", 1, bench_python(home), serve_logs=False)
              for d in devices(home)]
    return found


def components(home: Home) -> tuple[str, ...]:
    """Every process `up` starts for this home, in start order."""
    return COMPONENTS + tuple(w.name for w in workers(home))


def _celery_sections(home: Home, svc: Services, devices: tuple[str, ...]) -> str:
    return f"""# Celery deployment (`pruneflow airflow up --executor celery`): the devices of this machine. Each gets
# a benchmark worker on queue bench_<device> (concurrency 1) and a pool bench_<device> of one slot; a trial
# picks one with benchmark.target (default: the first, on benchmark_queue). After adding one here:
# `pruneflow airflow down`, `init` (creates its pool), `up` (starts its worker; the DAG gets its task).
devices = {", ".join(devices)}
# Interpreter of the benchmark workers (`<it> -m airflow celery worker`). Empty: <repo>/.venv-bench/bin/python
# when it exists (torch-free), else the main venv.
bench_python =
# What a benchmark worker imports once at start instead of [pruneflow] preload (its environment has no torch).
bench_preload = {BENCH_PRELOAD}

[celery]
# The broker: this home's Redis on loopback, with its generated password (this file is mode 0600).
broker_url = {svc.broker_url()}
# Task states: the metadata database (psycopg2; the password comes from PGPASSFILE, not from the URL).
result_backend = {svc.pg_url("airflow", prefix="db+postgresql+psycopg2")}
# Processes of the training worker (queue default): 2 cores, torch uses both.
worker_concurrency = 2
# A task is acknowledged once it has finished: one lost with its worker is delivered again.
task_acks_late = True
# Airflow's Celery settings, plus each worker's preload at start (pruneflow_airflow/celery_config.py).
celery_config_options = pruneflow_airflow.celery_config.CELERY_CONFIG

[celery_broker_transport_options]
# Redelivery of an unacknowledged task after 25 h: longer than the longest execution_timeout (retrain, 24 h).
visibility_timeout = 90000
"""


def _worker_env(home: Home, w: Worker) -> dict[str, str]:
    """Each worker works in its own scratch folder and download cache, as on its own host (they matter
    when PRUNEFLOW_ARTIFACTS is an object store); a benchmark worker preloads `[pruneflow] bench_preload`
    (torch-free) instead of `preload`."""
    env = {"PRUNEFLOW_SCRATCH": str(home.path / "scratch" / w.name),
           "PRUNEFLOW_ARTIFACT_CACHE": str(home.path / "cache" / "artifacts" / w.name)}
    if w.name != WORKER_PREFIX + "default":
        env["AIRFLOW__PRUNEFLOW__PRELOAD"] = home.settings().get("pruneflow", "bench_preload", fallback="")
    return env


def _worker_args(home: Home, w: Worker) -> list[str]:
    args = [w.python, "-m", "airflow", "celery", "worker", "--queues", w.queue, "--concurrency", str(w.concurrency),
            "--celery-hostname", f"{w.queue}@%h", "--pid", str(home.run / f"celery-{w.name}.pid")]
    return args + ([] if w.serve_logs else ["--skip-serve-logs"])


def _worker_ready(home: Home, w: Worker, offset: int) -> bool:
    try:
        with open(home.logfile(w.name), "rb") as fh:
            fh.seek(offset)
            return b" ready." in fh.read()
    except OSError:
        return False


def _airflow(home: Home, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [airflow_executable(), *args]
    proc = subprocess.run(cmd, env=server_env(home), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise AirflowCliError(f"`airflow {' '.join(args)}` failed ({proc.returncode}):\n{tail}")
    return proc


# ----------------------------------------------------------------------------------------------- init

def render_config(home: Home, port: int, host: str = DEFAULT_HOST, executor: str = "local",
                  bench_devices: tuple[str, ...] = DEFAULT_DEVICES) -> str:
    if not TEMPLATE.is_file():
        raise AirflowCliError(f"template not found: {TEMPLATE}")
    # Airflow's usual side ports for the default install; free ones for any other, so that two homes
    # (the user's and a test's) can run side by side.
    log_ports = [8793, 8794] if port == DEFAULT_PORT else [free_port(host)]
    while len(log_ports) < 2:
        if (p := free_port(host)) not in (port, *log_ports):
            log_ports.append(p)
    values = {
        "home": str(home.path),
        "repo": str(REPO),
        "host": host,
        "port": str(port),
        "executor": EXECUTORS[executor],
        "sql_alchemy_conn": f"sqlite:///{home.path}/airflow.db",
        "fernet_key": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        "secret_key": secrets.token_urlsafe(32),
        "jwt_secret": secrets.token_urlsafe(48),
        "install_id": secrets.token_hex(4),
        "worker_log_port": str(log_ports[0]),
        "trigger_log_port": str(log_ports[1]),
        "benchmark_pool": "benchmark_cpu",
        "cpu_pool": "cpu",
        "benchmark_queue": "default",
        "celery_sections": "",
        "database_extra": "",
    }
    if executor == "celery":
        # Every component (and worker) shares the secrets generated once into the home's secrets.json.
        svc = Services(home.path)
        sec = svc.secrets()
        values.update(
            sql_alchemy_conn=svc.pg_url("airflow"), fernet_key=sec["fernet_key"], secret_key=sec["secret_key"],
            jwt_secret=sec["jwt_secret"], benchmark_pool=f"bench_{bench_devices[0]}",
            benchmark_queue=f"bench_{bench_devices[0]}",
            # Each device has its own worker and pool; the training stages run in default_pool.
            cpu_pool="", celery_sections=_celery_sections(home, svc, bench_devices),
            # Airflow derives an asyncpg URL for its async engine, and asyncpg is not installed: empty turns
            # that engine off (it serves only the dag-run /wait endpoint and multi-team lookups).
            database_extra="# No async engine (no asyncpg here): only the dag-run /wait endpoint needs it.\n"
                           "sql_alchemy_conn_async =\n")
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise AirflowCliError("airflow.cfg.template has an unknown placeholder: "
                              + text[text.index("{{"):].split("}}")[0] + "}}")
    return text


def _setting(home: Home, section: str, key: str, fallback: str) -> str:
    """A key as the servers this command starts read it: ``AIRFLOW__SECTION__KEY`` over airflow.cfg."""
    env = os.environ.get(f"AIRFLOW__{section.upper()}__{key.upper()}")
    return env if env is not None else home.settings().get(section, key, fallback=fallback)


def _pools(home: Home) -> dict[str, int]:
    """The benchmark pools (one slot per device), the machine-wide CPU pool where one is configured (every
    CPU-heavy task takes one of its slots and a benchmark in it takes them all), and a pool of one slot per
    benchmark worker's queue."""
    names = [n.strip() for n in _setting(home, "pruneflow", "benchmark_pool", "benchmark_cpu").split(",")]
    slots = int(_setting(home, "pruneflow", "benchmark_pool_slots", "1"))
    pools = {n: slots for n in names if n}
    cpu_pool = _setting(home, "pruneflow", "cpu_pool", "").strip()
    if cpu_pool:
        pools[cpu_pool] = int(_setting(home, "pruneflow", "cpu_pool_slots", str(os.cpu_count() or 1)))
    for w in workers(home):
        if w.name != WORKER_PREFIX + "default" and w.queue not in pools:
            pools[w.queue] = 1
    return pools


def _set_pools(home: Home, pools: dict[str, int], say=print) -> None:
    for name, slots in pools.items():
        _airflow(home, "pools", "set", name, str(slots), f"pruneflow: {slots} slot(s)")
        say(f"pool {name}: {slots} slot(s)")


def sync_pools(home: Home, say=print) -> bool:
    """Resize the pools when ``[pruneflow]``'s pool settings changed since they were set (True then): the DAG
    files take a benchmark's slots from the settings, and a task asking more slots than its pool has is
    never run."""
    stamp = json.loads(_init_stamp(home).read_text())
    had, wanted = stamp.get("pools") or {}, _pools(home)
    if had == wanted:
        return False
    _set_pools(home, {n: k for n, k in wanted.items() if had.get(n) != k}, say)
    write_private(_init_stamp(home), json.dumps({**stamp, "pools": wanted}) + "\n")
    return True


def _init_stamp(home: Home) -> Path:
    return home.run / "initialized.json"


def _airflow_version() -> str:
    try:
        return metadata.version("apache-airflow-core")
    except metadata.PackageNotFoundError:
        return "unknown"


def is_initialized(home: Home) -> bool:
    stamp = _init_stamp(home)
    if not (home.cfg.is_file() and home.passwords.is_file() and stamp.is_file()):
        return False
    try:
        return json.loads(stamp.read_text()).get("airflow") == _airflow_version()
    except ValueError:
        return False


def check_executor(home: Home, executor: str | None) -> str:
    """The executor of this home: the one it was initialised for (a different request is refused), else
    the requested one, else local."""
    have = home.executor()
    if have is not None and executor is not None and executor != have:
        raise AirflowCliError(
            f"{home.path} was initialised for the {have} executor, not {executor}: run "
            f"`pruneflow airflow up --executor {have}`, or use another --home for the {executor} deployment")
    return have or executor or "local"


def init(home: Home, port: int | None = None, host: str = DEFAULT_HOST, force: bool = False,
         executor: str | None = None, bench_devices: tuple[str, ...] | None = None, say=print) -> None:
    executor = check_executor(home, executor)
    check_devices(executor, bench_devices)
    home.path.mkdir(parents=True, exist_ok=True)
    for d in (home.run, home.logs):
        d.mkdir(exist_ok=True)
    if executor == "celery":
        # Secrets, Redis config and the PostgreSQL cluster first: the metadata DB lives on that server.
        svc = Services(home.path)
        try:
            svc.init(say=say)
            svc.start(say=say)
        except ServiceError as exc:
            raise AirflowCliError(str(exc)) from exc
    if home.cfg.is_file() and not force:
        if port is not None and home.host_port()[1] != port:
            say(f"keeping {home.cfg} (port {home.host_port()[1]}; use --force to re-render it with port {port})")
        _note_kept_devices(home, bench_devices, say)
    else:
        if force and running(home):
            raise AirflowCliError("the servers are running: `pruneflow airflow down` before `init --force`")
        write_private(home.cfg, render_config(home, port or DEFAULT_PORT, host, executor,
                                              bench_devices or DEFAULT_DEVICES))
        say(f"wrote {home.cfg} from {TEMPLATE.name}")

    t0 = time.monotonic()
    _airflow(home, "db", "migrate")
    say(f"metadata DB migrated ({time.monotonic() - t0:.1f}s): {home.settings().get('database', 'sql_alchemy_conn')}")
    pools = _pools(home)
    _set_pools(home, pools, say)

    if home.passwords.is_file():
        say(f"admin password: stored in {home.passwords}")
    else:
        password = secrets.token_urlsafe(16)
        write_private(home.passwords, json.dumps({USER: password}) + "\n")
        say(f"user: {USER}\npassword: {password}   (shown once; stored in {home.passwords}, mode 0600)")
    write_private(_init_stamp(home), json.dumps({"airflow": _airflow_version(), "executor": executor, "pools": pools,
                                                  "at": datetime.now(UTC).isoformat()}) + "\n")


# ------------------------------------------------------------------------------------------ processes

# A pid file's start time and psutil's may differ by rounding, or by a step of the clock the boot time is
# derived from; a reused pid starts later than this.
START_TOLERANCE = 1.0
_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def _live(ps: psutil.Process) -> bool:
    """Running and not an exited process waiting to be reaped (a zombie has stopped for good)."""
    try:
        return ps.is_running() and ps.status() not in _GONE
    except psutil.Error:
        return False


@dataclass(frozen=True, order=True)
class Proc:
    """A process, identified by pid AND start time (so a reused pid is never mistaken for it)."""

    pid: int
    start: float  # psutil's create_time(): seconds since the epoch
    ps: psutil.Process | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, ps: psutil.Process) -> Proc:
        """Raises psutil.Error when the process is gone."""
        return cls(ps.pid, ps.create_time(), ps)

    def process(self) -> psutil.Process | None:
        """The live psutil process, or None once it has exited (or its pid belongs to another process)."""
        ps = self.ps
        if ps is None:
            try:
                ps = psutil.Process(self.pid)
                if abs(ps.create_time() - self.start) > START_TOLERANCE:
                    return None
            except psutil.Error:
                return None
        return ps if _live(ps) else None

    def alive(self) -> bool:
        return self.process() is not None


def _marker(ps: psutil.Process) -> str | None:
    """MARKER's value in a process's initial environment. Processes that set their title (the
    api-server, LocalExecutor workers, serve-logs) overwrite that memory, so this finds only the others
    (their descendants are found through them, and the components' through the pid files)."""
    try:
        return ps.environ().get(MARKER)
    except psutil.Error:
        return None


def _read_pid(home: Home, name: str) -> Proc | None:
    """The recorded process of a component, if it is still the very process `up` started."""
    try:
        pid_s, start_s = home.pidfile(name).read_text().split()[:2]
        pid = int(pid_s)
        # Clock ticks after boot (services.start_ticks), turned into psutil's create_time as it is now, so a
        # stepped wall clock moves both alike; a pid file of an earlier pruneflow holds seconds since the epoch.
        start = float(start_s) if "." in start_s else psutil.boot_time() + int(start_s) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    ps = Proc(pid, start).process()
    if ps is None:
        return None
    # Same start time (no pid reuse), still leading its own process group, still airflow (a Celery worker
    # retitles itself "[celeryd: ...]").
    try:
        cmd = " ".join(ps.cmdline())
        if os.getpgid(pid) != pid or not ("airflow" in cmd or "celery" in cmd):
            return None
        return Proc.of(ps)
    except (OSError, psutil.Error):
        return None


def running(home: Home) -> dict[str, int]:
    """Component name -> pid of each running server of this home."""
    return {name: p.pid for name in components(home) if (p := _read_pid(home, name)) is not None}


def server_processes(home: Home) -> list[Proc]:
    """Every live process of this home's servers: the components, everything in their process groups,
    any process still carrying the home's marker, and all their descendants (task processes included)."""
    me = os.getpid()
    roots = {p.pid: p.ps for name in components(home) if (p := _read_pid(home, name)) is not None}
    found: dict[int, psutil.Process] = dict(roots)
    for ps in psutil.process_iter():
        if ps.pid in found or ps.pid == me:
            continue
        try:
            in_group = bool(roots) and os.getpgid(ps.pid) in roots
        except OSError:
            continue
        if in_group or _marker(ps) == str(home.path):
            found[ps.pid] = ps
    descendants: set[int] = set()
    for ps in list(found.values()):
        if ps.pid in descendants:
            continue
        try:
            kids = ps.children(recursive=True)
        except psutil.Error:
            continue
        for kid in kids:
            descendants.add(kid.pid)
            found.setdefault(kid.pid, kid)
    found.pop(me, None)
    procs = []
    for ps in found.values():
        if _live(ps):
            try:
                procs.append(Proc.of(ps))
            except psutil.Error:
                pass
    return sorted(procs)


def _start(home: Home, name: str, args: list[str] | None = None, extra_env: dict[str, str] | None = None) -> Proc:
    env = server_env(home)
    env.update(extra_env or {})
    env[MARKER] = str(home.path)
    args = args or [airflow_executable(), name]
    log = open(home.logfile(name), "ab")  # noqa: SIM115 - handed to the child
    try:
        log.write(f"\n==== pruneflow airflow up: {' '.join(args)} at {datetime.now(UTC).isoformat()}\n".encode())
        log.flush()
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=str(home.path), start_new_session=True, close_fds=True)
    finally:
        log.close()
    try:
        p = Proc.of(psutil.Process(proc.pid))
        ticks = start_ticks(p.ps)
    except psutil.Error:  # gone already: `up` reports it with its log
        p, ticks = Proc(proc.pid, 0.0), 0
    home.pidfile(name).write_text(f"{p.pid} {ticks}\n")
    return p

def health(url: str, timeout: float = 3.0) -> dict | None:
    try:
        with urllib.request.urlopen(url + HEALTH_PATH, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _healthy_since(report: dict | None, since: datetime | None) -> list[str]:
    """The components not (yet) healthy; with `since`, a heartbeat older than it does not count."""
    if report is None:
        return ["api-server"]
    bad = []
    if report.get("metadatabase", {}).get("status") != "healthy":
        bad.append("metadatabase")
    for key, beat in HEALTH_KEYS.items():
        part = report.get(key) or {}
        ok = part.get("status") == "healthy"
        if ok and since is not None:
            ts = part.get(beat)
            ok = bool(ts) and datetime.fromisoformat(ts) >= since
        if not ok:
            bad.append(key)
    return bad


def _log_tail(home: Home, name: str, lines: int = 25) -> str:
    try:
        return "\n".join(home.logfile(name).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def up(home: Home, port: int | None = None, host: str = DEFAULT_HOST, timeout: float = 180,
       executor: str | None = None, bench_devices: tuple[str, ...] | None = None, say=print) -> None:
    t_up = time.monotonic()
    executor = check_executor(home, executor)
    check_devices(executor, bench_devices)
    resized = False
    if not is_initialized(home):
        init(home, port=port, host=host, executor=executor, bench_devices=bench_devices, say=say)
    else:
        if port is not None and home.host_port()[1] != port:
            say(f"note: {home.cfg} uses port {home.host_port()[1]}, not {port} (init --force to change it)")
        _note_kept_devices(home, bench_devices, say)
        if executor == "celery":
            try:
                Services(home.path).start(say=say)
            except ServiceError as exc:
                raise AirflowCliError(str(exc)) from exc
        resized = sync_pools(home, say)
    url = home.url()
    host, port = home.host_port()
    already = running(home)
    missing = [n for n in components(home) if n not in already]
    if not missing:
        say(f"already running ({', '.join(f'{n} {p}' for n, p in already.items())})")
        if resized:
            say("note: the servers read the old pool settings until `pruneflow airflow down` and `up`")
        _print_access(home, url, say)
        return
    if "api-server" in missing and port_open(port, host):
        raise AirflowCliError(f"port {port} on {host} is taken by another program: free it, or "
                              f"`pruneflow airflow init --force --port N` to use another port")
    since = datetime.now(UTC)
    t0 = time.monotonic()
    started = {}
    offsets = {}
    for name in missing:
        if name.startswith(WORKER_PREFIX):
            continue
        started[name] = _start(home, name)
    for w in workers(home):
        if w.name in missing:
            offsets[w.name] = home.logfile(w.name).stat().st_size if home.logfile(w.name).exists() else 0
            started[w.name] = _start(home, w.name, _worker_args(home, w), _worker_env(home, w))
    say(f"started {', '.join(f'{n} (pid {p.pid})' for n, p in started.items())}; logs in {home.logs}/")
    # A component restarted now must heartbeat after `since`; one already running just needs to be healthy.
    need_fresh = since if set(missing) & {"scheduler", "dag-processor", "triggerer"} else None
    bad: list[str] = []
    while time.monotonic() - t0 < timeout:
        for name, proc in started.items():
            if not proc.alive():
                stop(home, say=lambda *_: None)
                raise AirflowCliError(f"{name} exited during start-up; last lines of {home.logfile(name)}:\n"
                                      + _log_tail(home, name))
        report = health(url)
        bad = _healthy_since(report, need_fresh)
        bad += [w for w, off in offsets.items() if not _worker_ready(home, next(x for x in workers(home) if x.name == w), off)]
        if not bad:
            break
        time.sleep(0.5)
    else:
        raise AirflowCliError(f"not healthy after {timeout:.0f}s ({', '.join(bad)}); see {home.logs}/*.log "
                              "(`pruneflow airflow down` stops what was started)")
    say(f"healthy after {time.monotonic() - t0:.1f}s (`up` took {time.monotonic() - t_up:.1f}s)")
    _print_access(home, url, say)


def _print_access(home: Home, url: str, say) -> None:
    say(f"Airflow UI: {url}/   user: {USER}   password: in {home.passwords}")
    say(f"results DB: {server_env(home)['PRUNEFLOW_DB']}")
    for w in workers(home):
        say(f"celery worker {w.name}: queue {w.queue}, concurrency {w.concurrency}, python {w.python}")


def _signal(p: Proc, sig: int, group: bool = False) -> None:
    ps = p.process()
    if ps is None:
        return
    try:
        if group:
            os.killpg(p.pid, sig)
        else:
            ps.send_signal(sig)  # psutil checks the pid is still this process
    except (ProcessLookupError, PermissionError, psutil.Error):
        pass


def _wait_gone(procs: list[Proc], seconds: float) -> list[Proc]:
    """The processes still alive after up to `seconds`. Our own children are reaped as they exit; an
    exited process that its parent has not reaped yet (a zombie) counts as gone."""
    deadline = time.monotonic() + seconds
    left = [p for p in procs if p.alive()]
    while left and (remaining := deadline - time.monotonic()) > 0:
        psutil.wait_procs([ps for p in left if (ps := p.process()) is not None], timeout=min(0.2, remaining))
        left = [p for p in left if p.alive()]
    return left


def _tree(procs: list[Proc]) -> list[Proc]:
    """The processes and all their live descendants."""
    found = list(procs)
    for p in procs:
        try:
            kids = ps.children(recursive=True) if (ps := p.process()) is not None else []
            found += [Proc.of(k) for k in kids if _live(k)]
        except psutil.Error:
            pass
    return found


def stop(home: Home, grace: float = 30, say=print) -> None:
    """SIGTERM each component's process group (api-server first) and let Airflow shut down cleanly;
    after `grace` seconds SIGKILL whatever is left of them, task processes included.

    Celery workers go first, with a warm shutdown (SIGTERM to the worker alone: it takes no new task and
    waits for its running ones, which still need the API server); then the servers; then PostgreSQL and
    Redis, which keep every committed row and queued message on disk."""
    names = components(home)
    comps = {name: p for name in names if (p := _read_pid(home, name)) is not None}
    procs = server_processes(home)
    t0 = time.monotonic()
    worker_comps = [p for n, p in comps.items() if n.startswith(WORKER_PREFIX)]
    for p in worker_comps:
        _signal(p, signal.SIGTERM)
    if worker_comps:
        _wait_gone(sorted(set(_tree(worker_comps))), grace)
    for name in reversed(names):
        if name in comps and not name.startswith(WORKER_PREFIX):
            _signal(comps[name], signal.SIGTERM, group=True)
    left = _wait_gone(procs, max(1.0, grace - (time.monotonic() - t0)))
    # Anything started during the shutdown (a task process forked at the last moment) counts too.
    left = sorted(set(left) | set(server_processes(home)))
    for p in left:
        _signal(p, signal.SIGKILL, group=p in comps.values())
        _signal(p, signal.SIGKILL)
    stuck = _wait_gone(left, 10)
    for name in names:
        home.pidfile(name).unlink(missing_ok=True)
    if stuck:
        raise AirflowCliError(f"could not stop pid(s) {', '.join(str(p.pid) for p in stuck)}")
    services = Services(home.path).stop() if home.executor() == "celery" else []
    if comps or procs or services:
        say(f"stopped {', '.join([f'{n} (pid {p.pid})' for n, p in comps.items()] + services) or 'stray processes'}"
            f" ({len(procs)} process(es))" + (f"; SIGKILLed {len(left)} after {grace:.0f}s" if left else ""))
    else:
        say("nothing running")


def status(home: Home, say=print) -> int:
    if not home.cfg.is_file():
        say(f"not initialized: {home.path} (run `pruneflow airflow up`)")
        return 3
    pids = running(home)
    url = home.url()
    names = components(home)
    queues = {w.name: (w.queue, w.python) for w in workers(home)}
    celery = home.executor() == "celery"
    for name in names:
        state = 'running, pid ' + str(pids[name]) if name in pids else 'stopped'
        if not celery:
            say(f"{name:14s} {state}")
            continue
        queue, python = queues.get(name, ("-", airflow_executable()))
        say(f"{name:18s} {state:22s} queue {queue:12s} env {Path(python).parent.parent}")
    if celery:
        for line in Services(home.path).status_lines():
            say(line)
    report = health(url) if "api-server" in pids else None
    if report is not None:
        parts = [f"{k}={(report.get(k) or {}).get('status')}" for k in ("metadatabase", *HEALTH_KEYS)]
        say(f"health: {' '.join(parts)}")
    say(f"URL: {url}/   user: {USER}   password: in {home.passwords}")
    say(f"home: {home.path}")
    return 0 if len(pids) == len(names) and report is not None and not _healthy_since(report, None) else 1


# ------------------------------------------------------------------------------------------------ CLI

def _cmd(args) -> int:
    home = resolve_home(args.home)
    try:
        if args.airflow_command == "init":
            init(home, port=args.port, host=args.host, force=args.force, executor=args.executor,
                 bench_devices=args.devices)
        elif args.airflow_command == "up":
            up(home, port=args.port, host=args.host, timeout=args.timeout, executor=args.executor,
               bench_devices=args.devices)
        elif args.airflow_command == "down":
            stop(home, grace=args.grace)
        else:
            return status(home)
    except AirflowCliError as exc:
        print(f"pruneflow airflow: error: {exc}", file=sys.stderr)
        return 1
    return 0


def add_airflow_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("airflow", help="run the embedded Airflow of this machine (init, up, down, status)",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="airflow_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", help="Airflow home (default: $PRUNEFLOW_AIRFLOW_HOME or <repo>/.airflow)")
    for name, text in (("init", "render airflow.cfg once, migrate the metadata DB, create pools and the admin password"),
                       ("up", "init if needed, start scheduler, dag-processor, triggerer and api-server (celery: and Redis, "
                               "PostgreSQL, the Celery workers), wait until healthy"),
                       ("down", "stop every server process started by `up`"),
                       ("status", "which servers are running, their health, the URL")):
        s = sub.add_parser(name, help=text, description=text, parents=[common])
        if name in ("init", "up"):
            s.add_argument("--port", type=int, help=f"API server port at first init (default {DEFAULT_PORT})")
            s.add_argument("--devices", type=lambda v: tuple(d.strip() for d in v.split(",") if d.strip()),
                           help="celery, at first init: the benchmark devices of this machine, comma separated "
                                f"(default {','.join(DEFAULT_DEVICES)}): a worker on queue bench_<device> and a pool "
                                "of one slot each; the first is the default target")
            s.add_argument("--host", default=DEFAULT_HOST, help="API server host at first init (default 127.0.0.1)")
            s.add_argument("--executor", choices=sorted(EXECUTORS), default=None,
                           help="local (default for a new home): LocalExecutor, SQLite; celery: Redis, PostgreSQL and "
                                "Celery workers on loopback. A home keeps the executor of its first init")
        if name == "init":
            s.add_argument("--force", action="store_true", help="re-render airflow.cfg (new secrets) over an existing one")
        if name == "up":
            s.add_argument("--timeout", type=float, default=180, help="seconds to wait for health (default 180)")
        if name == "down":
            s.add_argument("--grace", type=float, default=30, help="seconds between SIGTERM and SIGKILL (default 30)")
        s.set_defaults(func=_cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pruneflow")
    add_airflow_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["airflow", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
