"""The database schema: one ORM class per table, and the values some columns may take.

The schema changes only through the Alembic migrations in the ``migrations`` package
(``migrations/env.py`` compares them against this metadata). Tile ids are the FAISS ids: the
``tiles`` table is ``AUTOINCREMENT`` so an id is never handed out twice.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, LargeBinary, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Constraint names are fixed so that later batch migrations on SQLite can find and drop them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

BUILD_STATUSES = ("building", "live", "retired", "failed")
JOB_STATUSES = ("running", "done", "failed", "interrupted")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(), bytes: LargeBinary()}


class Source(Base):
    __tablename__ = "sources"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String)
    uri: Mapped[str] = mapped_column(String, unique=True)
    added_at: Mapped[datetime]
    last_scanned_at: Mapped[datetime | None]


class Case(Base):
    __tablename__ = "cases"

    id: Mapped[int] = mapped_column(primary_key=True)
    case_key: Mapped[str] = mapped_column(String, unique=True)
    meta: Mapped[dict[str, Any]]


class Slide(Base):
    __tablename__ = "slides"

    id: Mapped[int] = mapped_column(primary_key=True)
    slide_key: Mapped[str] = mapped_column(String, unique=True)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id", ondelete="SET NULL"), index=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String)
    mpp: Mapped[float | None] = mapped_column(Float)
    width: Mapped[int | None]
    height: Mapped[int | None]
    meta: Mapped[dict[str, Any]]


class Tile(Base):
    __tablename__ = "tiles"
    # AUTOINCREMENT keeps ids unique forever (they are the FAISS ids). A future batch migration of
    # this table must pass table_kwargs={"sqlite_autoincrement": True} and carry sqlite_sequence over.
    __table_args__ = (
        UniqueConstraint("source_id", "locator"),
        Index("ix_tiles_grid", "slide_id", "level", "x", "y"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"))
    locator: Mapped[str] = mapped_column(String)
    path: Mapped[str] = mapped_column(String)
    slide_id: Mapped[int | None] = mapped_column(ForeignKey("slides.id", ondelete="SET NULL"))
    level: Mapped[int | None]
    x: Mapped[int | None]
    y: Mapped[int | None]
    width: Mapped[int | None]
    height: Mapped[int | None]
    size: Mapped[int | None]
    mpp: Mapped[float | None] = mapped_column(Float)
    content_hash: Mapped[str] = mapped_column(String)
    fingerprint: Mapped[str] = mapped_column(String)
    meta: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class VectorSegment(Base):
    """An append-only file of float16 vectors (search/storage/segments.py); ``rows`` are committed."""

    __tablename__ = "vector_segments"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_fingerprint: Mapped[str] = mapped_column(String, index=True)
    dim: Mapped[int]
    rows: Mapped[int]
    created_at: Mapped[datetime]


class Embedding(Base):
    __tablename__ = "embeddings"
    # (model, tile_id) lets iter_embeddings page through one model's vectors in id order.
    __table_args__ = (Index("ix_embeddings_model_tile", "model_fingerprint", "tile_id"),)

    tile_id: Mapped[int] = mapped_column(ForeignKey("tiles.id", ondelete="CASCADE"), primary_key=True)
    model_fingerprint: Mapped[str] = mapped_column(String)
    # Where the vector lives: a row of a segment file. Databases from before revision 0006 hold it
    # in ``vector`` (float32 bytes) instead; both are read, new vectors go to segments.
    segment_id: Mapped[int | None] = mapped_column(ForeignKey("vector_segments.id"))
    position: Mapped[int | None]
    vector: Mapped[bytes | None]


class SlideVector(Base):
    """One slide vector per slide and kind (``mean``, ``medoid``, ``wsc``), with what made it.

    ``tiles_digest`` hashes the slide's (tile id, content hash) pairs and the model: a reindex recomputes
    the vector exactly when it moves. WSC vectors keep the tile ids of their bag and the grouper's
    attention per tile (float32 blobs) for attention-weighted text -> slide ranking.
    """

    __tablename__ = "slide_vectors"

    slide_id: Mapped[int] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String, primary_key=True)
    model_fingerprint: Mapped[str] = mapped_column(String)
    method: Mapped[str] = mapped_column(String)
    tiles_digest: Mapped[str] = mapped_column(String)
    n_tiles: Mapped[int]
    vector: Mapped[bytes]
    attention_tile_ids: Mapped[bytes | None]
    attention: Mapped[bytes | None]
    created_at: Mapped[datetime]


class TextItem(Base):
    __tablename__ = "texts"
    __table_args__ = (UniqueConstraint("corpus", "text"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    corpus: Mapped[str] = mapped_column(String)
    text: Mapped[str] = mapped_column(Text)
    tags: Mapped[dict[str, Any]]


class TextEmbedding(Base):
    __tablename__ = "text_embeddings"

    text_id: Mapped[int] = mapped_column(ForeignKey("texts.id", ondelete="CASCADE"), primary_key=True)
    model_fingerprint: Mapped[str] = mapped_column(String, index=True)
    vector: Mapped[bytes]


class Build(Base):
    __tablename__ = "builds"

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime]
    model_fingerprint: Mapped[str] = mapped_column(String)
    index_type: Mapped[str] = mapped_column(String)
    count: Mapped[int]
    path: Mapped[str] = mapped_column(String)
    status: Mapped[str] = mapped_column(String)
    device: Mapped[str] = mapped_column(String)
    # sha256 of the index file (migration 0002); None for builds made before it.
    checksum: Mapped[str | None] = mapped_column(String)
    # What the build was checked against before publishing: recall@10 vs exact search, calibration sample.
    checks: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String)
    status: Mapped[str] = mapped_column(String, index=True)
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime]
    pid: Mapped[int | None]
    total: Mapped[int | None]
    done: Mapped[int]
    errors: Mapped[int]
    message: Mapped[str | None] = mapped_column(Text)
    args: Mapped[dict[str, Any]]


class FileError(Base):
    __tablename__ = "file_errors"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    source_id: Mapped[int | None] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]


class QueryLogEntry(Base):
    """One query as an admin reads it back: never the image itself, only its content hash."""

    __tablename__ = "query_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    kind: Mapped[str] = mapped_column(String)
    text: Mapped[str | None] = mapped_column(Text)
    image_hash: Mapped[str | None] = mapped_column(String)
    tile_id: Mapped[int | None]
    filters: Mapped[dict[str, Any]]
    options: Mapped[dict[str, Any]]
    model_fingerprint: Mapped[str | None] = mapped_column(String)
    build_id: Mapped[int | None]
    results: Mapped[int]
    duration_ms: Mapped[float] = mapped_column(Float)


class MetaItem(Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class EvalRun(Base):
    """One `histosearch eval` run: what was measured (dataset hash, model, build, settings) and the report."""

    __tablename__ = "eval_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String)
    dataset_name: Mapped[str] = mapped_column(String)
    dataset_hash: Mapped[str] = mapped_column(String, index=True)
    model_fingerprint: Mapped[str] = mapped_column(String)
    build_id: Mapped[int | None] = mapped_column(ForeignKey("builds.id", ondelete="SET NULL"))
    settings: Mapped[dict[str, Any]]
    report: Mapped[dict[str, Any]]
