"""The SQLite store: sources, slides, tiles and their embeddings, texts, index builds, jobs.

This module owns the schema. It changes only through the Alembic migrations in the ``migrations``
package, which run when a :class:`Store` opens a database. A tile and its embedding are written in
one transaction, so a killed indexer loses nothing and duplicates nothing, and a new FAISS index
type is built from the stored vectors without re-embedding. Tile ids are the FAISS ids: the table
is ``AUTOINCREMENT`` so an id is never handed out twice.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    Select,
    String,
    Text,
    UniqueConstraint,
    cast,
    create_engine,
    delete,
    event,
    func,
    insert,
    make_url,
    select,
    true,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from search.core.errors import BadQuery, ConfigError, NotFound

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
BUSY_TIMEOUT_MS = 30_000
# SQLite allows 32766 bound parameters per statement; id lists are sent in chunks well below that.
_CHUNK = 10_000
_BEGIN_OPTION = "histosearch_begin"


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


class Embedding(Base):
    __tablename__ = "embeddings"
    # (model, tile_id) lets iter_embeddings page through one model's vectors in id order.
    __table_args__ = (Index("ix_embeddings_model_tile", "model_fingerprint", "tile_id"),)

    tile_id: Mapped[int] = mapped_column(ForeignKey("tiles.id", ondelete="CASCADE"), primary_key=True)
    model_fingerprint: Mapped[str] = mapped_column(String)
    vector: Mapped[bytes]


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


class MetaItem(Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class TileState(NamedTuple):
    """What the indexer needs to decide whether a tile is new, moved, changed or needs re-embedding."""

    id: int
    fingerprint: str
    content_hash: str
    model_fingerprint: str | None


TILE_COLUMNS = frozenset(c.name for c in Tile.__table__.columns) - {"id"}


# --- engine and migrations -------------------------------------------------------------------


def create_db_engine(
    db_url: str,
    *,
    foreign_keys: bool = True,
    begin: Literal["DEFERRED", "IMMEDIATE"] = "DEFERRED",
) -> Engine:
    """An engine whose SQLite connections use WAL, foreign keys and a 30 s busy timeout.

    pysqlite's own transaction handling is switched off and BEGIN is emitted here, so DDL is
    transactional and a writer can ask for ``BEGIN IMMEDIATE`` (execution option
    ``histosearch_begin``): a transaction that reads and then writes takes the write lock up front
    instead of failing with SQLITE_BUSY when another process committed in between.
    """
    engine = create_engine(db_url)
    if engine.dialect.name != "sqlite":
        return engine

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL lets the web server read while the indexer writes.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(_BEGIN_OPTION, begin)
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def alembic_config(db_url: str) -> Config:
    """An Alembic config for ``db_url`` built in code: no alembic.ini is needed on disk."""
    config = Config()
    # The migration scripts are data to this layer: found by package name, never imported from here,
    # since migrations/env.py imports this schema.
    config.set_main_option("script_location", str(resources.files("migrations")))
    # The URL goes in attributes, not the main options, which would %-interpolate it.
    config.attributes["url"] = db_url
    return config


def upgrade(db_url: str) -> None:
    """Bring the database at ``db_url`` to the newest schema (``alembic upgrade head``).

    A database already at head is only read, so opening it takes no write lock.
    """
    config = alembic_config(db_url)
    script = ScriptDirectory.from_config(config)
    engine = create_db_engine(db_url)
    try:
        with engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
    finally:
        engine.dispose()
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = current - known
    if unknown:
        raise ConfigError(
            f"{db_url}: the database schema is at revision {', '.join(sorted(unknown))}, newer than this "
            "histosearch knows; upgrade histosearch, or point HISTOSEARCH_DATA_DIR at another database"
        )
    if current != set(script.get_heads()):
        command.upgrade(config, "head")


# --- helpers ---------------------------------------------------------------------------------


def _now() -> datetime:
    # Stored naive in UTC (SQLite has no time zones); _iso marks them as UTC on the way out.
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _iso(value: datetime | None) -> str | None:
    return value.replace(tzinfo=timezone.utc).isoformat() if value else None


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _as_matrix(vectors: np.ndarray, n: int) -> np.ndarray:
    matrix = np.asarray(vectors)
    if matrix.ndim != 2 or matrix.shape[0] != n:
        raise ValueError(f"vectors has shape {matrix.shape}, expected ({n}, dim): one row per item")
    return np.ascontiguousarray(matrix, dtype="<f4")


def _decode(blobs: Sequence[bytes]) -> np.ndarray:
    """Stored little-endian float32 rows -> a writable float32 matrix [n, d]."""
    if not blobs:
        return np.empty((0, 0), dtype=np.float32)
    flat = np.frombuffer(b"".join(blobs), dtype="<f4")
    return flat.reshape(len(blobs), -1).astype(np.float32, copy=True)


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _job_dict(job: Job) -> dict:
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "heartbeat_at": _iso(job.heartbeat_at),
        "pid": job.pid,
        "total": job.total,
        "done": job.done,
        "errors": job.errors,
        "message": job.message,
        "args": job.args,
    }


def _build_dict(build: Build) -> dict:
    return {
        "id": build.id,
        "created_at": _iso(build.created_at),
        "model_fingerprint": build.model_fingerprint,
        "index_type": build.index_type,
        "count": build.count,
        "path": build.path,
        "status": build.status,
        "device": build.device,
    }


def _tile_select() -> Select[Any]:
    return (
        select(Tile, Source.kind, Source.uri, Slide.slide_key, Case.case_key)
        .join(Source, Tile.source_id == Source.id)
        .outerjoin(Slide, Tile.slide_id == Slide.id)
        .outerjoin(Case, Slide.case_id == Case.id)
    )


def _tile_dict(tile: Tile, kind: str, uri: str, slide_key: str | None, case_key: str | None) -> dict:
    return {
        "id": tile.id,
        "source_id": tile.source_id,
        "source": {"id": tile.source_id, "kind": kind, "uri": uri},
        "locator": tile.locator,
        "path": tile.path,
        "slide_id": tile.slide_id,
        "slide_key": slide_key,
        "case_key": case_key,
        "level": tile.level,
        "x": tile.x,
        "y": tile.y,
        "width": tile.width,
        "height": tile.height,
        "size": tile.size,
        "mpp": tile.mpp,
        "content_hash": tile.content_hash,
        "fingerprint": tile.fingerprint,
        "meta": tile.meta,
        "created_at": _iso(tile.created_at),
    }


def _tile_row(row: dict) -> dict:
    unknown = set(row) - TILE_COLUMNS
    if unknown:
        raise ValueError(f"tile row has unknown keys {sorted(unknown)}; allowed: {sorted(TILE_COLUMNS)}")
    full = dict.fromkeys(TILE_COLUMNS)
    full.update(row)
    full["meta"] = full["meta"] or {}
    full["created_at"] = full["created_at"] or _now()
    return full


class Store:
    """All reads and writes of the histosearch database; one instance per process is enough."""

    def __init__(self, db_url: str) -> None:
        url = make_url(db_url)
        if url.get_backend_name() == "sqlite":
            if url.database in (None, "", ":memory:"):
                raise ConfigError(
                    f"{db_url}: an in-memory SQLite database cannot be shared by the migrations and the "
                    "store; use a file, e.g. sqlite:////path/to/histosearch.db"
                )
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        self.db_url = db_url
        upgrade(db_url)
        self.engine = create_db_engine(db_url)
        self._writer = self.engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises.

        ``write=True`` takes the write lock at BEGIN; use it for any block that writes after reading.
        """
        bind = self._writer if write else self.engine
        with Session(bind, expire_on_commit=False) as session, session.begin():
            yield session

    # --- sources, cases, slides --------------------------------------------------------------

    def get_or_create_source(self, kind: str, uri: str) -> int:
        with self.session(write=True) as s:
            source = s.scalars(select(Source).where(Source.uri == uri)).one_or_none()
            if source is None:
                source = Source(kind=kind, uri=uri, added_at=_now())
                s.add(source)
                s.flush()
            elif source.kind != kind:
                source.kind = kind
            return source.id

    def mark_scanned(self, source_id: int) -> None:
        """Record that a scan of the source finished now."""
        with self.session(write=True) as s:
            s.execute(update(Source).where(Source.id == source_id).values(last_scanned_at=_now()))

    def delete_source(self, uri: str) -> int | None:
        """Forget a source: its tiles, vectors, slides and errors go with it (cascade). Returns how many
        tiles it had, or None when no source has this uri."""
        with self.session(write=True) as s:
            source = s.scalars(select(Source).where(Source.uri == uri)).one_or_none()
            if source is None:
                return None
            tiles = s.scalar(select(func.count()).select_from(Tile).where(Tile.source_id == source.id))
            s.execute(delete(MetaItem).where(MetaItem.key == f"manifest:{source.id}"))
            s.delete(source)
            return int(tiles or 0)

    def sources(self) -> list[dict]:
        tiles = select(Tile.source_id, func.count().label("n")).group_by(Tile.source_id).subquery()
        stmt = (
            select(Source, func.coalesce(tiles.c.n, 0))
            .outerjoin(tiles, tiles.c.source_id == Source.id)
            .order_by(Source.id)
        )
        with self.session() as s:
            return [
                {
                    "id": src.id,
                    "kind": src.kind,
                    "uri": src.uri,
                    "tiles": n,
                    "added_at": _iso(src.added_at),
                    "last_scanned_at": _iso(src.last_scanned_at),
                }
                for src, n in s.execute(stmt)
            ]

    def upsert_case(self, case_key: str, meta: dict | None = None) -> int:
        """Create the case, or replace its meta when ``meta`` is given."""
        with self.session(write=True) as s:
            case = s.scalars(select(Case).where(Case.case_key == case_key)).one_or_none()
            if case is None:
                case = Case(case_key=case_key, meta=meta or {})
                s.add(case)
                s.flush()
            elif meta is not None:
                case.meta = meta
            return case.id

    def upsert_slide(
        self,
        slide_key: str,
        source_id: int,
        case_id: int | None,
        path: str,
        mpp: float | None = None,
        width: int | None = None,
        height: int | None = None,
        meta: dict | None = None,
    ) -> int:
        """Create the slide or overwrite its fields; ``meta=None`` keeps the stored meta."""
        with self.session(write=True) as s:
            slide = s.scalars(select(Slide).where(Slide.slide_key == slide_key)).one_or_none()
            if slide is None:
                slide = Slide(slide_key=slide_key, meta=meta or {})
                s.add(slide)
            elif meta is not None:
                slide.meta = meta
            slide.source_id = source_id
            slide.case_id = case_id
            slide.path = path
            slide.mpp = mpp
            slide.width = width
            slide.height = height
            s.flush()
            return slide.id

    # --- tiles and embeddings ----------------------------------------------------------------

    def tile_states(self, source_id: int) -> dict[str, TileState]:
        stmt = (
            select(Tile.locator, Tile.id, Tile.fingerprint, Tile.content_hash, Embedding.model_fingerprint)
            .outerjoin(Embedding, Embedding.tile_id == Tile.id)
            .where(Tile.source_id == source_id)
        )
        with self.session() as s:
            return {locator: TileState(*rest) for locator, *rest in s.execute(stmt)}

    def _insert_tiles(self, s: Session, rows: list[dict], vectors: np.ndarray, model_fingerprint: str) -> list[int]:
        matrix = _as_matrix(vectors, len(rows))
        if not rows:
            return []
        full = [_tile_row(row) for row in rows]
        ids = list(s.scalars(insert(Tile).returning(Tile.id, sort_by_parameter_order=True), full))
        s.execute(
            insert(Embedding),
            [
                {"tile_id": tile_id, "model_fingerprint": model_fingerprint, "vector": vector.tobytes()}
                for tile_id, vector in zip(ids, matrix, strict=True)
            ],
        )
        return ids

    def add_tiles(self, rows: list[dict], vectors: np.ndarray, model_fingerprint: str) -> list[int]:
        """Insert tiles with their embeddings in one transaction; returns the new ids in row order."""
        with self.session(write=True) as s:
            return self._insert_tiles(s, rows, vectors, model_fingerprint)

    def replace_tiles(
        self, old_ids: list[int], rows: list[dict], vectors: np.ndarray, model_fingerprint: str
    ) -> list[int]:
        """Delete changed tiles and insert their new versions (new ids) in one transaction."""
        with self.session(write=True) as s:
            for chunk in _chunks(old_ids):
                s.execute(delete(Tile).where(Tile.id.in_(chunk)))
            return self._insert_tiles(s, rows, vectors, model_fingerprint)

    def set_embeddings(self, tile_ids: list[int], vectors: np.ndarray, model_fingerprint: str) -> None:
        """Store (or overwrite) the embeddings of existing tiles, e.g. after a model change."""
        self._upsert_vectors(Embedding, "tile_id", tile_ids, vectors, model_fingerprint)

    def update_fingerprints(self, pairs: list[tuple[int, str]]) -> None:
        """The cheap change detector moved but the content hash did not: keep the tile and its id."""
        if not pairs:
            return
        with self.session(write=True) as s:
            s.execute(update(Tile), [{"id": tile_id, "fingerprint": fp} for tile_id, fp in pairs])

    def delete_tiles(self, tile_ids: list[int]) -> None:
        with self.session(write=True) as s:
            for chunk in _chunks(tile_ids):
                s.execute(delete(Tile).where(Tile.id.in_(chunk)))

    def iter_embeddings(self, model_fingerprint: str, batch: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64 [n], vectors float32 [n, d]) in id order, one short transaction per batch."""
        last = -1
        while True:
            stmt = (
                select(Embedding.tile_id, Embedding.vector)
                .where(Embedding.model_fingerprint == model_fingerprint, Embedding.tile_id > last)
                .order_by(Embedding.tile_id)
                .limit(batch)
            )
            with self.session() as s:
                rows = s.execute(stmt).all()
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            yield ids, _decode([r[1] for r in rows])
            last = int(ids[-1])

    def get_embeddings(self, tile_ids: list[int], model_fingerprint: str) -> np.ndarray:
        """Vectors [n, d] in the order of ``tile_ids``; NotFound names the tiles that have none."""
        found: dict[int, bytes] = {}
        with self.session() as s:
            for chunk in _chunks(list(dict.fromkeys(tile_ids))):
                stmt = select(Embedding.tile_id, Embedding.vector).where(
                    Embedding.tile_id.in_(chunk), Embedding.model_fingerprint == model_fingerprint
                )
                found.update((i, v) for i, v in s.execute(stmt))
        missing = [i for i in tile_ids if i not in found]
        if missing:
            shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise NotFound(
                f"no embedding under model {model_fingerprint} for tile(s) {shown}; "
                "run `histosearch index` to (re-)embed them"
            )
        return _decode([found[i] for i in tile_ids])

    def get_tiles(self, tile_ids: list[int]) -> list[dict]:
        """Tiles in the order of ``tile_ids`` with their source, slide and case; missing ids are skipped."""
        found: dict[int, dict] = {}
        with self.session() as s:
            for chunk in _chunks(list(dict.fromkeys(int(i) for i in tile_ids))):
                for row in s.execute(_tile_select().where(Tile.id.in_(chunk))):
                    found[row[0].id] = _tile_dict(*row)
        return [found[i] for i in (int(i) for i in tile_ids) if i in found]

    def tile_ids_matching(
        self,
        source: str | int | None = None,
        slide: str | None = None,
        case: str | None = None,
        meta: dict[str, str] | None = None,
    ) -> np.ndarray:
        """Sorted int64 ids of the tiles that pass every given filter (all tiles when none is given).

        ``source`` is a source uri or id, ``slide`` a slide_key, ``case`` a case_key; ``meta`` values
        are compared with the tile's JSON meta as text, so {"stain": "HE"} or {"year": "2020"}.
        """
        stmt = select(Tile.id).order_by(Tile.id)
        if source is not None:
            if isinstance(source, int) or str(source).isdigit():
                stmt = stmt.where(Tile.source_id == int(source))
            else:
                stmt = stmt.where(Tile.source_id.in_(select(Source.id).where(Source.uri == source)))
        if slide is not None or case is not None:
            stmt = stmt.join(Slide, Tile.slide_id == Slide.id)
            if slide is not None:
                stmt = stmt.where(Slide.slide_key == slide)
            if case is not None:
                stmt = stmt.join(Case, Slide.case_id == Case.id).where(Case.case_key == case)
        for key, value in (meta or {}).items():
            if not isinstance(key, str) or not key:
                raise BadQuery(f"meta filter key {key!r} is not a name; use meta.<column>=<value>")
            # json_each decodes keys; a JSON path ('$."key"') misses keys with quotes or non-ASCII.
            pairs = func.json_each(Tile.meta).table_valued("key", "value")
            stmt = stmt.where(select(1).where(pairs.c.key == key, cast(pairs.c.value, String) == str(value)).exists())
        with self.session() as s:
            return np.fromiter(s.scalars(stmt), dtype=np.int64)

    def neighbours(self, tile_id: int, radius: int = 1) -> list[dict]:
        """Tiles of the same slide and level within ``radius`` grid steps of the tile, itself included.

        The grid step along each axis is the smallest distance from the tile to another x (or y) of
        that slide and level, so it holds whatever pixel frame and stride the reader used. Each dict
        is a :meth:`get_tiles` dict plus ``dx``/``dy`` in steps, ordered row by row. Tiles without a
        slide or grid position have no neighbours: the answer is [].
        """
        with self.session() as s:
            tile = s.get(Tile, tile_id)
            if tile is None:
                raise NotFound(f"no tile with id {tile_id}")
            if tile.slide_id is None or tile.x is None or tile.y is None:
                return []
            x0, y0 = tile.x, tile.y
            same = [
                Tile.slide_id == tile.slide_id,
                Tile.level.is_(None) if tile.level is None else Tile.level == tile.level,
            ]
            step_x = s.scalar(select(func.min(func.abs(Tile.x - x0))).where(*same, Tile.x != x0)) or 0
            step_y = s.scalar(select(func.min(func.abs(Tile.y - y0))).where(*same, Tile.y != y0)) or 0
            stmt = (
                _tile_select()
                .where(
                    *same,
                    Tile.x.between(x0 - radius * step_x, x0 + radius * step_x),
                    Tile.y.between(y0 - radius * step_y, y0 + radius * step_y),
                )
                .order_by(Tile.y, Tile.x)
            )
            out = []
            for row in s.execute(stmt):
                item = _tile_dict(*row)
                item["dx"] = round((item["x"] - x0) / step_x) if step_x else 0
                item["dy"] = round((item["y"] - y0) / step_y) if step_y else 0
                out.append(item)
            return out

    def facet_values(self, limit: int = 50) -> dict[str, list[str]]:
        """Values for the UI's filter dropdowns: the first ``limit`` of each, sorted.

        Keys: "sources" (uris), "slides", "cases", and "meta": {key: [values]} over the scalar
        values of the tiles' meta. The meta part reads every tile, so callers should cache it.
        """
        je = func.json_each(Tile.meta).table_valued("key", "value", "type")
        pairs = (
            select(je.c.key, je.c.value)
            .select_from(Tile)
            .join(je, true())
            .where(je.c.type.in_(["text", "integer", "real", "true", "false"]))
            .distinct()
            .subquery()
        )
        rank = func.row_number().over(partition_by=pairs.c.key, order_by=pairs.c.value).label("rank")
        ranked = select(pairs.c.key, pairs.c.value, rank).subquery()
        meta_stmt = (
            select(ranked.c.key, ranked.c.value).where(ranked.c.rank <= limit).order_by(ranked.c.key, ranked.c.rank)
        )
        with self.session() as s:
            meta: dict[str, list[str]] = {}
            for key, value in s.execute(meta_stmt):
                meta.setdefault(key, []).append(str(value))
            return {
                "sources": list(s.scalars(select(Source.uri).order_by(Source.uri).limit(limit))),
                "slides": list(s.scalars(select(Slide.slide_key).order_by(Slide.slide_key).limit(limit))),
                "cases": list(s.scalars(select(Case.case_key).order_by(Case.case_key).limit(limit))),
                "meta": meta,
            }

    def counts(self) -> dict:
        """Row counts: sources, slides, cases, tiles, texts, embedded (tiles with a vector), and
        embedded_by_model {model_fingerprint: tiles}."""
        with self.session() as s:
            grouped = select(Embedding.model_fingerprint, func.count()).group_by(Embedding.model_fingerprint)
            by_model = {fp: n for fp, n in s.execute(grouped)}
            return {
                "sources": s.scalar(select(func.count()).select_from(Source)),
                "slides": s.scalar(select(func.count()).select_from(Slide)),
                "cases": s.scalar(select(func.count()).select_from(Case)),
                "tiles": s.scalar(select(func.count()).select_from(Tile)),
                "texts": s.scalar(select(func.count()).select_from(TextItem)),
                "embedded": sum(by_model.values()),
                "embedded_by_model": by_model,
            }

    # --- texts -------------------------------------------------------------------------------

    def add_texts(self, corpus: str, items: list[tuple[str, dict]], vectors: np.ndarray, model_fingerprint: str) -> int:
        """Add texts with their embeddings, skipping (corpus, text) pairs already stored or repeated."""
        matrix = _as_matrix(vectors, len(items))
        with self.session(write=True) as s:
            existing: set[str] = set()
            for chunk in _chunks([text for text, _ in items]):
                existing.update(
                    s.scalars(select(TextItem.text).where(TextItem.corpus == corpus, TextItem.text.in_(chunk)))
                )
            new: list[tuple[str, dict, np.ndarray]] = []
            for (text, tags), vector in zip(items, matrix, strict=True):
                if text not in existing:
                    existing.add(text)
                    new.append((text, tags, vector))
            if not new:
                return 0
            ids = list(
                s.scalars(
                    insert(TextItem).returning(TextItem.id, sort_by_parameter_order=True),
                    [{"corpus": corpus, "text": text, "tags": tags or {}} for text, tags, _ in new],
                )
            )
            s.execute(
                insert(TextEmbedding),
                [
                    {"text_id": text_id, "model_fingerprint": model_fingerprint, "vector": v.tobytes()}
                    for text_id, (_, _, v) in zip(ids, new, strict=True)
                ],
            )
            return len(ids)

    def texts_missing_embeddings(self, model_fingerprint: str) -> list[tuple[int, str]]:
        """(id, text) of texts with no vector under ``model_fingerprint``, in id order."""
        stmt = (
            select(TextItem.id, TextItem.text)
            .outerjoin(TextEmbedding, TextEmbedding.text_id == TextItem.id)
            .where((TextEmbedding.text_id.is_(None)) | (TextEmbedding.model_fingerprint != model_fingerprint))
            .order_by(TextItem.id)
        )
        with self.session() as s:
            return [(i, t) for i, t in s.execute(stmt)]

    def set_text_embeddings(self, text_ids: list[int], vectors: np.ndarray, model_fingerprint: str) -> None:
        self._upsert_vectors(TextEmbedding, "text_id", text_ids, vectors, model_fingerprint)

    def _upsert_vectors(
        self, table: type[Embedding] | type[TextEmbedding], key: str, ids: list[int], vectors: np.ndarray, fp: str
    ) -> None:
        matrix = _as_matrix(vectors, len(ids))
        if not ids:
            return
        stmt = sqlite_insert(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=[getattr(table, key)],
            set_={"model_fingerprint": stmt.excluded.model_fingerprint, "vector": stmt.excluded.vector},
        )
        with self.session(write=True) as s:
            s.execute(
                stmt,
                [
                    {key: int(i), "model_fingerprint": fp, "vector": v.tobytes()}
                    for i, v in zip(ids, matrix, strict=True)
                ],
            )

    def text_matrix(self, model_fingerprint: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], vectors float32 [n, d]) of every text embedded under the model, in id order."""
        stmt = (
            select(TextEmbedding.text_id, TextEmbedding.vector)
            .where(TextEmbedding.model_fingerprint == model_fingerprint)
            .order_by(TextEmbedding.text_id)
        )
        with self.session() as s:
            rows = s.execute(stmt).all()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return ids, _decode([r[1] for r in rows])

    def get_texts(self, text_ids: list[int]) -> list[dict]:
        """Texts (id, corpus, text, tags) in the order of ``text_ids``; missing ids are skipped."""
        found: dict[int, dict] = {}
        with self.session() as s:
            for chunk in _chunks(list(dict.fromkeys(int(i) for i in text_ids))):
                for item in s.scalars(select(TextItem).where(TextItem.id.in_(chunk))):
                    found[item.id] = {"id": item.id, "corpus": item.corpus, "text": item.text, "tags": item.tags}
        return [found[i] for i in (int(i) for i in text_ids) if i in found]

    # --- builds ------------------------------------------------------------------------------

    def add_build(self, model_fingerprint: str, index_type: str, count: int, path: str, device: str) -> int:
        """Record an index build in progress (status 'building')."""
        with self.session(write=True) as s:
            build = Build(
                created_at=_now(),
                model_fingerprint=model_fingerprint,
                index_type=index_type,
                count=count,
                path=path,
                status="building",
                device=device,
            )
            s.add(build)
            s.flush()
            return build.id

    def set_build_status(self, build_id: int, status: str) -> None:
        """Set a build's status; making one 'live' retires the build that was live before."""
        if status not in BUILD_STATUSES:
            raise ValueError(f"build status {status!r} is not one of {BUILD_STATUSES}")
        with self.session(write=True) as s:
            build = s.get(Build, build_id)
            if build is None:
                raise NotFound(f"no index build with id {build_id}")
            if status == "live":
                s.execute(update(Build).where(Build.status == "live", Build.id != build_id).values(status="retired"))
            build.status = status

    def live_build(self) -> dict | None:
        with self.session() as s:
            build = s.scalars(select(Build).where(Build.status == "live").order_by(Build.id.desc()).limit(1)).first()
            return _build_dict(build) if build else None

    # --- jobs --------------------------------------------------------------------------------

    def start_job(self, kind: str, args: dict, total: int | None = None) -> int:
        """Record a running job owned by this process."""
        now = _now()
        with self.session(write=True) as s:
            job = Job(
                kind=kind,
                status="running",
                started_at=now,
                heartbeat_at=now,
                pid=os.getpid(),
                total=total,
                done=0,
                errors=0,
                args=args,
            )
            s.add(job)
            s.flush()
            return job.id

    def update_job(
        self,
        job_id: int,
        *,
        done: int | None = None,
        total: int | None = None,
        errors: int | None = None,
        message: str | None = None,
    ) -> None:
        """Set the given progress fields and bump the heartbeat."""
        values: dict[str, Any] = {"heartbeat_at": _now()}
        for name, value in (("done", done), ("total", total), ("errors", errors), ("message", message)):
            if value is not None:
                values[name] = value
        with self.session(write=True) as s:
            if s.execute(update(Job).where(Job.id == job_id).values(**values)).rowcount == 0:
                raise NotFound(f"no job with id {job_id}")

    def finish_job(self, job_id: int, status: str, message: str | None = None) -> None:
        if status not in JOB_STATUSES or status == "running":
            raise ValueError(f"a finished job's status is one of done, failed, interrupted, not {status!r}")
        now = _now()
        values: dict[str, Any] = {"status": status, "finished_at": now, "heartbeat_at": now}
        if message is not None:
            values["message"] = message
        with self.session(write=True) as s:
            if s.execute(update(Job).where(Job.id == job_id).values(**values)).rowcount == 0:
                raise NotFound(f"no job with id {job_id}")

    def running_job(self) -> dict | None:
        """The newest job still marked running (see :meth:`mark_stale_jobs_interrupted`)."""
        with self.session() as s:
            job = s.scalars(select(Job).where(Job.status == "running").order_by(Job.id.desc()).limit(1)).first()
            return _job_dict(job) if job else None

    def last_job(self) -> dict | None:
        with self.session() as s:
            job = s.scalars(select(Job).order_by(Job.id.desc()).limit(1)).first()
            return _job_dict(job) if job else None

    def mark_stale_jobs_interrupted(self) -> int:
        """Mark running jobs whose process is gone as interrupted; returns how many.

        Liveness is checked by pid on this machine, so it is meant for a database on a local disk.
        """
        with self.session(write=True) as s:
            stale = [job for job in s.scalars(select(Job).where(Job.status == "running")) if not _pid_alive(job.pid)]
            now = _now()
            for job in stale:
                job.status = "interrupted"
                job.finished_at = now
                job.message = job.message or f"process {job.pid} ended without finishing the job"
            return len(stale)

    # --- errors and meta ---------------------------------------------------------------------

    def record_error(self, path: str, reason: str, job_id: int | None = None, source_id: int | None = None) -> None:
        with self.session(write=True) as s:
            s.add(FileError(path=path, reason=reason, job_id=job_id, source_id=source_id, created_at=_now()))

    def recent_errors(self, limit: int = 20) -> list[dict]:
        """The newest file errors first."""
        with self.session() as s:
            return [
                {
                    "id": e.id,
                    "job_id": e.job_id,
                    "source_id": e.source_id,
                    "path": e.path,
                    "reason": e.reason,
                    "created_at": _iso(e.created_at),
                }
                for e in s.scalars(select(FileError).order_by(FileError.id.desc()).limit(limit))
            ]

    def get_meta(self, key: str) -> str | None:
        with self.session() as s:
            return s.scalar(select(MetaItem.value).where(MetaItem.key == key))

    def set_meta(self, key: str, value: str) -> None:
        with self.session(write=True) as s:
            s.merge(MetaItem(key=key, value=value))
