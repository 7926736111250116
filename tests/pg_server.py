"""A throwaway PostgreSQL server on loopback for the results-DB tests, and fresh databases on it.

Import the fixtures into a test module: ``from pg_server import pg_database, pg_server, postgres_url  # noqa: F401``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    return shutil.which(name)


@dataclass
class PgServer:
    """A PostgreSQL server of the tests: trust authentication on 127.0.0.1, stopped and started as its
    administrator would (``pg_ctl``)."""

    data: Path
    port: int
    run_as: list[str]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://pf@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        subprocess.run(self.run_as + [_pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.data.parent / "log"),
                                      "-o", f"-h 127.0.0.1 -p {self.port} -k {self.data.parent}", "start"],
                       check=True, capture_output=True)
        engine = create_engine(self.url)
        try:
            for _ in range(50):
                try:
                    with engine.connect():
                        return
                except Exception:
                    time.sleep(0.2)
        finally:
            engine.dispose()

    def stop(self) -> None:
        subprocess.run(self.run_as + [_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"], capture_output=True)


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    """A throwaway PostgreSQL server on 127.0.0.1, run as an unprivileged user when we are root."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    assert initdb and pg_ctl, "PostgreSQL server binaries are missing: run `make system-deps`"
    # PostgreSQL refuses to run as root: as root, the server runs as the postgres user in a folder
    # it owns outside pytest's root-only tmp tree
    base = Path(tempfile.mkdtemp(prefix="pruneflow-pg-"))
    base.chmod(0o711)
    data = base / "data"
    run_as: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run(run_as + [initdb, "-D", str(data), "-U", "pf", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    server = PgServer(data, _free_port(), run_as)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_url(pg_server) -> str:
    return pg_server.url


@pytest.fixture
def pg_database(postgres_url) -> Iterator[Callable[[], str]]:
    """A factory of empty databases on the server (dropped after the test): returns each one's URL."""
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make() -> str:
        name = f"pf_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return postgres_url.rsplit("/", 1)[0] + "/" + name

    try:
        yield make
    finally:
        with admin.connect() as conn:
            for name in made:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
