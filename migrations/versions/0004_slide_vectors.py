"""Slide vectors: one row per slide and kind (mean, medoid, wsc) with model fingerprint, method and digest.

Revision ID: 0004
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "slide_vectors",
        sa.Column("slide_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("model_fingerprint", sa.String(), nullable=False),
        sa.Column("method", sa.String(), nullable=False),
        sa.Column("tiles_digest", sa.String(), nullable=False),
        sa.Column("n_tiles", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("attention_tile_ids", sa.LargeBinary(), nullable=True),
        sa.Column("attention", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("slide_id", "kind", name="pk_slide_vectors"),
        sa.ForeignKeyConstraint(
            ["slide_id"], ["slides.id"], name="fk_slide_vectors_slide_id_slides", ondelete="CASCADE"
        ),
    )


def downgrade() -> None:
    op.drop_table("slide_vectors")
