"""Redis and PostgreSQL of the Celery deployment of one machine (`pruneflow airflow up --executor celery`).

Both live under the Airflow home, on loopback only, with generated passwords:

* ``<home>/secrets.json`` (mode 0600): the Redis and PostgreSQL passwords, the JWT secret, the fernet key and
  the UI secret key, generated once at init and never printed;
* ``<home>/redis/``: ``redis.conf`` (0600: it holds ``requirepass``), the append-only file, the log;
* ``<home>/postgres/``: the cluster (``initdb``, scram-sha-256 for 127.0.0.1, nothing else accepted), its
  log; as root the server runs as the ``postgres`` user, which owns that folder;
* ``<home>/pgpass`` (0600): the PostgreSQL password in libpq's password-file format. Every server and worker
  gets ``PGPASSFILE`` pointing at it, so database URLs carry no password and can be shown and logged.

Two databases: ``airflow`` (Airflow's metadata and Celery's results) and ``pruneflow`` (trial results and
Optuna studies, ``PRUNEFLOW_DB``). This module never imports Airflow.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

HOST = "127.0.0.1"
SECRETS_FILE = "secrets.json"
PGPASS_FILE = "pgpass"
PG_USER = "pruneflow"
AIRFLOW_DB = "airflow"
RESULTS_DB = "pruneflow"
SECRET_KEYS = ("redis_password", "postgres_password", "jwt_secret", "fernet_key", "secret_key")



def start_ticks(ps: psutil.Process) -> int:
    """A process's start in clock ticks after boot, as a pid file records it. psutil's create_time() is the
    boot time plus these ticks, and the boot time is derived from the wall clock: when the clock is stepped
    (a paused and resumed VM, NTP) every process's create_time moves with it, the ticks do not."""
    return round((ps.create_time() - psutil.boot_time()) * os.sysconf("SC_CLK_TCK"))


def same_start(ps: psutil.Process, recorded: str) -> bool:
    """Whether ``ps`` started when a pid file says: clock ticks after boot, or (pid files of an earlier
    pruneflow) seconds since the epoch, within a second."""
    if "." in recorded:
        return abs(ps.create_time() - float(recorded)) <= 1.0
    return abs(start_ticks(ps) - int(recorded)) <= 1

