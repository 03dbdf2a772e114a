"""The query log an admin reads: what was searched, never an uploaded image's bytes (only its hash).

Turned off by the setting ``query_log``. Entries are written by one background thread, so a query never
waits for the database write (a SQLite commit costs milliseconds); a failed write never fails a query.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from search.core.settings import Settings
from search.storage.store import Store

from .filters import Filters
from .options import SearchOptions
from .query import Query

log = logging.getLogger(__name__)


class QueryLog:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._pending: queue.Queue[dict] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()

    def record(
        self, query: Query, filters: Filters | None, options: SearchOptions, results: int, started: float
    ) -> None:
        # A read-only data dir still answers queries (Store.read_only); it just cannot log them.
        if not self.settings.query_log or getattr(self.store, "read_only", False):
            return
        names = query.names
        self._pending.put(
            {
                "kind": "text" if "text" in names else "image" if "image" in names else "tile",
                "text": names.get("text"),
                "image_hash": names.get("image"),
                "tile_id": names.get("tile_id"),
                "filters": (filters or Filters()).to_dict(),
                "options": options.to_dict(),
                "model_fingerprint": query.build["model_fingerprint"],
                "build_id": query.build["id"],
                "results": results,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            }
        )
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, name="query-log", daemon=True)
                self._writer.start()

    def flush(self) -> None:
        """Wait until every recorded query is in the database (before reading the log back)."""
        self._pending.join()

    def _write(self) -> None:
        while True:
            entry = self._pending.get()
            try:
                self.store.log_query(**entry)
            except Exception:  # a full disk or a locked database must not fail the searches
                log.exception("could not write the query log")
            finally:
                self._pending.task_done()
