"""Results a pathologist can trust (issue 10): build checks (recall, calibration) and the query log.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("builds") as batch:
        batch.add_column(sa.Column("checks", sa.JSON(), nullable=True))
    op.create_table(
        "query_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("image_hash", sa.String(), nullable=True),
        sa.Column("tile_id", sa.Integer(), nullable=True),
        sa.Column("filters", sa.JSON(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("model_fingerprint", sa.String(), nullable=True),
        sa.Column("build_id", sa.Integer(), nullable=True),
        sa.Column("results", sa.Integer(), nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_query_log"),
    )
    op.create_index("ix_query_log_at", "query_log", ["at"])


def downgrade() -> None:
    op.drop_index("ix_query_log_at", table_name="query_log")
    op.drop_table("query_log")
    with op.batch_alter_table("builds") as batch:
        batch.drop_column("checks")
