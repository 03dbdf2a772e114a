"""Tiles: writes in one transaction with their vectors (``embeddings.py``), reads by id, filters,
grid neighbours and the UI's facet values."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import Select, bindparam, delete, func, insert, select, true, update
from sqlalchemy.orm import Session

from search.core.errors import BadQuery, NotFound
from search.storage.dialect import json_is_scalar, json_pairs, json_text
from search.storage.embeddings import EmbeddingRepository
from search.storage.repository import as_matrix, chunks, iso, utcnow
from search.storage.schema import Case, Embedding, Slide, Source, Tile


class TileState(NamedTuple):
    """What the indexer needs to decide whether a tile is new, moved, changed or needs re-embedding."""

    id: int
    fingerprint: str
    content_hash: str
    model_fingerprint: str | None


TILE_COLUMNS = frozenset(c.name for c in Tile.__table__.columns) - {"id"}


# get_tiles' statement in Core, its ids an expanding parameter: built and compiled once, rows read as
# tuples. The ORM form (Tile objects) cost more than the query at a page of 24 results.
_TILE_FIELDS = tuple(c.name for c in Tile.__table__.columns)
_GET_TILES = (
    select(*Tile.__table__.columns, Source.kind, Source.uri, Slide.slide_key, Case.case_key)
    .join(Source, Tile.source_id == Source.id)
    .outerjoin(Slide, Tile.slide_id == Slide.id)
    .outerjoin(Case, Slide.case_id == Case.id)
    .where(Tile.id.in_(bindparam("ids", expanding=True)))
)


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
        "created_at": iso(tile.created_at),
    }


def _tile_row(row: dict) -> dict:
    unknown = set(row) - TILE_COLUMNS
    if unknown:
        raise ValueError(f"tile row has unknown keys {sorted(unknown)}; allowed: {sorted(TILE_COLUMNS)}")
    full = dict.fromkeys(TILE_COLUMNS)
    full.update(row)
    full["meta"] = full["meta"] or {}
    full["created_at"] = full["created_at"] or utcnow()
    return full


class TileRepository(EmbeddingRepository):
    """Tiles, written with their embeddings and read back with their source, slide and case."""

    def tile_states(self, source_id: int) -> dict[str, TileState]:
        stmt = (
            select(Tile.locator, Tile.id, Tile.fingerprint, Tile.content_hash, Embedding.model_fingerprint)
            .outerjoin(Embedding, Embedding.tile_id == Tile.id)
            .where(Tile.source_id == source_id)
        )
        with self.session() as s:
            return {locator: TileState(*rest) for locator, *rest in s.execute(stmt)}

    def _insert_tiles(self, s: Session, rows: list[dict], vectors: np.ndarray, model_fingerprint: str) -> list[int]:
        matrix = as_matrix(vectors, len(rows))
        if not rows:
            return []
        full = [_tile_row(row) for row in rows]
        ids = list(s.scalars(insert(Tile).returning(Tile.id, sort_by_parameter_order=True), full))
        self._insert_vectors(s, ids, matrix, model_fingerprint)
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
            for chunk in chunks(old_ids):
                s.execute(delete(Tile).where(Tile.id.in_(chunk)))
            return self._insert_tiles(s, rows, vectors, model_fingerprint)

    def update_fingerprints(self, pairs: list[tuple[int, str]]) -> None:
        """The cheap change detector moved but the content hash did not: keep the tile and its id."""
        if not pairs:
            return
        with self.session(write=True) as s:
            s.execute(update(Tile), [{"id": tile_id, "fingerprint": fp} for tile_id, fp in pairs])

    def delete_tiles(self, tile_ids: list[int]) -> None:
        with self.session(write=True) as s:
            for chunk in chunks(tile_ids):
                s.execute(delete(Tile).where(Tile.id.in_(chunk)))

    def get_tiles(self, tile_ids: list[int]) -> list[dict]:
        """Tiles in the order of ``tile_ids`` with their source, slide and case; missing ids are skipped."""
        found: dict[int, dict] = {}
        width = len(_TILE_FIELDS)
        with self.engine.connect() as conn:
            for chunk in chunks(list(dict.fromkeys(int(i) for i in tile_ids))):
                for row in conn.execute(_GET_TILES, {"ids": list(chunk)}):
                    tile = SimpleNamespace(**dict(zip(_TILE_FIELDS, row[:width], strict=True)))
                    found[tile.id] = _tile_dict(tile, *row[width:])
        return [found[i] for i in (int(i) for i in tile_ids) if i in found]

    def tile_ids_by_content_hash(self, hashes: list[str]) -> dict[str, int]:
        """The lowest tile id holding each content hash (an image indexed twice has two tiles); absent
        hashes are left out."""
        found: dict[str, int] = {}
        with self.session() as s:
            for chunk in chunks(hashes):
                stmt = select(Tile.content_hash, func.min(Tile.id)).where(Tile.content_hash.in_(chunk))
                found.update((h, i) for h, i in s.execute(stmt.group_by(Tile.content_hash)))
        return found

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
        dialect = self.engine.dialect.name
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
            pairs = json_pairs(dialect, Tile.meta)
            stmt = stmt.where(select(1).where(pairs.c.key == key, json_text(dialect, pairs) == str(value)).exists())
        with self.engine.connect() as conn:
            return np.fromiter(conn.execute(stmt).scalars(), dtype=np.int64)

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

    def facet_values(self, limit: int = 200, max_keys: int = 50) -> dict:
        """Filter values with their tile counts, most tiles first: at most ``limit`` per field.

        ``{"sources": facet, "cases": facet, "slides": facet, "meta": {key: facet}}`` where a facet is
        ``{"values": [{"value", "count"}], "distinct": n}`` (``distinct`` > len(values) when cut); a
        source value is its id, with its uri as ``label``. At most ``max_keys`` meta keys, those on the
        most tiles. The meta part reads every tile, so callers should cache it.
        """
        with self.session() as s:
            keys = list(s.scalars(self._meta_keys(self.engine.dialect.name).limit(max_keys)))
            return {
                "sources": self._facet(s, "source", "", limit),
                "cases": self._facet(s, "case", "", limit),
                "slides": self._facet(s, "slide", "", limit),
                "meta": {key: self._facet(s, f"meta.{key}", "", limit) for key in sorted(keys)},
            }

    def facet(self, field: str, prefix: str = "", limit: int = 200) -> dict:
        """One field's values containing ``prefix`` (case-insensitive), with tile counts: the typeahead.

        ``field`` is ``source``, ``case``, ``slide`` or ``meta.<key>``; the answer is a facet as in
        :meth:`facet_values`.
        """
        if field not in ("source", "case", "slide") and not (field.startswith("meta.") and len(field) > 5):
            raise BadQuery(f"no filter field {field!r}: use source, case, slide or meta.<column>")
        with self.session() as s:
            return self._facet(s, field, prefix, limit)

    @staticmethod
    def _meta_keys(dialect: str) -> Select[Any]:
        je = json_pairs(dialect, Tile.meta)
        return (
            select(je.c.key)
            .select_from(Tile)
            .join(je, true())
            .where(json_is_scalar(dialect, je))
            .group_by(je.c.key)
            .order_by(func.count().desc(), je.c.key)
        )

    @staticmethod
    def _facet(s: Session, field: str, prefix: str, limit: int) -> dict:
        count = func.count(Tile.id).label("count")
        if field == "source":
            value, label = Source.id, Source.uri
            stmt = select(value, label, count).join(Tile, Tile.source_id == Source.id).group_by(Source.id)
            needle = Source.uri
        elif field in ("case", "slide"):
            value = Case.case_key if field == "case" else Slide.slide_key
            stmt = select(value, value, count).select_from(Tile).join(Slide, Tile.slide_id == Slide.id)
            if field == "case":
                stmt = stmt.join(Case, Slide.case_id == Case.id)
            stmt = stmt.group_by(value)
            needle = value
        else:
            dialect = s.get_bind().dialect.name
            je = json_pairs(dialect, Tile.meta)
            value = json_text(dialect, je)
            stmt = (
                select(value, value, count)
                .select_from(Tile)
                .join(je, true())
                .where(je.c.key == field[5:], json_is_scalar(dialect, je))
                .group_by(value)
            )
            needle = value
        if prefix:
            stmt = stmt.where(func.lower(needle).contains(prefix.lower(), autoescape=True))
        distinct = s.scalar(select(func.count()).select_from(stmt.subquery())) or 0
        rows = s.execute(stmt.order_by(count.desc(), needle).limit(limit))
        values = []
        for v, shown, n in rows:
            item = {"value": str(v), "count": n}
            if field == "source":
                item["label"] = shown
            values.append(item)
        return {"values": values, "distinct": distinct}
