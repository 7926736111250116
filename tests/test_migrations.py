"""The results DB's versioned schema (pruneflow.migrations), on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import threading
from datetime import datetime

import pytest
from pg_server import pg_database, pg_server, postgres_url  # noqa: F401
from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    insert,
    inspect,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pruneflow import migrations
from pruneflow.cli import main
from pruneflow.migrations import HEAD, VERSION_TABLE, SchemaError
from pruneflow.store import Base, ResultsStore, make_engine, schema_revision


class Legacy(DeclarativeBase):
    """Frozen copy of the tables as store.py defined them before migrations (what create_all made)."""


class LegacyTrial(Legacy):
    __tablename__ = "pf_trials"
    trial_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), default="trial")
    study: Mapped[str | None] = mapped_column(String(128), index=True, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="running", index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    model: Mapped[str | None] = mapped_column(String(255), nullable=True)
    dataset: Mapped[str | None] = mapped_column(String(64), nullable=True)
    artifact_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    params_before: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    params_after: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    macs_before: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    macs_after: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    top1_masked: Mapped[float | None] = mapped_column(Float, nullable=True)
    loss_masked: Mapped[float | None] = mapped_column(Float, nullable=True)
    top1_final: Mapped[float | None] = mapped_column(Float, nullable=True)
    loss_final: Mapped[float | None] = mapped_column(Float, nullable=True)
    epochs_run: Mapped[int | None] = mapped_column(Integer, nullable=True)
    latency_median_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_p90_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_cv: Mapped[float | None] = mapped_column(Float, nullable=True)
    sparsities_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    spec_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    versions_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    results_json: Mapped[str | None] = mapped_column(Text, nullable=True)


class LegacyEpoch(Legacy):
    __tablename__ = "pf_epochs"
    trial_id: Mapped[str] = mapped_column(ForeignKey("pf_trials.trial_id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_top1: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_top1: Mapped[float | None] = mapped_column(Float, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)


class LegacyBenchmark(Legacy):
    __tablename__ = "pf_benchmarks"
    trial_id: Mapped[str] = mapped_column(ForeignKey("pf_trials.trial_id", ondelete="CASCADE"), primary_key=True)
    backend: Mapped[str] = mapped_column(String(32), primary_key=True)
    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    precision: Mapped[str] = mapped_column(String(8), primary_key=True)
    threads: Mapped[int | None] = mapped_column(Integer, nullable=True)
    median_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    p90_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    p99_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    mean_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    min_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    round_median_cv: Mapped[float | None] = mapped_column(Float, nullable=True)
    throughput_fps: Mapped[float | None] = mapped_column(Float, nullable=True)
    measured_at: Mapped[datetime] = mapped_column()
    result_json: Mapped[str | None] = mapped_column(Text, nullable=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def new_url(request, tmp_path):
    """A factory of empty results DBs of one kind: SQLite files, or fresh PostgreSQL databases."""
    if request.param == "sqlite":
        n = iter(range(100))
        return lambda: f"sqlite:///{tmp_path / f'r{next(n)}.db'}"
    return request.getfixturevalue("pg_database")


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _schema(url: str) -> dict:
    """Everything about pruneflow's tables that reflection sees (and SQLite's own DDL text)."""
    engine = make_engine(url)
    try:
        insp = inspect(engine)
        out = {}
        for t in sorted(set(insp.get_table_names()) & set(Base.metadata.tables)):
            out[t] = {
                "columns": [(c["name"], str(c["type"]), c["nullable"], c.get("default")) for c in insp.get_columns(t)],
                "pk": insp.get_pk_constraint(t),
                "fks": insp.get_foreign_keys(t),
                "indexes": sorted(insp.get_indexes(t), key=lambda i: i["name"]),
                "unique": insp.get_unique_constraints(t),
            }
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                out["sqlite_master"] = sorted(conn.execute(text(
                    "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name LIKE 'pf\\_%' ESCAPE '\\' "
                    f"AND name != '{VERSION_TABLE}' AND tbl_name != '{VERSION_TABLE}'")).all())
        return out
    finally:
        engine.dispose()


def _model_diffs(url: str) -> list:
    """What autogenerate would change to make the DB match the ORM models (nothing, at head)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"include_name": migrations.include_name, "compare_type": True,
                                                         "version_table": VERSION_TABLE})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def _legacy_db(url: str) -> None:
    """A results DB as today's code made it: create_all, then a few rows."""
    engine = make_engine(url)
    try:
        Legacy.metadata.create_all(engine)
        now = datetime(2026, 11, 1, 12, 0, 0)
        with engine.begin() as conn:
            conn.execute(insert(LegacyTrial.__table__).values(
                trial_id="old1", name="a", status="succeeded", created_at=now, updated_at=now, top1_final=91.5,
                macs_after=3_000_000_000, spec_json=json.dumps({"x": 1})))
            conn.execute(insert(LegacyTrial.__table__).values(
                trial_id="old2", name="b", status="failed", reason="export: parity", created_at=now, updated_at=now))
            conn.execute(insert(LegacyEpoch.__table__), [
                {"trial_id": "old1", "epoch": 1, "val_top1": 80.0}, {"trial_id": "old1", "epoch": 2, "val_top1": 85.0}])
            result = {"settings": {"backend": "openvino", "device": "CPU", "precision": "f32", "threads": 4,
                                   "hint": "throughput"}}
            conn.execute(insert(LegacyBenchmark.__table__), [
                {"trial_id": "old1", "backend": "openvino", "device": "CPU", "precision": "f32", "threads": None,
                 "median_ms": 1.5, "measured_at": now, "result_json": json.dumps(result)},
                {"trial_id": "old1", "backend": "onnxruntime", "device": "CPU", "precision": "f32", "threads": 2,
                 "median_ms": 2.5, "measured_at": now, "result_json": json.dumps({"threads": 8})},
                {"trial_id": "old2", "backend": "openvino", "device": "GPU", "precision": "f16", "threads": None,
                 "median_ms": 0.5, "measured_at": now, "result_json": None},
            ])
    finally:
        engine.dispose()


