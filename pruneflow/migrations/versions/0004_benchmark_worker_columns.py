"""benchmark worker columns: who measured the trial's latency

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


# the benchmark worker's host name, Celery queue and Python environment (sys.prefix); latency.json's "worker"
_COLUMNS = (("bench_host", sa.String(length=255)), ("bench_queue", sa.String(length=255)), ("bench_env", sa.Text()))


# Plain ALTER TABLE ADD/DROP COLUMN, never a batch: on SQLite a batch rebuilds pf_trials, and dropping the
# old table deletes every epoch and benchmark row through ON DELETE CASCADE (see 0003).
def upgrade() -> None:
    for name, kind in _COLUMNS:
        op.add_column("pf_trials", sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    for name, _ in reversed(_COLUMNS):
        op.drop_column("pf_trials", name)
