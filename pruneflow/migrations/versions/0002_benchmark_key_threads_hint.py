"""Benchmarks keyed by (trial_id, backend, device, precision, threads, hint).

Before, a 4-thread measurement of a trial overwrote its 1-thread one. Existing rows get `hint` (and a
missing `threads`) from their stored result's settings, else the benchmark defaults (1 thread, latency).

Revision ID: 0002
Revises: 0001
Create Date: 2027-01-01
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

OLD_KEY = ["trial_id", "backend", "device", "precision"]
NEW_KEY = [*OLD_KEY, "threads", "hint"]
DEFAULT_THREADS, DEFAULT_HINT = 1, "latency"  # pruneflow.bench.settings.BenchmarkOptions defaults


def _settings(result_json: str | None) -> dict:
    try:
        settings = json.loads(result_json or "{}").get("settings")
    except (ValueError, AttributeError):
        return {}
    return settings if isinstance(settings, dict) else {}


def _benchmarks(key: list[str]) -> sa.Table:
    """pf_benchmarks with this key (SQLite rebuilds the table from it)."""
    float_cols = ["median_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "round_median_cv", "throughput_fps"]
    new = key == NEW_KEY
    return sa.Table(
        "pf_benchmarks", sa.MetaData(),
        sa.Column("trial_id", sa.String(128), nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("precision", sa.String(8), nullable=False),
        sa.Column("threads", sa.Integer(), nullable=not new),
        *([sa.Column("hint", sa.String(16), nullable=False)] if new else []),
        *(sa.Column(c, sa.Float(), nullable=True) for c in float_cols),
        sa.Column("measured_at", sa.DateTime(), nullable=False),
        sa.Column("result_json", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint(*key),
        sa.ForeignKeyConstraint(["trial_id"], ["pf_trials.trial_id"], ondelete="CASCADE"),
    )


def _set_primary_key(key: list[str]) -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":  # no ALTER of keys: rebuild the table, rows copied over
        with op.batch_alter_table("pf_benchmarks", copy_from=_benchmarks(key), recreate="always"):
            pass
        return
    pk_name = sa.inspect(bind).get_pk_constraint("pf_benchmarks").get("name") or "pf_benchmarks_pkey"
    new = key == NEW_KEY
    op.drop_constraint(pk_name, "pf_benchmarks", type_="primary")
    op.alter_column("pf_benchmarks", "threads", existing_type=sa.Integer(), nullable=not new)
    if new:
        op.alter_column("pf_benchmarks", "hint", existing_type=sa.String(16), nullable=False)
    op.create_primary_key(pk_name, "pf_benchmarks", key)


def upgrade() -> None:
    op.add_column("pf_benchmarks", sa.Column("hint", sa.String(16), nullable=True))
    bench = sa.table("pf_benchmarks", *(sa.column(c) for c in [*NEW_KEY, "result_json"]))
    bind = op.get_bind()
    for row in bind.execute(sa.select(bench)).mappings().all():
        st = _settings(row["result_json"])
        threads = row["threads"] if row["threads"] is not None else int(st.get("threads") or DEFAULT_THREADS)
        hint = str(st.get("hint") or DEFAULT_HINT)
        bind.execute(bench.update().where(*(bench.c[k] == row[k] for k in OLD_KEY))
                     .values(threads=threads, hint=hint))
    _set_primary_key(NEW_KEY)


def downgrade() -> None:
    """Back to one row per (trial, backend, device, precision): the most recently measured one is kept."""
    bench = sa.table("pf_benchmarks", *(sa.column(c) for c in [*NEW_KEY, "measured_at"]))
    bind = op.get_bind()
    keep: dict[tuple, dict] = {}
    rows = bind.execute(sa.select(bench).order_by(bench.c.measured_at)).mappings().all()
    for row in rows:
        keep[tuple(row[k] for k in OLD_KEY)] = row
    kept = {tuple(r[k] for k in NEW_KEY) for r in keep.values()}
    for row in rows:
        if tuple(row[k] for k in NEW_KEY) not in kept:
            bind.execute(bench.delete().where(*(bench.c[k] == row[k] for k in NEW_KEY)))
    _set_primary_key(OLD_KEY)
    if bind.dialect.name != "sqlite":  # SQLite's rebuilt table has no hint already
        op.drop_column("pf_benchmarks", "hint")
