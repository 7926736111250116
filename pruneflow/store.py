"""The results database: trials, per-epoch metrics and benchmarks, through SQLAlchemy.

A SQLite file by default; any SQLAlchemy URL (e.g. postgresql+psycopg2://...) by configuration.
Rows are keyed by trial id (and epoch, or backend/device/precision/threads/hint), and every write is
one INSERT ... ON CONFLICT DO UPDATE (SQLite and PostgreSQL), so recording a trial twice — a retried
or cleared task, or two writers at once — updates it, never duplicates it nor fails.
The schema is versioned (pruneflow.migrations, Alembic): opening a store checks that the DB is at the
newest revision and migrates it first when it is not.
Torch-free: the benchmark side may record results too.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pruneflow.migrations import HEAD, VERSION_TABLE

#: skipped: a sweep candidate not run, its latency predicted to miss the bound (pruneflow.sweep)
STATUSES = ("running", "succeeded", "failed", "abandoned", "skipped")


class Base(DeclarativeBase):
    pass


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Trial(Base):
    __tablename__ = "pf_trials"
    trial_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), default="trial")
    study: Mapped[str | None] = mapped_column(String(128), index=True, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="running", index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=_now)
    updated_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)
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
    top1_recalibrated: Mapped[float | None] = mapped_column(Float, nullable=True)
    loss_recalibrated: Mapped[float | None] = mapped_column(Float, nullable=True)
    top1_final: Mapped[float | None] = mapped_column(Float, nullable=True)
    # where top1_final comes from: "fine-tuned", "recalibrated" or "pruned" (a rapid trial not recalibrated)
    top1_source: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # a sweep's promotion stage (0: the screen) and the trial this one was promoted from
    stage: Mapped[int | None] = mapped_column(Integer, nullable=True)
    parent_trial_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    loss_final: Mapped[float | None] = mapped_column(Float, nullable=True)
    epochs_run: Mapped[int | None] = mapped_column(Integer, nullable=True)
    latency_median_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_p90_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_cv: Mapped[float | None] = mapped_column(Float, nullable=True)
    # what the sweep's latency model predicted before the trial ran (pruneflow.latency_model)
    latency_predicted_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    # who measured the latency: the benchmark worker's host, Celery queue and Python environment (sys.prefix)
    bench_host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    bench_queue: Mapped[str | None] = mapped_column(String(255), nullable=True)
    bench_env: Mapped[str | None] = mapped_column(Text, nullable=True)
    sparsities_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    spec_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    versions_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    results_json: Mapped[str | None] = mapped_column(Text, nullable=True)


class Epoch(Base):
    __tablename__ = "pf_epochs"
    trial_id: Mapped[str] = mapped_column(ForeignKey("pf_trials.trial_id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_top1: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_top1: Mapped[float | None] = mapped_column(Float, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)


class Benchmark(Base):
    __tablename__ = "pf_benchmarks"
    trial_id: Mapped[str] = mapped_column(ForeignKey("pf_trials.trial_id", ondelete="CASCADE"), primary_key=True)
    backend: Mapped[str] = mapped_column(String(32), primary_key=True)
    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    precision: Mapped[str] = mapped_column(String(8), primary_key=True)
    threads: Mapped[int] = mapped_column(Integer, primary_key=True)
    hint: Mapped[str] = mapped_column(String(16), primary_key=True)  # OpenVINO PERFORMANCE_HINT
    median_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    p90_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    p99_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    mean_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    min_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    round_median_cv: Mapped[float | None] = mapped_column(Float, nullable=True)
    throughput_fps: Mapped[float | None] = mapped_column(Float, nullable=True)
    measured_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)
    result_json: Mapped[str | None] = mapped_column(Text, nullable=True)


class Sensitivity(Base):
    """One sensitivity profile (:mod:`pruneflow.sensitivity`) by name; measuring it again replaces it."""

    __tablename__ = "pf_sensitivity"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str | None] = mapped_column(String(255), nullable=True)
    device: Mapped[str | None] = mapped_column(String(64), nullable=True)
    measured_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)
    profile_json: Mapped[str] = mapped_column(Text)


_TRIAL_COLUMNS = {c.name for c in Trial.__table__.columns}
_EPOCH_COLUMNS = [c.name for c in Epoch.__table__.columns if c.name != "trial_id"]
_BENCHMARK_KEY = [c.name for c in Benchmark.__table__.primary_key.columns]
# what a benchmark result may leave out of its settings (pruneflow.bench.settings.BenchmarkOptions defaults)
_DEFAULT_THREADS, _DEFAULT_HINT = 1, "latency"
_ON_CONFLICT_DIALECTS = ("sqlite", "postgresql")  # upserts in one statement; others look, then write


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"future": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 60}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):  # concurrent trials write from several processes
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    return engine


def schema_revision(engine: Engine) -> str | None:
    """The DB's pruneflow schema revision; None before any (no version table)."""
    try:
        with engine.connect() as conn:
            return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    except (OperationalError, ProgrammingError):  # no such table (a connection error: upgrade raises it)
        return None


def ensure_schema(engine: Engine) -> None:
    """Migrate the DB to the newest schema unless it is there already (the common case: one SELECT)."""
    if schema_revision(engine) == HEAD:
        return
    from pruneflow.migrations import upgrade

    upgrade(engine)


