"""The query log: what was searched, when, under which model and build, and how many results came back.

An uploaded image is logged by its content hash only; the log never holds image bytes.
"""

from __future__ import annotations

from sqlalchemy import delete, func, select

from search.storage.repository import Repository, iso, utcnow
from search.storage.schema import QueryLogEntry

# The log keeps the newest entries; older ones are dropped every TRIM_EVERY entries.
QUERY_LOG_MAX = 100_000
TRIM_EVERY = 1000


class QueryLogRepository(Repository):
    """Append and read back query log entries."""

    def log_query(
        self,
        *,
        kind: str,
        text: str | None,
        image_hash: str | None,
        tile_id: int | None,
        filters: dict,
        options: dict,
        model_fingerprint: str | None,
        build_id: int | None,
        results: int,
        duration_ms: float,
    ) -> None:
        with self.session(write=True) as s:
            entry = QueryLogEntry(
                at=utcnow(),
                kind=kind,
                text=text,
                image_hash=image_hash,
                tile_id=tile_id,
                filters=filters,
                options=options,
                model_fingerprint=model_fingerprint,
                build_id=build_id,
                results=results,
                duration_ms=duration_ms,
            )
            s.add(entry)
            s.flush()
            if entry.id % TRIM_EVERY == 0:
                s.execute(delete(QueryLogEntry).where(QueryLogEntry.id <= entry.id - QUERY_LOG_MAX))

    def query_log(self, limit: int = 100, offset: int = 0) -> dict:
        """The newest entries first, and how many the log holds."""
        with self.session() as s:
            total = s.scalar(select(func.count()).select_from(QueryLogEntry))
            rows = s.scalars(select(QueryLogEntry).order_by(QueryLogEntry.id.desc()).limit(limit).offset(offset))
            entries = [
                {
                    "id": e.id,
                    "at": iso(e.at),
                    "kind": e.kind,
                    "text": e.text,
                    "image_hash": e.image_hash,
                    "tile_id": e.tile_id,
                    "filters": e.filters,
                    "options": e.options,
                    "model_fingerprint": e.model_fingerprint,
                    "build_id": e.build_id,
                    "results": e.results,
                    "duration_ms": e.duration_ms,
                }
                for e in rows
            ]
        return {"total": total, "entries": entries}