class ServiceError(RuntimeError):
    pass


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def write_private(path: Path, text: str) -> None:
    """Create (or replace) a file readable by its owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _pg_bin(name: str) -> str:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"PostgreSQL's `{name}` is missing: run `make system-deps` (Debian: postgresql)")
    return found


def _redis_bin() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if not found:
        raise ServiceError("`redis-server` is missing: run `make system-deps` (Debian: redis-server)")
    return found


@dataclass
class Services:
    """The Redis and PostgreSQL servers of one Airflow home; ports are chosen at init and kept in
    ``services.json`` (no secrets in it)."""

    home: Path

    # ------------------------------------------------------------------ paths
    @property
    def secrets_path(self) -> Path:
        return self.home / SECRETS_FILE

    @property
    def pgpass(self) -> Path:
        return self.home / PGPASS_FILE

    @property
    def layout(self) -> Path:
        return self.home / "services.json"

    @property
    def redis_dir(self) -> Path:
        return self.home / "redis"

    @property
    def redis_conf(self) -> Path:
        return self.redis_dir / "redis.conf"

    @property
    def pg_dir(self) -> Path:
        return self.home / "postgres"

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    @property
    def pidfiles(self) -> dict[str, Path]:
        return {"redis": self.home / "run" / "redis.pid", "postgres": self.pg_data / "postmaster.pid"}

    def logfiles(self) -> dict[str, Path]:
        return {"redis": self.redis_dir / "redis.log", "postgres": self.pg_dir / "postgres.log"}

    # ----------------------------------------------------------------- config
    def ports(self) -> dict[str, int]:
        try:
            return json.loads(self.layout.read_text())
        except (OSError, ValueError) as exc:
            raise ServiceError(f"{self.layout} is missing or broken: `pruneflow airflow init --executor celery`") from exc

    def secrets(self) -> dict[str, str]:
        try:
            return json.loads(self.secrets_path.read_text())
        except (OSError, ValueError) as exc:
            raise ServiceError(f"{self.secrets_path} is missing or broken") from exc

    def broker_url(self) -> str:
        return f"redis://:{self.secrets()['redis_password']}@{HOST}:{self.ports()['redis']}/0"

    def pg_url(self, db: str, prefix: str = "postgresql+psycopg2") -> str:
        """A URL without the password: libpq reads it from PGPASSFILE (see `env`)."""
        return f"{prefix}://{PG_USER}@{HOST}:{self.ports()['postgres']}/{db}"

    def env(self) -> dict[str, str]:
        """What every server and worker of this home needs in its environment."""
        return {"PGPASSFILE": str(self.pgpass), "PRUNEFLOW_DB": self.pg_url(RESULTS_DB)}

    # ------------------------------------------------------------------- init
    def init(self, say=print) -> dict[str, str]:
        """Generate the secrets and ports once, write the Redis config, initdb the cluster. Idempotent."""
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "run").mkdir(exist_ok=True)
        if not self.secrets_path.is_file():
            values = {k: secrets.token_urlsafe(32) for k in SECRET_KEYS}
            values["fernet_key"] = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
            write_private(self.secrets_path, json.dumps(values, indent=1) + "\n")
            say(f"secrets generated: {self.secrets_path} (mode 0600)")
        sec = self.secrets()
        if not self.layout.is_file():
            redis_port = free_port()
            pg_port = free_port()
            while pg_port == redis_port:
                pg_port = free_port()
            self.layout.write_text(json.dumps({"redis": redis_port, "postgres": pg_port}) + "\n")
        ports = self.ports()
        write_private(self.pgpass, f"{HOST}:{ports['postgres']}:*:{PG_USER}:{sec['postgres_password']}\n")
        self.redis_dir.mkdir(exist_ok=True)
        write_private(self.redis_conf, "\n".join([
            "# pruneflow's broker: loopback only, password required, every write kept (append-only file).",
            f"bind {HOST}",
            "protected-mode yes",
            f"port {ports['redis']}",
            f"requirepass {sec['redis_password']}",
            "appendonly yes",
            f"dir {self.redis_dir}",
            f"logfile {self.redis_dir / 'redis.log'}",
            "daemonize no",
            "save 60 1",
            "",
        ]))
        if not (self.pg_data / "PG_VERSION").is_file():
            self._initdb(sec["postgres_password"], say)
        return sec

    def _run_as(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _check_traversable(self) -> None:
        """As root, the postgres user must reach its folder: every parent needs o+x."""
        if os.geteuid() != 0:
            return
        for parent in self.pg_dir.parents:
            if not parent.stat().st_mode & 0o001:
                raise ServiceError(f"the postgres user cannot enter {parent} (mode "
                                   f"{oct(parent.stat().st_mode & 0o777)}): put the Airflow home elsewhere or chmod o+x it")

    def _initdb(self, password: str, say) -> None:
        self._check_traversable()
        self.pg_dir.mkdir(exist_ok=True)
        os.chmod(self.pg_dir, 0o700)
        pwfile = self.pg_dir / ".pw"
        write_private(pwfile, password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.pg_dir, "postgres")
            shutil.chown(pwfile, "postgres")
        t0 = time.monotonic()
        try:
            proc = subprocess.run(self._run_as() + [
                _pg_bin("initdb"), "-D", str(self.pg_data), "-U", PG_USER, "-E", "UTF8", "--pwfile", str(pwfile),
                "--auth-host=scram-sha-256", "--auth-local=scram-sha-256"], capture_output=True, text=True)
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise ServiceError(f"initdb failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        # Loopback TCP and the socket in our own folder only, both with the password.
        hba = self.pg_data / "pg_hba.conf"
        hba.write_text("# pruneflow: the password (scram-sha-256) over loopback or the local socket, nothing else\n"
                       "local all all scram-sha-256\n"
                       "host  all all 127.0.0.1/32 scram-sha-256\n")
        ports = self.ports()
        with open(self.pg_data / "postgresql.conf", "a") as fh:
            fh.write(f"\n# pruneflow\nlisten_addresses = '{HOST}'\nport = {ports['postgres']}\n"
                     f"unix_socket_directories = '{self.pg_dir}'\npassword_encryption = scram-sha-256\n"
                     "max_connections = 200\n")
        if os.geteuid() == 0:
            shutil.chown(hba, "postgres")
        say(f"PostgreSQL cluster created in {self.pg_data} ({time.monotonic() - t0:.1f}s)")

    def create_databases(self, say=print) -> None:
        import psycopg2  # the main venv's driver (a dependency of the results store on PostgreSQL)

        sec, ports = self.secrets(), self.ports()
        conn = psycopg2.connect(host=HOST, port=ports["postgres"], user=PG_USER, dbname="postgres",
                                password=sec["postgres_password"], connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT datname FROM pg_database")
                have = {r[0] for r in cur.fetchall()}
                for db in (AIRFLOW_DB, RESULTS_DB):
                    if db not in have:
                        cur.execute(f'CREATE DATABASE "{db}" OWNER "{PG_USER}"')
                        say(f"PostgreSQL database {db} created")
        finally:
            conn.close()

    # ---------------------------------------------------------------- running
    def pid(self, name: str) -> int | None:
        """The live pid of a service, or None."""
        try:
            lines = self.pidfiles[name].read_text().split()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            ps = psutil.Process(pid)
            if name == "redis" and len(lines) > 1 and not same_start(ps, lines[1]):
                return None
            cmd = " ".join(ps.cmdline())
            if ps.status() == psutil.STATUS_ZOMBIE or ("redis" if name == "redis" else "postgres") not in cmd:
                return None
        except (psutil.Error, ValueError):
            return None
        return pid

    def processes(self) -> list[psutil.Process]:
        """The live server processes (and their children)."""
        found = []
        for name in ("redis", "postgres"):
            if (pid := self.pid(name)) is not None:
                try:
                    ps = psutil.Process(pid)
                    found += [ps, *ps.children(recursive=True)]
                except psutil.Error:
                    pass
        return found

    def start(self, say=print, timeout: float = 60) -> None:
        ports = self.ports()
        started = []
        if self.pid("redis") is None:
            if port_open(ports["redis"]):
                raise ServiceError(f"port {ports['redis']} is taken by another program (Redis of {self.home})")
            log = open(self.redis_dir / "redis.stdout", "ab")  # noqa: SIM115 - handed to the child
            try:
                proc = subprocess.Popen([_redis_bin(), str(self.redis_conf)], stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, cwd=str(self.redis_dir), start_new_session=True)
            finally:
                log.close()
            self.pidfiles["redis"].write_text(f"{proc.pid} {start_ticks(psutil.Process(proc.pid))}\n")
            started.append(f"redis (pid {proc.pid}, port {ports['redis']})")
        if self.pid("postgres") is None:
            self._check_traversable()
            logfile = self.logfiles()["postgres"]
            proc = subprocess.run(self._run_as() + [
                _pg_bin("pg_ctl"), "-D", str(self.pg_data), "-l", str(logfile), "-w", "-t", str(int(timeout)),
                "start"], capture_output=True, text=True, stdin=subprocess.DEVNULL, start_new_session=True)
            if proc.returncode != 0:
                tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
                raise ServiceError(f"PostgreSQL did not start:\n{proc.stdout[-1000:]}{proc.stderr[-1000:]}\n{tail}")
            started.append(f"postgres (pid {self.pid('postgres')}, port {ports['postgres']})")
        deadline = time.monotonic() + timeout
        while not (self._redis_ready() and port_open(ports["postgres"])):
            if time.monotonic() > deadline:
                raise ServiceError(f"Redis/PostgreSQL not ready after {timeout:.0f}s; see {self.redis_dir}, {self.pg_dir}")
            if self.pid("redis") is None:
                raise ServiceError("redis-server exited: " + self._tail(self.logfiles()["redis"]))
            time.sleep(0.1)
        if started:
            say(f"started {', '.join(started)}")
        self.create_databases(say)

    def _redis_ready(self) -> bool:
        import redis

        client = redis.Redis(host=HOST, port=self.ports()["redis"], password=self.secrets()["redis_password"],
                             socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    @staticmethod
    def _tail(path: Path, n: int = 15) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 60, say=print) -> list[str]:
        """PostgreSQL: a fast shutdown (rolls back open transactions, keeps every committed row); Redis:
        SIGTERM, which writes the append-only file and a snapshot before it exits."""
        stopped = []
        if (pid := self.pid("postgres")) is not None:
            subprocess.run(self._run_as() + [_pg_bin("pg_ctl"), "-D", str(self.pg_data), "-m", "fast", "-w",
                                             "-t", str(int(timeout)), "stop"], capture_output=True, text=True)
            stopped.append(f"postgres (pid {pid})")
        if (pid := self.pid("redis")) is not None:
            try:
                ps = psutil.Process(pid)
                ps.send_signal(signal.SIGTERM)
                ps.wait(timeout)
            except psutil.TimeoutExpired:
                ps.kill()
            except psutil.Error:
                pass
            stopped.append(f"redis (pid {pid})")
        self.pidfiles["redis"].unlink(missing_ok=True)
        return stopped

    def status_lines(self) -> list[str]:
        try:
            ports = self.ports()
        except ServiceError:
            return []
        lines = []
        for name, exe in (("redis", "redis-server"), ("postgres", "postgres")):
            pid = self.pid(name)
            state = f"running, pid {pid}" if pid else "stopped"
            lines.append(f"{name:18s} {state:22s} port {ports[name]}  ({exe}, 127.0.0.1)")
        return lines
