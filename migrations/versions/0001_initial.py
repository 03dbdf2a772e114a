"""Initial schema: sources, cases, slides, tiles with embeddings, texts, builds, jobs, errors, meta.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
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
        "sources",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("uri", sa.String(), nullable=False),
        sa.Column("added_at", sa.DateTime(), nullable=False),
        sa.Column("last_scanned_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sources"),
        sa.UniqueConstraint("uri", name="uq_sources_uri"),
    )
    op.create_table(
        "cases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("case_key", sa.String(), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_cases"),
        sa.UniqueConstraint("case_key", name="uq_cases_case_key"),
    )
    op.create_table(
        "slides",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("slide_key", sa.String(), nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=True),
        sa.Column("source_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("mpp", sa.Float(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_slides"),
        sa.UniqueConstraint("slide_key", name="uq_slides_slide_key"),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"], name="fk_slides_case_id_cases", ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["source_id"], ["sources.id"], name="fk_slides_source_id_sources", ondelete="CASCADE"),
    )
    op.create_index("ix_slides_case_id", "slides", ["case_id"])
    op.create_index("ix_slides_source_id", "slides", ["source_id"])

    # AUTOINCREMENT: tile ids are FAISS ids and must never be handed out twice.
    op.create_table(
        "tiles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source_id", sa.Integer(), nullable=False),
        sa.Column("locator", sa.String(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("slide_id", sa.Integer(), nullable=True),
        sa.Column("level", sa.Integer(), nullable=True),
        sa.Column("x", sa.Integer(), nullable=True),
        sa.Column("y", sa.Integer(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("size", sa.Integer(), nullable=True),
        sa.Column("mpp", sa.Float(), nullable=True),
        sa.Column("content_hash", sa.String(), nullable=False),
        sa.Column("fingerprint", sa.String(), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tiles"),
        sa.UniqueConstraint("source_id", "locator", name="uq_tiles_source_id_locator"),
        sa.ForeignKeyConstraint(["source_id"], ["sources.id"], name="fk_tiles_source_id_sources", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["slide_id"], ["slides.id"], name="fk_tiles_slide_id_slides", ondelete="SET NULL"),
        sqlite_autoincrement=True,
    )
    # Serves neighbours(): same slide and level, then a range on x and y.
    op.create_index("ix_tiles_grid", "tiles", ["slide_id", "level", "x", "y"])

    op.create_table(
        "embeddings",
        sa.Column("tile_id", sa.Integer(), nullable=False),
        sa.Column("model_fingerprint", sa.String(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("tile_id", name="pk_embeddings"),
        sa.ForeignKeyConstraint(["tile_id"], ["tiles.id"], name="fk_embeddings_tile_id_tiles", ondelete="CASCADE"),
    )
    # One model's vectors paged in tile id order without a sort.
    op.create_index("ix_embeddings_model_tile", "embeddings", ["model_fingerprint", "tile_id"])

    op.create_table(
        "texts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("corpus", sa.String(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_texts"),
        sa.UniqueConstraint("corpus", "text", name="uq_texts_corpus_text"),
    )
    op.create_table(
        "text_embeddings",
        sa.Column("text_id", sa.Integer(), nullable=False),
        sa.Column("model_fingerprint", sa.String(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("text_id", name="pk_text_embeddings"),
        sa.ForeignKeyConstraint(["text_id"], ["texts.id"], name="fk_text_embeddings_text_id_texts", ondelete="CASCADE"),
    )
    op.create_index("ix_text_embeddings_model_fingerprint", "text_embeddings", ["model_fingerprint"])

    op.create_table(
        "builds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("model_fingerprint", sa.String(), nullable=False),
        sa.Column("index_type", sa.String(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("device", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_builds"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("total", sa.Integer(), nullable=True),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])

    op.create_table(
        "file_errors",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("source_id", sa.Integer(), nullable=True),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_file_errors"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_file_errors_job_id_jobs", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["source_id"], ["sources.id"], name="fk_file_errors_source_id_sources", ondelete="CASCADE"
        ),
    )
    op.create_table(
        "meta",
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_meta"),
    )


def downgrade() -> None:
    op.drop_table("meta")
    op.drop_table("file_errors")
    op.drop_index("ix_jobs_status", table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("builds")
    op.drop_index("ix_text_embeddings_model_fingerprint", table_name="text_embeddings")
    op.drop_table("text_embeddings")
    op.drop_table("texts")
    op.drop_index("ix_embeddings_model_tile", table_name="embeddings")
    op.drop_table("embeddings")
    op.drop_index("ix_tiles_grid", table_name="tiles")
    op.drop_table("tiles")
    op.drop_index("ix_slides_source_id", table_name="slides")
    op.drop_index("ix_slides_case_id", table_name="slides")
    op.drop_table("slides")
    op.drop_table("cases")
    op.drop_table("sources")
