"""screen and promotion columns

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 21:51:28.524600
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


_COLUMNS = (("top1_recalibrated", "Float"), ("loss_recalibrated", "Float"), ("top1_source", "String16"),
            ("stage", "Integer"), ("parent_trial_id", "String128"))


def _type(name: str):
    return {"Float": sa.Float(), "Integer": sa.Integer(), "String16": sa.String(length=16),
            "String128": sa.String(length=128)}[name]


# Plain ALTER TABLE ADD/DROP COLUMN (SQLite >= 3.35 has both), not a batch: on SQLite a batch copies
# pf_trials into a new table and drops the old one, and with foreign keys on that drop deletes every
# epoch and benchmark row through ON DELETE CASCADE.
def upgrade() -> None:
    for name, kind in _COLUMNS:
        op.add_column("pf_trials", sa.Column(name, _type(kind), nullable=True))


def downgrade() -> None:
    for name, _ in reversed(_COLUMNS):
        op.drop_column("pf_trials", name)