def _rows(url: str, table: str, order: str) -> list[dict]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(text(f"SELECT * FROM {table} ORDER BY {order}")).mappings()]
    finally:
        engine.dispose()


def test_head_constant_is_the_scripts_head():
    assert HEAD == migrations.script_head(), "a new migration: set HEAD in pruneflow/migrations/__init__.py"


def test_first_use_creates_the_schema_at_head(new_url):
    url = new_url()
    ResultsStore(url).close()
    assert _tables(url) == {"pf_trials", "pf_epochs", "pf_benchmarks", "pf_sensitivity", VERSION_TABLE}  # no `alembic_version`
    engine = make_engine(url)
    assert schema_revision(engine) == HEAD
    engine.dispose()
    assert _model_diffs(url) == []  # the migrations make exactly what the ORM models describe


def test_revision_0001_is_the_schema_create_all_made(new_url):
    old, new = new_url(), new_url()
    engine = make_engine(old)
    Legacy.metadata.create_all(engine)
    engine.dispose()
    engine = make_engine(new)
    assert migrations.upgrade(engine, "0001") == (None, "0001")
    engine.dispose()
    assert _schema(new) == _schema(old)


def test_a_db_made_before_migrations_is_stamped_and_upgraded_with_nothing_lost(new_url):
    url = new_url()
    _legacy_db(url)
    trials, epochs = _rows(url, "pf_trials", "trial_id"), _rows(url, "pf_epochs", "trial_id, epoch")
    benchmarks = _rows(url, "pf_benchmarks", "trial_id, backend, device")
    store = ResultsStore(url)
    try:
        assert schema_revision(store.engine) == HEAD
        # every value kept; columns added by later migrations are empty on the old rows
        after_trials = _rows(url, "pf_trials", "trial_id")
        assert [{k: r[k] for k in trials[0]} for r in after_trials] == trials
        assert all(r[k] is None for r in after_trials for k in set(after_trials[0]) - set(trials[0]))
        assert _rows(url, "pf_epochs", "trial_id, epoch") == epochs
        after = _rows(url, "pf_benchmarks", "trial_id, backend, device")
        assert [{k: v for k, v in b.items() if k not in ("threads", "hint")} for b in after] == \
               [{k: v for k, v in b.items() if k != "threads"} for b in benchmarks]
        # threads and hint: from the stored settings, else the benchmark defaults (1, latency)
        assert [(b["trial_id"], b["backend"], b["threads"], b["hint"]) for b in after] == [
            ("old1", "onnxruntime", 2, "latency"), ("old1", "openvino", 4, "throughput"), ("old2", "openvino", 1, "latency")]
        assert store.get_trial("old1")["spec_json"] == {"x": 1}
        # and the store works on it: a 1-thread measurement joins the 4-thread one
        store.upsert_benchmark("old1", {"settings": {"backend": "openvino", "device": "CPU", "precision": "f32",
                                                     "threads": 1, "hint": "throughput"},
                                        "latency_ms": dict.fromkeys(("median", "p90", "p99", "mean", "min", "max"), 3.0)})
        assert len(store.benchmarks("old1")) == 3
        store.upsert_trial("old2", status="succeeded")
        assert store.get_trial("old2")["reason"] == "export: parity"
    finally:
        store.close()
    assert _model_diffs(url) == []


def test_downgrade_and_upgrade_again(new_url):
    from alembic import command

    url = new_url()
    store = ResultsStore(url)
    store.upsert_trial("t")
    for threads in (1, 4):
        store.upsert_benchmark("t", {"settings": {"backend": "openvino", "device": "CPU", "precision": "f32",
                                                  "threads": threads},
                                     "latency_ms": dict.fromkeys(("median", "p90", "p99", "mean", "min", "max"),
                                                                 float(threads))})
    with store.engine.begin() as conn:
        command.downgrade(migrations.config(conn), "0001")
    assert [(b["threads"], b["median_ms"]) for b in _rows(url, "pf_benchmarks", "trial_id")] == [(4, 4.0)]
    store.close()
    ResultsStore(url).close()
    assert _model_diffs(url) == []
    assert [(b["threads"], b["hint"]) for b in _rows(url, "pf_benchmarks", "trial_id")] == [(4, "latency")]


