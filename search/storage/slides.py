"""Slides as search objects: their tiles, and their slide vectors (one per kind) with what made them."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
from sqlalchemy import delete, func, or_, select

from search.core.errors import NotFound
from search.storage import dialect
from search.storage.index_directory import IndexDirectory
from search.storage.repository import Repository, chunks, iso, utcnow
from search.storage.schema import Case, Slide, SlideVector, Source, Tile


def tiles_digest(pairs: list[tuple[int, str]], model_fingerprint: str) -> str:
    """What a slide vector depends on: the slide's tiles (id, content hash) and the model that embedded them."""
    h = hashlib.sha256(model_fingerprint.encode())
    for tile_id, content_hash in sorted(pairs):
        h.update(f"{tile_id}:{content_hash};".encode())
    return h.hexdigest()[:32]


def _slide_dict(slide: Slide, case_key: str | None, uri: str, n_tiles: int) -> dict:
    return {
        "id": slide.id,
        "slide_key": slide.slide_key,
        "case_id": slide.case_id,
        "case_key": case_key,
        "source_uri": uri,
        "path": slide.path,
        "mpp": slide.mpp,
        "width": slide.width,
        "height": slide.height,
        "meta": slide.meta,
        "n_tiles": n_tiles,
    }


class SlideRepository(Repository):
    """Slides, their tile grids and their slide vectors."""

    def _slides(self, where) -> list[dict]:
        counts = select(Tile.slide_id, func.count().label("n")).group_by(Tile.slide_id).subquery()
        stmt = (
            select(Slide, Case.case_key, Source.uri, func.coalesce(counts.c.n, 0))
            .join(Source, Slide.source_id == Source.id)
            .outerjoin(Case, Slide.case_id == Case.id)
            .outerjoin(counts, counts.c.slide_id == Slide.id)
            .where(where)
            .order_by(Slide.id)
        )
        with self.session() as s:
            return [_slide_dict(*row) for row in s.execute(stmt)]

    def get_slide(self, slide: int | str) -> dict:
        """A slide by id or by slide key; NotFound otherwise."""
        if isinstance(slide, int) or str(slide).isdigit():
            where = or_(Slide.id == int(slide), Slide.slide_key == str(slide))
        else:
            where = Slide.slide_key == str(slide)
        found = self._slides(where)
        if not found:
            raise NotFound(f"no slide {slide!r}: `histosearch status` counts the indexed slides")
        exact = [f for f in found if f["slide_key"] == str(slide)]
        return (exact or found)[0]

    def get_slides(self, slide_ids: list[int]) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for chunk in chunks(list(dict.fromkeys(int(i) for i in slide_ids))):
            out.update((d["id"], d) for d in self._slides(Slide.id.in_(chunk)))
        return out

    def slide_tiles(self, slide_id: int) -> list[dict]:
        """The slide's tiles with their grid position (level-0 x, y), size and mpp, in id order."""
        stmt = (
            select(Tile.id, Tile.locator, Tile.x, Tile.y, Tile.width, Tile.height, Tile.size, Tile.mpp, Tile.level)
            .where(Tile.slide_id == slide_id)
            .order_by(Tile.id)
        )
        keys = ("id", "locator", "x", "y", "width", "height", "size", "mpp", "level")
        with self.session() as s:
            return [dict(zip(keys, row, strict=True)) for row in s.execute(stmt)]

    def tiles_by_slide(self) -> dict[int, list[tuple[int, str]]]:
        """Every slide's (tile id, content hash) pairs."""
        out: dict[int, list[tuple[int, str]]] = defaultdict(list)
        stmt = select(Tile.slide_id, Tile.id, Tile.content_hash).where(Tile.slide_id.is_not(None))
        with self.session() as s:
            for slide_id, tile_id, content_hash in s.execute(stmt):
                out[slide_id].append((tile_id, content_hash))
        return dict(out)

    def set_slide_vector(
        self,
        slide_id: int,
        kind: str,
        vector: np.ndarray,
        *,
        model_fingerprint: str,
        method: str,
        tiles_digest: str,
        n_tiles: int,
        attention: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        row = {
            "slide_id": int(slide_id),
            "kind": kind,
            "model_fingerprint": model_fingerprint,
            "method": method,
            "tiles_digest": tiles_digest,
            "n_tiles": int(n_tiles),
            "vector": np.ascontiguousarray(vector, dtype="<f4").tobytes(),
            "attention_tile_ids": None if attention is None else np.asarray(attention[0], "<i8").tobytes(),
            "attention": None if attention is None else np.asarray(attention[1], "<f4").tobytes(),
            "created_at": utcnow(),
        }
        stmt = dialect.insert(self.engine.dialect.name, SlideVector).values(row)
        stmt = stmt.on_conflict_do_update(index_elements=["slide_id", "kind"], set_=row)
        with self.session(write=True) as s:
            s.execute(stmt)

    def delete_slide_vectors(self, kind: str, slide_ids: list[int]) -> None:
        with self.session(write=True) as s:
            for chunk in chunks(slide_ids):
                s.execute(delete(SlideVector).where(SlideVector.kind == kind, SlideVector.slide_id.in_(chunk)))

    def slide_vector_digests(self, kind: str) -> dict[int, tuple[str, str, str]]:
        """{slide id: (tiles digest, model fingerprint, method)} of the stored vectors of ``kind``."""
        stmt = select(SlideVector.slide_id, SlideVector.tiles_digest, SlideVector.model_fingerprint,
                      SlideVector.method).where(SlideVector.kind == kind)  # fmt: skip
        with self.session() as s:
            return {r[0]: (r[1], r[2], r[3]) for r in s.execute(stmt)}

    def slide_vectors(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(slide ids int64 [n], vectors float32 [n, d]) of ``kind``, in slide id order."""
        stmt = (
            select(SlideVector.slide_id, SlideVector.vector)
            .where(SlideVector.kind == kind)
            .order_by(SlideVector.slide_id)
        )
        return self._id_vectors(stmt)

    def slide_vector_kinds(self) -> dict[str, dict]:
        """{kind: {"count", "model_fingerprint", "method", "updated_at"}} of the stored slide vectors."""
        stmt = select(
            SlideVector.kind,
            func.count(),
            func.max(SlideVector.model_fingerprint),
            func.max(SlideVector.method),
            func.max(SlideVector.created_at),
        ).group_by(SlideVector.kind)
        with self.session() as s:
            return {
                kind: {"count": n, "model_fingerprint": fp, "method": method, "updated_at": iso(at)}
                for kind, n, fp, method, at in s.execute(stmt)
            }

    def slide_attention(self, slide_ids: list[int]) -> dict[int, dict[int, float]]:
        """{slide id: {tile id: WSC attention}} for the slides that have a WSC vector."""
        out: dict[int, dict[int, float]] = {}
        with self.session() as s:
            for chunk in chunks(list(dict.fromkeys(int(i) for i in slide_ids))):
                stmt = select(SlideVector.slide_id, SlideVector.attention_tile_ids, SlideVector.attention).where(
                    SlideVector.slide_id.in_(chunk), SlideVector.attention.is_not(None)
                )
                for slide_id, ids, weights in s.execute(stmt):
                    tile_ids = np.frombuffer(ids, dtype="<i8")
                    values = np.frombuffer(weights, dtype="<f4")
                    out[slide_id] = {int(t): float(w) for t, w in zip(tile_ids, values, strict=True)}
        return out


def slide_index_directory(data_dir: Path, kind: str) -> IndexDirectory:
    """Where the exact FAISS index of one slide-vector kind lives: beside the tile index, same layout."""
    return IndexDirectory(Path(data_dir) / "index" / "slides" / kind)
