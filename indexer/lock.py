"""The one-indexer-at-a-time lock on a data dir (a file lock), or on a Postgres database (an advisory lock;
search/storage/locks.py).

Taken before the indexer (torch, the model) is imported: a second indexer refused by it says so at
once instead of after seconds of imports.
"""

from __future__ import annotations

from search.core.errors import ConfigError, IndexBusy
from search.core.settings import Settings
from search.storage.locks import Busy, IndexerLock, acquire_indexer_lock


def acquire(settings: Settings, wait: bool = False) -> IndexerLock:
    """The held lock; a second indexer waits (``wait``) or stops with IndexBusy naming the running job."""
    try:
        lock = acquire_indexer_lock(settings.db_url, settings.data_dir / "indexer.lock", wait)
    except Busy:  # caught first: filelock's Timeout, which Busy replaces, is an OSError
        on = settings.data_dir if settings.database_url is None else "this database"
        raise IndexBusy(
            f"another indexer is running on {on}{_running(settings)}: wait for it to finish, "
            "or run again with --wait to queue behind it"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"data dir {settings.data_dir}: cannot write there ({exc.strerror}): indexing needs a writable data "
            "dir; set HISTOSEARCH_DATA_DIR (or --data-dir)"
        ) from None
    return lock


def _running(settings: Settings) -> str:
    from search.storage.store import Store

    store = Store.from_settings(settings)
    try:
        job = store.running_job()
    finally:
        store.close()
    return f" (job {job['id']}, pid {job['pid']}, started {job['started_at']})" if job else ""