@pytest.mark.parametrize("optuna_first", [True, False])
def test_optuna_study_in_the_same_db_keeps_working(new_url, optuna_first):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = new_url()
    if optuna_first:  # Optuna's tables and its own alembic_version are there before ours
        optuna.create_study(storage=url, study_name="before").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    store = ResultsStore(url)
    store.upsert_trial("t1", study="s")
    store.close()
    optuna.create_study(storage=url, study_name="after").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    if optuna_first:
        assert len(optuna.load_study(storage=url, study_name="before").trials) == 2
    assert len(optuna.load_study(storage=url, study_name="after").trials) == 1
    assert {"alembic_version", VERSION_TABLE} <= _tables(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all() == [HEAD]
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() != HEAD  # Optuna's own
    finally:
        engine.dispose()
    assert _model_diffs(url) == []  # autogenerate leaves Optuna's tables alone
    store = ResultsStore(url)  # reopening finds head; Optuna's tables untouched
    assert [t["trial_id"] for t in store.list_trials()] == ["t1"]
    store.close()


def _open_and_write(url: str, i: int, barrier) -> str:
    try:
        barrier.wait()
        store = ResultsStore(url)
        store.upsert_trial(f"p{i}", status="running")
        store.close()
        return "ok"
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        return f"{type(exc).__name__}: {exc}"


def _worker(url: str, i: int, barrier, results) -> None:
    results.put((i, _open_and_write(url, i, barrier)))


def test_concurrent_first_use_by_processes(new_url):
    url, n = new_url(), 4
    ctx = multiprocessing.get_context("fork")  # separate processes, as Airflow's forked task processes are
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, i, barrier, results)) for i in range(n)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got == dict.fromkeys(range(n), "ok")
    store = ResultsStore(url)
    assert sorted(t["trial_id"] for t in store.list_trials()) == [f"p{i}" for i in range(n)]
    assert schema_revision(store.engine) == HEAD
    store.close()


def test_concurrent_first_use_by_threads(new_url):
    url, n = new_url(), 4
    barrier, results = threading.Barrier(n), {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _open_and_write(url, i, barrier)))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == dict.fromkeys(range(n), "ok")


def test_a_newer_schema_is_refused_clearly(new_url):
    url = new_url()
    ResultsStore(url).close()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(SchemaError, match="9999.*upgrade pruneflow"):
        ResultsStore(url)


def test_some_of_the_tables_only_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    engine = create_engine(url)
    LegacyTrial.__table__.create(engine)
    engine.dispose()
    with pytest.raises(SchemaError, match="only some"):
        ResultsStore(url)


def test_the_check_at_head_is_one_select_without_alembic(tmp_path):
    """Opening a store on a DB at head must not import Alembic (the cost is one SELECT)."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    ResultsStore(url).close()
    code = ("import sys; from pruneflow.store import ResultsStore; s = ResultsStore(sys.argv[1]); "
            "s.upsert_trial('x'); s.close(); print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))")
    out = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_db_upgrade(new_url, capsys):
    url = new_url()
    assert main(["db", "upgrade", "--db", url]) == 0
    out = capsys.readouterr().out
    assert f"revision {HEAD}" in out and "from an empty DB" in out
    assert main(["db", "upgrade", "--db", url]) == 0
    assert f"already at revision {HEAD}" in capsys.readouterr().out
    assert main(["db", "current", "--db", url]) == 0
    assert f"revision {HEAD} (head)" in capsys.readouterr().out
    assert _model_diffs(url) == []


def test_cli_db_upgrade_of_a_db_made_before_migrations(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    _legacy_db(url)
    assert main(["db", "upgrade", "--db", url]) == 0
    assert f"from 0001 to revision {HEAD}" in capsys.readouterr().out
    assert len(_rows(url, "pf_benchmarks", "trial_id")) == 3


@pytest.mark.parametrize("url", ["not a url", "nosuchdialect://x/y",
                                 "postgresql+psycopg2://pf:secret@127.0.0.1:1/none"])
def test_cli_db_upgrade_bad_url_is_one_line_naming_db(url, capsys):
    assert main(["db", "upgrade", "--db", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pruneflow: error: --db ")
    assert "secret" not in err


def test_db_revision_writes_the_next_migration(tmp_path, monkeypatch, capsys):
    import shutil

    scripts = tmp_path / "migrations"
    shutil.copytree(migrations.HERE, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(migrations, "HERE", scripts)
    assert main(["db", "revision", "-m", "add nothing"]) == 0
    assert "set HEAD" in capsys.readouterr().out
    path = scripts / "versions" / f"{int(HEAD) + 1:04d}_add_nothing.py"
    source = path.read_text()
    assert f"down_revision = {HEAD!r}" in source
    body = source.split("def upgrade()")[1].split("def downgrade()")[0]
    assert "pass" in body and "op." not in body  # the models match head: nothing to generate
    assert migrations.script_head() == f"{int(HEAD) + 1:04d}"
