"""What the per-noun repositories share: one transaction per ``session`` block, vector upserts, and
the conversions between Python values and stored rows (UTC timestamps, float32 blobs, id chunks)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy import Engine, Select
from sqlalchemy.orm import Session

from search.storage.dialect import upsert
from search.storage.schema import Embedding, TextEmbedding

# SQLite allows 32766 bound parameters per statement, Postgres 65535; id lists are sent in chunks well below that.
CHUNK = 10_000


def utcnow() -> datetime:
    # Stored naive in UTC (SQLite has no time zones); iso marks them as UTC on the way out.
    return datetime.now(timezone.utc).replace(tzinfo=None)


def iso(value: datetime | None) -> str | None:
    return value.replace(tzinfo=timezone.utc).isoformat() if value else None


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def as_matrix(vectors: np.ndarray, n: int) -> np.ndarray:
    matrix = np.asarray(vectors)
    if matrix.ndim != 2 or matrix.shape[0] != n:
        raise ValueError(f"vectors has shape {matrix.shape}, expected ({n}, dim): one row per item")
    return np.ascontiguousarray(matrix, dtype="<f4")


def decode_vectors(blobs: Sequence[bytes]) -> np.ndarray:
    """Stored little-endian float32 rows -> a writable float32 matrix [n, d]."""
    if not blobs:
        return np.empty((0, 0), dtype=np.float32)
    flat = np.frombuffer(b"".join(blobs), dtype="<f4")
    return flat.reshape(len(blobs), -1).astype(np.float32, copy=True)


class Repository:
    """The base of the per-noun repositories that :class:`search.storage.store.Store` combines."""

    engine: Engine
    # The same engine, beginning every transaction with BEGIN IMMEDIATE.
    _writer: Engine

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises.

        ``write=True`` takes the write lock at BEGIN; use it for any block that writes after reading.
        """
        bind = self._writer if write else self.engine
        with Session(bind, expire_on_commit=False) as session, session.begin():
            yield session

    def _id_vectors(self, stmt: Select[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], vectors float32 [n, d]) from a select of (id, vector blob) rows."""
        with self.session() as s:
            rows = s.execute(stmt).all()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return ids, decode_vectors([r[1] for r in rows])

    def _upsert_vectors(
        self, table: type[Embedding] | type[TextEmbedding], key: str, ids: list[int], vectors: np.ndarray, fp: str
    ) -> None:
        matrix = as_matrix(vectors, len(ids))
        if not ids:
            return
        stmt = upsert(self.engine.dialect.name, table, key, ["model_fingerprint", "vector"])
        with self.session(write=True) as s:
            s.execute(
                stmt,
                [
                    {key: int(i), "model_fingerprint": fp, "vector": v.tobytes()}
                    for i, v in zip(ids, matrix, strict=True)
                ],
            )
