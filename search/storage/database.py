"""Opening the database: the SQLite engine (WAL, foreign keys, explicit BEGIN) or a Postgres one, and the
Alembic migrations runner that brings either to the newest schema with the same migration scripts."""

from __future__ import annotations

import os
import sqlite3
from importlib import resources
from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, make_url

from search.core.errors import ConfigError

BUSY_TIMEOUT_MS = 30_000
BEGIN_OPTION = "histosearch_begin"
SQLITE_HEADER = b"SQLite format 3\x00"
RESTORE = "restore it from a backup (`histosearch backup` makes one), or see `histosearch doctor`"


def check_database_file(path: Path) -> None:
    """Refuse a database file that exists but cannot be a histosearch database, before SQLite opens it:
    SQLite would take a zero-byte file for a new database and silently start an empty index over it."""
    try:
        with open(path, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there yet: the data dir is made (or refused) by the caller
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the database ({exc.strerror})") from None
    if not header:
        raise ConfigError(f"{path}: the database file is empty (0 bytes): {RESTORE}")
    if header != SQLITE_HEADER:
        raise ConfigError(f"{path}: not a SQLite database (damaged?): {RESTORE}")


def is_read_only(path: Path) -> bool:
    """Whether the database at ``path`` must be opened read-only: it exists, and it or its folder (where
    SQLite keeps its WAL and shared-memory files) cannot be written."""
    return path.is_file() and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))


def read_only_url(path: Path) -> str:
    """An SQLite URL that reads ``path`` without writing anything beside it. ``immutable``: no lock and no
    WAL index are needed, which a read-only folder could not hold; nobody writes a read-only copy."""
    return f"sqlite:///file:{path}?mode=ro&immutable=1&uri=true"


def describe_error(exc: BaseException, path: Path) -> str | None:
    """One line for a database error met at a command's edge, or None when ``exc`` is not one."""
    orig = exc if isinstance(exc, sqlite3.Error) else getattr(exc, "orig", None)
    if not isinstance(orig, sqlite3.Error):
        return None
    detail = str(orig).splitlines()[0] if str(orig) else type(orig).__name__
    if "disk is full" in detail or getattr(orig, "sqlite_errorname", "") == "SQLITE_FULL":
        return f"{path}: disk full ({detail}): free some space and run the command again; an index run resumes"
    if "malformed" in detail or "not a database" in detail or "disk I/O error" in detail:
        return f"{path}: damaged database ({detail}): {RESTORE}"
    if "readonly" in detail or "unable to open" in detail:
        return f"{path}: cannot write the database ({detail}): is the data dir read-only?"
    return f"{path}: database error ({detail})"


def create_db_engine(
    db_url: str,
    *,
    foreign_keys: bool = True,
    begin: Literal["DEFERRED", "IMMEDIATE"] = "DEFERRED",
) -> Engine:
    """An engine whose SQLite connections use WAL, foreign keys and a 30 s busy timeout.

    pysqlite's own transaction handling is switched off and BEGIN is emitted here, so DDL is
    transactional and a writer can ask for ``BEGIN IMMEDIATE`` (execution option
    ``histosearch_begin``): a transaction that reads and then writes takes the write lock up front
    instead of failing with SQLITE_BUSY when another process committed in between.
    """
    if make_url(db_url).get_backend_name() == "postgresql":
        # Postgres runs each transaction in READ COMMITTED and takes row locks as it writes; BEGIN needs no help.
        # pre_ping replaces connections the server closed (restart, idle timeout) instead of failing a request.
        return create_engine(db_url, pool_pre_ping=True)
    engine = create_engine(db_url)
    if engine.dialect.name != "sqlite":
        return engine
    read_only = "mode=ro" in db_url

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL lets the web server read while the indexer writes (a read-only copy is only read).
        if not read_only:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(BEGIN_OPTION, begin)
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def alembic_config(db_url: str) -> Config:
    """An Alembic config for ``db_url`` built in code: no alembic.ini is needed on disk."""
    config = Config()
    # The migration scripts are data to this layer: found by package name, never imported from here,
    # since migrations/env.py imports this schema.
    config.set_main_option("script_location", str(resources.files("migrations")))
    # The URL goes in attributes, not the main options, which would %-interpolate it.
    config.attributes["url"] = db_url
    return config


def upgrade(db_url: str) -> None:
    """Bring the database at ``db_url`` to the newest schema (``alembic upgrade head``).

    A database already at head is only read, so opening it takes no write lock.
    """
    config = alembic_config(db_url)
    script = ScriptDirectory.from_config(config)
    engine = create_db_engine(db_url)
    try:
        with engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
    finally:
        engine.dispose()
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = current - known
    if unknown:
        raise ConfigError(
            f"{db_url}: the database schema is at revision {', '.join(sorted(unknown))}, newer than this "
            "histosearch knows; upgrade histosearch, or point HISTOSEARCH_DATA_DIR at another database"
        )
    if current != set(script.get_heads()):
        if "mode=ro" in db_url:
            raise ConfigError(
                f"{db_url}: a read-only database at an older schema: open it once where it can be written "
                "(any command) to upgrade it"
            )
        command.upgrade(config, "head")


def backup(path: Path, target: Path) -> int:
    """Copy the database at ``path`` to ``target`` with SQLite's online backup API: a consistent snapshot
    of what was committed, taken while an indexer or a server keeps using the database. Returns the
    copy's size in bytes; ``target`` must not exist (a backup never overwrites anything)."""
    check_database_file(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no database to back up")
    if target.exists():
        raise ConfigError(f"{target}: already exists; name a new file for the backup")
    partial = target.with_name(f".{target.name}.partial")
    try:
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            copy = sqlite3.connect(partial)
            try:
                source.backup(copy)
            finally:
                copy.close()
        finally:
            source.close()
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target.stat().st_size
