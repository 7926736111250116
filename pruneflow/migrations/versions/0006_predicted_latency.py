"""predicted latency: what the sweep's latency model predicted before a trial ran (pruneflow.latency_model)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 14:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


# Plain ALTER TABLE ADD/DROP COLUMN, never a batch (see 0004): a batch rebuild on SQLite cascades deletes.
def upgrade() -> None:
    op.add_column("pf_trials", sa.Column("latency_predicted_ms", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("pf_trials", "latency_predicted_ms")
