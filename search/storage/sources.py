"""Sources (archives and folders), cases and slides."""

from __future__ import annotations

from sqlalchemy import delete, func, select, update

from search.storage.repository import Repository, iso, utcnow
from search.storage.schema import Case, MetaItem, Slide, Source, Tile


class SourceRepository(Repository):
    """Sources, cases and slides."""

    def get_or_create_source(self, kind: str, uri: str) -> int:
        with self.session(write=True) as s:
            source = s.scalars(select(Source).where(Source.uri == uri)).one_or_none()
            if source is None:
                source = Source(kind=kind, uri=uri, added_at=utcnow())
                s.add(source)
                s.flush()
            elif source.kind != kind:
                source.kind = kind
            return source.id

    def mark_scanned(self, source_id: int) -> None:
        """Record that a scan of the source finished now."""
        with self.session(write=True) as s:
            s.execute(update(Source).where(Source.id == source_id).values(last_scanned_at=utcnow()))

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
                    "added_at": iso(src.added_at),
                    "last_scanned_at": iso(src.last_scanned_at),
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