def _upsert(conn: Connection, table, rows: dict | list[dict], key: list[str], update: list[str]) -> None:
    """INSERT rows, or UPDATE the `update` columns of the row with the same key: one atomic statement."""
    dialect = conn.dialect.name
    if dialect in _ON_CONFLICT_DIALECTS:
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        stmt = dialect_insert(table)
        if update:
            stmt = stmt.on_conflict_do_update(index_elements=key, set_={c: stmt.excluded[c] for c in update})
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=key)
        conn.execute(stmt, rows)
        return
    # another dialect: look, then write (two writers of one new key at once: the second retries as an update)
    for row in rows if isinstance(rows, list) else [rows]:
        where = [table.c[k] == row[k] for k in key]
        for attempt in range(2):
            try:
                with conn.begin_nested():
                    if conn.execute(select(*table.primary_key.columns).where(*where)).first() is None:
                        conn.execute(insert(table).values(row))
                    elif update:
                        conn.execute(table.update().where(*where).values({c: row[c] for c in update}))
                break
            except IntegrityError:
                if attempt:
                    raise


class ResultsStore:
    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        try:
            ensure_schema(self.engine)
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    def upsert_trial(self, trial_id: str, **fields: Any) -> None:
        unknown = set(fields) - _TRIAL_COLUMNS
        if unknown:
            raise ValueError(f"unknown trial fields {sorted(unknown)}")
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"status: {fields['status']!r} is not one of {STATUSES}")
        for key in ("spec_json", "versions_json", "results_json", "sparsities_json"):
            if key in fields and not isinstance(fields[key], (str, type(None))):
                fields[key] = json.dumps(fields[key], sort_keys=True, default=str)
        now = _now()
        fields["updated_at"] = now
        # a new row takes the columns' defaults (name, status, created_at) for what is not given;
        # an existing one changes only the given fields and updated_at: created_at stays
        row = {"trial_id": trial_id, "created_at": fields.pop("created_at", now), **fields}
        with self.engine.begin() as conn:
            _upsert(conn, Trial.__table__, row, ["trial_id"], sorted(fields))

    def set_status(self, trial_id: str, status: str, reason: str | None = None) -> None:
        self.upsert_trial(trial_id, status=status, reason=reason)

    def replace_epochs(self, trial_id: str, epochs: list[dict]) -> None:
        """The trial's epoch rows become exactly these (a re-run with fewer epochs leaves no stale rows)."""
        rows = {}
        for e in epochs:  # one row per epoch, the last given wins
            rows[e["epoch"]] = {"trial_id": trial_id, **{k: e.get(k) for k in _EPOCH_COLUMNS}}
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # two replacements of one trial at once: one after the other
                conn.execute(select(Trial.trial_id).where(Trial.trial_id == trial_id).with_for_update())
            conn.execute(delete(Epoch).where(Epoch.trial_id == trial_id))
            if rows:
                _upsert(conn, Epoch.__table__, list(rows.values()), ["trial_id", "epoch"],
                        [c for c in _EPOCH_COLUMNS if c != "epoch"])

    def upsert_benchmark(self, trial_id: str, result: dict) -> None:
        """Record one result of pruneflow.bench.measure; one row per backend/device/precision/threads/hint."""
        st = result["settings"]
        lat = result["latency_ms"]
        row = {
            "trial_id": trial_id, "backend": st["backend"], "device": st["device"], "precision": st["precision"],
            "threads": int(st.get("threads") or _DEFAULT_THREADS), "hint": str(st.get("hint") or _DEFAULT_HINT),
            "median_ms": lat["median"], "p90_ms": lat["p90"], "p99_ms": lat["p99"],
            "mean_ms": lat["mean"], "min_ms": lat["min"], "max_ms": lat["max"],
            "round_median_cv": result.get("round_median_cv"), "throughput_fps": result.get("throughput_fps"),
            "measured_at": _now(), "result_json": json.dumps(result, sort_keys=True, default=str),
        }
        with self.engine.begin() as conn:
            _upsert(conn, Benchmark.__table__, row, _BENCHMARK_KEY, [k for k in row if k not in _BENCHMARK_KEY])

    def upsert_sensitivity(self, profile: dict) -> None:
        """Record a sensitivity profile under its name (a profile measured again replaces the old one)."""
        row = {"name": profile["name"], "model": profile.get("model"), "device": profile.get("device"),
               "measured_at": _now(), "profile_json": json.dumps(profile, sort_keys=True)}
        with self.engine.begin() as conn:
            _upsert(conn, Sensitivity.__table__, row, ["name"], ["model", "device", "measured_at", "profile_json"])

    def get_sensitivity(self, name: str) -> dict | None:
        """The profile recorded under ``name``, or None."""
        with Session(self.engine) as s:
            row = s.get(Sensitivity, name)
            return json.loads(row.profile_json) if row else None

    def get_trial(self, trial_id: str) -> dict | None:
        with Session(self.engine) as s:
            row = s.get(Trial, trial_id)
            return _row_dict(row) if row else None

    def list_trials(self, study: str | None = None, status: str | None = None) -> list[dict]:
        q = select(Trial).order_by(Trial.created_at, Trial.trial_id)
        if study is not None:
            q = q.where(Trial.study == study)
        if status is not None:
            q = q.where(Trial.status == status)
        with Session(self.engine) as s:
            return [_row_dict(r) for r in s.scalars(q)]

    def epochs(self, trial_id: str) -> list[dict]:
        with Session(self.engine) as s:
            rows = s.scalars(select(Epoch).where(Epoch.trial_id == trial_id).order_by(Epoch.epoch))
            return [_row_dict(r) for r in rows]

    def benchmarks(self, trial_id: str) -> list[dict]:
        with Session(self.engine) as s:
            return [_row_dict(r) for r in s.scalars(select(Benchmark).where(Benchmark.trial_id == trial_id))]


def _row_dict(row: Base) -> dict:
    out = {}
    for c in row.__table__.columns:
        v = getattr(row, c.name)
        if c.name.endswith("_json") and isinstance(v, str):
            v = json.loads(v)
        out[c.name] = v
    return out
