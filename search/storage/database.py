"""Opening the database: the SQLite engine (WAL, foreign keys, explicit BEGIN) and the Alembic
migrations runner that brings a database to the newest schema."""

from __future__ import annotations

import sqlite3
from importlib import resources
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event

from search.core.errors import ConfigError

BUSY_TIMEOUT_MS = 30_000
BEGIN_OPTION = "histosearch_begin"


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
    engine = create_engine(db_url)
    if engine.dialect.name != "sqlite":
        return engine

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL lets the web server read while the indexer writes.
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
        command.upgrade(config, "head")
