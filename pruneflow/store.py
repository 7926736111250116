"""The results database: trials, per-epoch metrics and benchmarks, through SQLAlchemy.

A SQLite file by default; any SQLAlchemy URL (e.g. postgresql+psycopg2://...) by configuration.
Rows are keyed by trial id (and epoch, or backend/device/precision), and every write is an
upsert, so recording a trial twice — a retried or cleared task — updates it, never duplicates it.
Torch-free: the benchmark side may record results too.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
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
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

STATUSES = ("running", "succeeded", "failed", "abandoned")


class Base(DeclarativeBase):
    pass


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


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
    threads: Mapped[int | None] = mapped_column(Integer, nullable=True)
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


_TRIAL_COLUMNS = {c.name for c in Trial.__table__.columns}


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


class ResultsStore:
    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        Base.metadata.create_all(self.engine)

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
        with Session(self.engine) as s, s.begin():
            row = s.get(Trial, trial_id)
            if row is None:
                row = Trial(trial_id=trial_id)
                s.add(row)
            for k, v in fields.items():
                setattr(row, k, v)
            row.updated_at = _now()

    def set_status(self, trial_id: str, status: str, reason: str | None = None) -> None:
        self.upsert_trial(trial_id, status=status, reason=reason)

    def replace_epochs(self, trial_id: str, epochs: list[dict]) -> None:
        """The trial's epoch rows become exactly these (a re-run with fewer epochs leaves no stale rows)."""
        cols = {c.name for c in Epoch.__table__.columns} - {"trial_id"}
        with Session(self.engine) as s, s.begin():
            s.execute(delete(Epoch).where(Epoch.trial_id == trial_id))
            for e in epochs:
                s.add(Epoch(trial_id=trial_id, **{k: v for k, v in e.items() if k in cols}))

    def upsert_benchmark(self, trial_id: str, result: dict) -> None:
        st = result["settings"]
        lat = result["latency_ms"]
        key = (trial_id, st["backend"], st["device"], st["precision"])
        with Session(self.engine) as s, s.begin():
            row = s.get(Benchmark, key)
            if row is None:
                row = Benchmark(trial_id=trial_id, backend=key[1], device=key[2], precision=key[3])
                s.add(row)
            row.threads = st.get("threads")
            row.median_ms, row.p90_ms, row.p99_ms = lat["median"], lat["p90"], lat["p99"]
            row.mean_ms, row.min_ms, row.max_ms = lat["mean"], lat["min"], lat["max"]
            row.round_median_cv = result.get("round_median_cv")
            row.throughput_fps = result.get("throughput_fps")
            row.measured_at = _now()
            row.result_json = json.dumps(result, sort_keys=True, default=str)

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
