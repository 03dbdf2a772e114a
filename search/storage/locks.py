"""The one-indexer-at-a-time lock, and who holds it.

On SQLite it is a file lock in the data directory (the database is a local file). On Postgres, where
indexers on several machines share one database, it is a session-level advisory lock held on a connection
of its own: the server releases it when that connection ends, so a killed or lost indexer never leaves it
behind, and :func:`postgres_holders` tells a live indexer from a dead one by asking the server rather than
by a pid that means nothing on another machine.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Protocol

from filelock import FileLock, Timeout
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.pool import NullPool

from search.storage.dialect import POSTGRES

# The advisory lock key (one per database; advisory locks are scoped to the database they are taken in).
INDEXER_LOCK_KEY = 0x68697374_6F736561  # "histosea"
# Each lock connection names its process, so that jobs can be matched to the lock holder that runs them.
APPLICATION_PREFIX = "histosearch-indexer"


class Busy(Exception):
    """The lock is held by another indexer."""


class IndexerLock(Protocol):
    """A held lock. ``acquire`` enters it once more (the holder passes it on); each ``release`` leaves once,
    and the last lets go."""

    def acquire(self) -> None: ...

    def release(self) -> None: ...


def application_name() -> str:
    # Postgres keeps 63 bytes of it; the pid comes last so it survives.
    return f"{APPLICATION_PREFIX} {socket.gethostname()[:32]} {os.getpid()}"


class _FileLock:
    def __init__(self, path: Path, wait: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(path, timeout=-1 if wait else 0)
        try:
            self._lock.acquire()
        except Timeout:
            raise Busy(str(path)) from None

    def acquire(self) -> None:
        self._lock.acquire()  # held already: only counts

    def release(self) -> None:
        self._lock.release()


class _AdvisoryLock:
    def __init__(self, db_url: str, wait: bool) -> None:
        # A connection of its own, outside the pool and in autocommit, so no transaction stays open while it is held.
        self._engine = create_engine(db_url, poolclass=NullPool, connect_args={"application_name": application_name()})
        self._connection: Connection | None = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        sql = "SELECT pg_advisory_lock(:key), true" if wait else "SELECT null, pg_try_advisory_lock(:key)"
        taken = self._connection.execute(text(sql), {"key": INDEXER_LOCK_KEY}).one()[1]
        self._entered = 1
        if not taken:
            self.release()
            raise Busy(db_url)

    def acquire(self) -> None:
        self._entered += 1

    def release(self) -> None:
        self._entered -= 1
        if self._entered <= 0 and self._connection is not None:
            # Closing the connection ends the session, which releases its advisory locks.
            self._connection.close()
            self._connection = None
            self._engine.dispose()


def acquire_indexer_lock(db_url: str, lock_file: Path, wait: bool = False) -> IndexerLock:
    """Take the indexer lock for the database at ``db_url``: an advisory lock on Postgres, else ``lock_file``.

    ``wait`` blocks until the holder lets go; otherwise a held lock raises :class:`Busy`.
    """
    if db_url.startswith(POSTGRES):
        return _AdvisoryLock(db_url, wait)
    return _FileLock(lock_file, wait)


def postgres_holders(connection: Connection) -> set[int]:
    """The pids of the indexer processes holding the lock on this Postgres database (any host)."""
    names = connection.execute(
        text(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND ((l.classid::bigint << 32) | l.objid::bigint) = :key"
        ),
        {"key": INDEXER_LOCK_KEY},
    ).scalars()
    parts = [(name or "").split(" ") for name in names]
    return {int(p[-1]) for p in parts if p[0] == APPLICATION_PREFIX and p[-1].isdigit()}
