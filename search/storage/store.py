"""The SQLite store: sources, slides, tiles and their embeddings, texts, index builds, jobs, evaluation runs.

:class:`Store` combines one repository per noun (``sources``, ``tiles`` and their ``embeddings``, ``texts``,
``jobs``, ``eval_runs``) over one engine. Opening a database runs the Alembic migrations (``database.upgrade``),
so the schema in ``schema.py`` changes only through the ``migrations`` package. A tile and its embedding are
written in one transaction, so a killed indexer loses nothing and duplicates nothing, and a new FAISS index
type is built from the stored vectors without re-embedding.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from filelock import FileLock
from sqlalchemy import func, make_url, select
from sqlalchemy.exc import DBAPIError

from search.core.errors import ConfigError
from search.core.settings import Settings, load_settings
from search.storage.database import (
    BEGIN_OPTION,
    check_database_file,
    create_db_engine,
    describe_error,
    is_read_only,
    read_only_url,
    upgrade,
)
from search.storage.eval_runs import EvalRunRepository
from search.storage.grid import GridRepository
from search.storage.jobs import JobRepository
from search.storage.query_log import QueryLogRepository
from search.storage.schema import Case, Embedding, Slide, Source, TextItem, Tile
from search.storage.segments import VectorSegments
from search.storage.slides import SlideRepository
from search.storage.sources import SourceRepository
from search.storage.texts import TextRepository
from search.storage.tiles import TileRepository, TileState

__all__ = ["Store", "TileState"]


def _make_data_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"data dir {folder}: cannot create it ({exc.strerror}): set HISTOSEARCH_DATA_DIR (or --data-dir) to a "
            "folder you can write"
        ) from None


class Store(
    SourceRepository,
    TileRepository,
    SlideRepository,
    TextRepository,
    JobRepository,
    EvalRunRepository,
    QueryLogRepository,
    GridRepository,
):
    """All reads and writes of the histosearch database; one instance per process is enough."""

    def __init__(self, db_url: str, vectors_dir: Path | None = None) -> None:
        """``vectors_dir`` holds the vector segment files; by default ``vectors/`` beside a SQLite file."""
        url = make_url(db_url)
        self.read_only = False
        if url.get_backend_name() == "sqlite":
            if url.database in (None, "", ":memory:"):
                raise ConfigError(
                    f"{db_url}: an in-memory SQLite database cannot be shared by the migrations and the "
                    "store; use a file, e.g. sqlite:////path/to/histosearch.db"
                )
            path = Path(url.database)
            if is_read_only(path):
                # A shared read-only index still answers status, query and serve.
                check_database_file(path)
                self.read_only, db_url = True, read_only_url(path)
                self._upgrade(db_url, path)
            else:
                _make_data_dir(path.parent)
                # SQLite writes a new file's header only once it has created it: creators take turns, so
                # an empty file seen while holding the lock is a damaged database, not one being made.
                fresh = not path.is_file() or path.stat().st_size == 0
                with FileLock(path.with_name(f".{path.name}.create-lock")) if fresh else contextlib.nullcontext():
                    check_database_file(path)
                    self._upgrade(db_url, path)
            vectors_dir = vectors_dir or path.parent / "vectors"
        else:
            # A server database has no folder of its own: its vector segment files live in the data dir
            # (a shared file system when several machines index into it; docs/deployment.md).
            vectors_dir = vectors_dir or load_settings().data_dir / "vectors"
            self._upgrade(db_url, Path(db_url))
        self.db_url = db_url
        self.engine = create_db_engine(db_url)
        self._writer = self.engine.execution_options(**{BEGIN_OPTION: "IMMEDIATE"})
        self.segments = VectorSegments(vectors_dir)
        self._segment_dim = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        """The store of these settings: their database, with vector segments in their data dir."""
        return cls(settings.db_url, vectors_dir=settings.data_dir / "vectors")

    @staticmethod
    def _upgrade(db_url: str, path: Path) -> None:
        try:
            upgrade(db_url)
        except DBAPIError as exc:
            raise ConfigError(describe_error(exc, path) or str(exc)) from None

    def close(self) -> None:
        self.segments.close()
        self.engine.dispose()

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
