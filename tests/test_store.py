"""The results DB: upserts never duplicate, on SQLite and on a real PostgreSQL server."""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from pruneflow.store import ResultsStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    return shutil.which(name)


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1, run as an unprivileged user when we are root."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    assert initdb and pg_ctl, "PostgreSQL server binaries are missing: run `make system-deps`"
    # PostgreSQL refuses to run as root: as root, the server runs as the postgres user in a folder
    # it owns outside pytest's root-only tmp tree
    base = Path(tempfile.mkdtemp(prefix="pruneflow-pg-"))
    data = base / "data"
    port = _free_port()
    run_as: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run(run_as + [initdb, "-D", str(data), "-U", "pf", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run(run_as + [pg_ctl, "-D", str(data), "-w", "-l", str(data.parent / "log"),
                             "-o", f"-h 127.0.0.1 -p {port} -k {data.parent}", "start"], check=True, capture_output=True)
    try:
        url = f"postgresql+psycopg2://pf@127.0.0.1:{port}/postgres"
        for _ in range(50):
            try:
                ResultsStore(url).close()
                break
            except Exception:
                time.sleep(0.2)
        yield url
    finally:
        subprocess.run(run_as + [pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = ResultsStore(url)
    yield s
    if request.param == "postgresql":
        from pruneflow.store import Base

        Base.metadata.drop_all(s.engine)
    s.close()


LATENCY = {"settings": {"backend": "openvino", "device": "CPU", "precision": "f32", "threads": 1},
           "latency_ms": {"median": 1.0, "p90": 1.2, "p99": 1.5, "mean": 1.05, "min": 0.9, "max": 2.0},
           "round_median_cv": 0.01, "throughput_fps": 950.0}


def test_recording_twice_updates_never_duplicates(store):
    store.upsert_trial("t1", name="t", status="running", spec_json={"a": 1})
    store.upsert_trial("t1", status="succeeded", top1_final=90.5, macs_after=3_000_000_000)
    store.replace_epochs("t1", [{"epoch": 1, "val_top1": 50.0}, {"epoch": 2, "val_top1": 60.0}])
    store.replace_epochs("t1", [{"epoch": 1, "val_top1": 55.0}])
    store.upsert_benchmark("t1", LATENCY)
    store.upsert_benchmark("t1", {**LATENCY, "latency_ms": {**LATENCY["latency_ms"], "median": 0.8}})
    rows = store.list_trials()
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "succeeded" and row["top1_final"] == 90.5 and row["spec_json"] == {"a": 1}
    assert row["macs_after"] == 3_000_000_000  # beyond 32-bit integers
    assert [e["val_top1"] for e in store.epochs("t1")] == [55.0]
    bench = store.benchmarks("t1")
    assert len(bench) == 1 and bench[0]["median_ms"] == 0.8


def test_status_and_filters(store):
    store.upsert_trial("a", study="s1", status="succeeded")
    store.upsert_trial("b", study="s1", status="failed", reason="export: parity")
    store.upsert_trial("c", study="s2", status="abandoned", reason="chance")
    assert {r["trial_id"] for r in store.list_trials(study="s1")} == {"a", "b"}
    assert [r["reason"] for r in store.list_trials(status="failed")] == ["export: parity"]
    with pytest.raises(ValueError, match="status"):
        store.upsert_trial("d", status="done")
    with pytest.raises(ValueError, match="unknown trial fields"):
        store.upsert_trial("d", colour="red")
    assert store.get_trial("zzz") is None
