"""Vectors in append-only segment files: a vector_segments table, embeddings point at (segment, position).

Existing float32 blobs stay where they are and are still read (``vector`` becomes nullable); new
vectors are written to segment files.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vector_segments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_fingerprint", sa.String(), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_vector_segments"),
    )
    op.create_index("ix_vector_segments_model_fingerprint", "vector_segments", ["model_fingerprint"])
    with op.batch_alter_table("embeddings") as batch:
        batch.add_column(sa.Column("segment_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("position", sa.Integer(), nullable=True))
        batch.alter_column("vector", existing_type=sa.LargeBinary(), nullable=True)
        batch.create_foreign_key("fk_embeddings_segment_id_vector_segments", "vector_segments", ["segment_id"], ["id"])


def downgrade() -> None:
    # Vectors already moved to segment files have no blob to go back to.
    with op.batch_alter_table("embeddings") as batch:
        batch.drop_constraint("fk_embeddings_segment_id_vector_segments", type_="foreignkey")
        batch.alter_column("vector", existing_type=sa.LargeBinary(), nullable=False)
        batch.drop_column("position")
        batch.drop_column("segment_id")
    op.drop_index("ix_vector_segments_model_fingerprint", table_name="vector_segments")
    op.drop_table("vector_segments")
