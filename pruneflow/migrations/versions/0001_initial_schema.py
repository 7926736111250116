"""The schema as ``Base.metadata.create_all`` made it before migrations (pf_trials, pf_epochs, pf_benchmarks).

Databases made by that code have these tables and no pf_alembic_version: pruneflow.migrations stamps
them at this revision, then upgrades them.

Revision ID: 0001
Revises:
Create Date: 2027-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pf_trials",
        sa.Column("trial_id", sa.String(128), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("study", sa.String(128), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("model", sa.String(255), nullable=True),
        sa.Column("dataset", sa.String(64), nullable=True),
        sa.Column("artifact_dir", sa.Text(), nullable=True),
        sa.Column("params_before", sa.BigInteger(), nullable=True),
        sa.Column("params_after", sa.BigInteger(), nullable=True),
        sa.Column("macs_before", sa.BigInteger(), nullable=True),
        sa.Column("macs_after", sa.BigInteger(), nullable=True),
        sa.Column("top1_masked", sa.Float(), nullable=True),
        sa.Column("loss_masked", sa.Float(), nullable=True),
        sa.Column("top1_final", sa.Float(), nullable=True),
        sa.Column("loss_final", sa.Float(), nullable=True),
        sa.Column("epochs_run", sa.Integer(), nullable=True),
        sa.Column("latency_median_ms", sa.Float(), nullable=True),
        sa.Column("latency_p90_ms", sa.Float(), nullable=True),
        sa.Column("latency_cv", sa.Float(), nullable=True),
        sa.Column("sparsities_json", sa.Text(), nullable=True),
        sa.Column("spec_json", sa.Text(), nullable=True),
        sa.Column("versions_json", sa.Text(), nullable=True),
        sa.Column("results_json", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("trial_id"),
    )
    op.create_index("ix_pf_trials_status", "pf_trials", ["status"])
    op.create_index("ix_pf_trials_study", "pf_trials", ["study"])
    op.create_table(
        "pf_benchmarks",
        sa.Column("trial_id", sa.String(128), nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("precision", sa.String(8), nullable=False),
        sa.Column("threads", sa.Integer(), nullable=True),
        sa.Column("median_ms", sa.Float(), nullable=True),
        sa.Column("p90_ms", sa.Float(), nullable=True),
        sa.Column("p99_ms", sa.Float(), nullable=True),
        sa.Column("mean_ms", sa.Float(), nullable=True),
        sa.Column("min_ms", sa.Float(), nullable=True),
        sa.Column("max_ms", sa.Float(), nullable=True),
        sa.Column("round_median_cv", sa.Float(), nullable=True),
        sa.Column("throughput_fps", sa.Float(), nullable=True),
        sa.Column("measured_at", sa.DateTime(), nullable=False),
        sa.Column("result_json", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("trial_id", "backend", "device", "precision"),
        sa.ForeignKeyConstraint(["trial_id"], ["pf_trials.trial_id"], ondelete="CASCADE"),
    )
    op.create_table(
        "pf_epochs",
        sa.Column("trial_id", sa.String(128), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("train_top1", sa.Float(), nullable=True),
        sa.Column("val_loss", sa.Float(), nullable=True),
        sa.Column("val_top1", sa.Float(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("trial_id", "epoch"),
        sa.ForeignKeyConstraint(["trial_id"], ["pf_trials.trial_id"], ondelete="CASCADE"),
    )


def downgrade() -> None:
    op.drop_table("pf_epochs")
    op.drop_table("pf_benchmarks")
    op.drop_index("ix_pf_trials_study", table_name="pf_trials")
    op.drop_index("ix_pf_trials_status", table_name="pf_trials")
    op.drop_table("pf_trials")
