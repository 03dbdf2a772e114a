"""Evaluation runs: `histosearch eval` results with their dataset hash, model, index build and settings.

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("dataset_name", sa.String(), nullable=False),
        sa.Column("dataset_hash", sa.String(), nullable=False),
        sa.Column("model_fingerprint", sa.String(), nullable=False),
        sa.Column("build_id", sa.Integer(), nullable=True),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_eval_runs"),
        sa.ForeignKeyConstraint(["build_id"], ["builds.id"], name="fk_eval_runs_build_id_builds", ondelete="SET NULL"),
    )
    op.create_index("ix_eval_runs_dataset_hash", "eval_runs", ["dataset_hash"])


def downgrade() -> None:
    op.drop_index("ix_eval_runs_dataset_hash", table_name="eval_runs")
    op.drop_table("eval_runs")
