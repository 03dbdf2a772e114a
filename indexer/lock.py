"""The one-indexer-at-a-time lock on a data dir.

Taken before the indexer (torch, the model) is imported: a second indexer refused by it says so at
once instead of after seconds of imports.
"""

from __future__ import annotations

from filelock import FileLock, Timeout

from search.core.errors import ConfigError, IndexBusy
from search.core.settings import Settings


def acquire(settings: Settings, wait: bool = False) -> FileLock:
    """The held lock; a second indexer waits (``wait``) or stops with IndexBusy naming the running job."""
    lock = FileLock(settings.data_dir / "indexer.lock", timeout=-1 if wait else 0)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:  # a TimeoutError, so an OSError: caught first
        raise IndexBusy(
            f"another indexer is running on {settings.data_dir}{_running(settings)}: wait for it to finish, "
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

    store = Store(settings.db_url)
    try:
        job = store.running_job()
    finally:
        store.close()
    return f" (job {job['id']}, pid {job['pid']}, started {job['started_at']})" if job else ""
