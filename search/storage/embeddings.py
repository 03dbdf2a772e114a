"""Tile embeddings: the stored vectors, float16 rows appended to a model's segment files with one
``embeddings`` row each, read back by tile id, in id order for a build, or at the locations a build
recorded (docs/index-format.md)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
from sqlalchemy import bindparam, delete, insert, select
from sqlalchemy.orm import Session

from search.core.errors import NotFound
from search.storage.repository import Repository, as_matrix, chunks, decode_vectors, utcnow
from search.storage.schema import Embedding, VectorSegment
from search.storage.segments import SEGMENT_ROWS, VectorSegments

_EMBEDDING_ROWS = select(Embedding.tile_id, Embedding.segment_id, Embedding.position, Embedding.vector).where(
    Embedding.tile_id.in_(bindparam("ids", expanding=True)), Embedding.model_fingerprint == bindparam("fp")
)


class EmbeddingRepository(Repository):
    """The tiles' vectors under each model, in segment files named by their ``embeddings`` rows."""

    # The files that hold the tile vectors.
    segments: VectorSegments
    # Segment id -> its dimension.
    _segment_dim: dict[int, int]

    def _insert_vectors(self, s: Session, ids: list[int], matrix: np.ndarray, model_fingerprint: str) -> None:
        """Append the vectors to the model's open segment and insert their embedding rows, in the
        caller's write transaction (whose lock keeps other writers off the segment until it commits)."""
        dim = matrix.shape[1]
        segment = s.scalars(
            select(VectorSegment)
            .where(
                VectorSegment.model_fingerprint == model_fingerprint,
                VectorSegment.dim == dim,
                VectorSegment.rows < SEGMENT_ROWS,
            )
            .order_by(VectorSegment.id.desc())
            .limit(1)
            .with_for_update()
        ).first()
        if segment is None:
            segment = VectorSegment(model_fingerprint=model_fingerprint, dim=dim, rows=0, created_at=utcnow())
            s.add(segment)
            s.flush()
        start = self.segments.append(segment.id, segment.rows, matrix)
        s.execute(
            insert(Embedding),
            [
                {"tile_id": tile_id, "model_fingerprint": model_fingerprint, "segment_id": segment.id, "position": p}
                for tile_id, p in zip(ids, range(start, start + len(ids)), strict=True)
            ],
        )
        segment.rows = start + len(ids)
        s.flush()

    def set_embeddings(self, tile_ids: list[int], vectors: np.ndarray, model_fingerprint: str) -> None:
        """Store (or overwrite) the embeddings of existing tiles, e.g. after a model change."""
        matrix = as_matrix(vectors, len(tile_ids))
        if not tile_ids:
            return
        ids = [int(i) for i in tile_ids]
        with self.session(write=True) as s:
            for chunk in chunks(ids):
                s.execute(delete(Embedding).where(Embedding.tile_id.in_(chunk)))
            self._insert_vectors(s, ids, matrix, model_fingerprint)

    def remove_unreferenced_segments(self) -> int:
        """Delete segment files no database row names (a write that crashed before its commit); returns how
        many. Runs under the database write lock, so no writer is between its append and its commit."""
        with self.session(write=True) as s:
            known = set(s.scalars(select(VectorSegment.id)))
            return len(self.segments.remove_unknown(known))

    def embedded_ids(self, model_fingerprint: str) -> np.ndarray:
        """Sorted int64 ids of the tiles with a vector under the model."""
        stmt = select(Embedding.tile_id).where(Embedding.model_fingerprint == model_fingerprint)
        sql = stmt.order_by(Embedding.tile_id).compile(self.engine, compile_kwargs={"literal_binds": True})
        # Every publish reads them all: at 10M tiles ORM rows took 18 s, Core rows 9 s; the driver's own
        # cursor, a million rows at a time, leaves only the database's work.
        with self.engine.connect() as conn:
            cursor = conn.connection.dbapi_connection.cursor()
            try:
                cursor.execute(str(sql))
                chunks = []
                while rows := cursor.fetchmany(1 << 20):
                    chunks.append(np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=len(rows)))
            finally:
                cursor.close()
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)

    def _vectors_of(self, rows: list[tuple[int, int | None, int | None, bytes | None]]) -> np.ndarray:
        """float32 [n, d] for (tile_id, segment_id, position, blob) rows, in row order."""
        return self._vectors_at(rows, _locations(rows))

    def _vectors_at(self, rows: list[tuple], locations: np.ndarray) -> np.ndarray:
        if not rows:
            return np.empty((0, 0), dtype=np.float32)
        in_files = np.flatnonzero(locations >= 0)
        if len(in_files) == len(rows):
            return self.read_located(locations)
        # A database from before revision 0006: vectors still in float32 blobs.
        legacy = np.flatnonzero(locations < 0)
        blobs = decode_vectors([rows[n][3] for n in legacy])
        if not len(in_files):
            return blobs
        out = np.empty((len(rows), blobs.shape[1]), dtype=np.float32)
        out[legacy] = blobs
        out[in_files] = self.read_located(locations[in_files])
        return out

    def _segment_dims(self, segment_ids: list[int]) -> dict[int, int]:
        # A segment's dimension never changes: read once per process.
        unknown = [i for i in segment_ids if i not in self._segment_dim]
        if unknown:
            with self.session() as s:
                stmt = select(VectorSegment.id, VectorSegment.dim).where(VectorSegment.id.in_(unknown))
                self._segment_dim.update((i, d) for i, d in s.execute(stmt))
        return {i: self._segment_dim[i] for i in segment_ids}

    def iter_embeddings(self, model_fingerprint: str, batch: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64 [n], vectors float32 [n, d]) in id order, one short transaction per batch."""
        last = -1
        while True:
            stmt = (
                select(Embedding.tile_id, Embedding.segment_id, Embedding.position, Embedding.vector)
                .where(Embedding.model_fingerprint == model_fingerprint, Embedding.tile_id > last)
                .order_by(Embedding.tile_id)
                .limit(batch)
            )
            with self.session() as s:
                rows = [tuple(r) for r in s.execute(stmt)]
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            yield ids, self._vectors_of(rows)
            last = int(ids[-1])

    def _embedding_rows(self, tile_ids: list[int], model_fingerprint: str) -> dict[int, tuple]:
        # On the query path (every re-rank): a Core statement built once, no ORM rows.
        found: dict[int, tuple] = {}
        with self.engine.connect() as conn:
            for chunk in chunks(list(dict.fromkeys(tile_ids))):
                rows = conn.execute(_EMBEDDING_ROWS, {"ids": list(chunk), "fp": model_fingerprint})
                found.update((r[0], tuple(r)) for r in rows)
        return found

    def get_embeddings(self, tile_ids: list[int], model_fingerprint: str) -> np.ndarray:
        """Vectors [n, d] in the order of ``tile_ids``; NotFound names the tiles that have none."""
        tile_ids = [int(i) for i in tile_ids]
        found = self._embedding_rows(tile_ids, model_fingerprint)
        missing = [i for i in tile_ids if i not in found]
        if missing:
            shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise NotFound(
                f"no embedding under model {model_fingerprint} for tile(s) {shown}; "
                "run `histosearch index` to (re-)embed them"
            )
        return self._vectors_of([found[i] for i in tile_ids])

    def locate_embeddings(self, tile_ids: list[int], model_fingerprint: str) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [n, d], locations int64 [n]) of ``tile_ids``, which must all have one (as
        :meth:`get_embeddings`). A location is ``segment id << 32 | row`` in the vector files, -1 for a vector
        still in a row blob (a database from before revision 0006); :meth:`read_located` reads it back."""
        tile_ids = [int(i) for i in tile_ids]
        found = self._embedding_rows(tile_ids, model_fingerprint)
        rows = [found[i] for i in tile_ids if i in found]
        if len(rows) != len(tile_ids):
            self.get_embeddings(tile_ids, model_fingerprint)  # raises NotFound naming the missing ones
        locations = _locations(rows)
        return self._vectors_at(rows, locations), locations

    def read_located(self, locations: np.ndarray, dtype: type = np.float32) -> np.ndarray:
        """``dtype`` [n, d] vectors (float32, or float16 as stored) at ``locations`` (all >= 0) from
        :meth:`locate_embeddings`, in their order, with no database read: segments are append-only, so a
        location stays valid."""
        locations = np.asarray(locations, dtype=np.int64)
        segment_of, position = locations >> 32, locations & 0xFFFFFFFF
        segment_ids = np.unique(segment_of)
        dims = self._segment_dims([int(i) for i in segment_ids])
        if len(segment_ids) == 1:
            return self.segments.read(int(segment_ids[0]), dims[int(segment_ids[0])], position, dtype)
        out = np.empty((len(locations), next(iter(dims.values())) if dims else 0), dtype=dtype)
        for segment_id in segment_ids:
            members = np.flatnonzero(segment_of == segment_id)
            out[members] = self.segments.read(int(segment_id), dims[int(segment_id)], position[members], dtype)
        return out

    def find_embeddings(self, tile_ids: list[int], model_fingerprint: str) -> tuple[list[int], np.ndarray]:
        """(ids, vectors [n, d]) of those ``tile_ids`` that have a vector under the model, in their order."""
        tile_ids = [int(i) for i in tile_ids]
        found = self._embedding_rows(tile_ids, model_fingerprint)
        ids = [i for i in tile_ids if i in found]
        return ids, self._vectors_of([found[i] for i in ids])


def _locations(rows: list[tuple]) -> np.ndarray:
    """``segment id << 32 | row`` of (tile_id, segment_id, position, blob) rows; -1 for a vector in a blob."""
    return np.fromiter(((r[1] << 32 | r[2]) if r[1] is not None else -1 for r in rows), dtype=np.int64, count=len(rows))
