"""Alembic environment for the histosearch database.

The URL comes from ``config.attributes["url"]`` (set by ``search.storage.database.alembic_config``), else the
``sqlalchemy.url`` option, else the configured data directory (``load_settings().db_url``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from search.core.settings import load_settings
from search.storage.database import create_db_engine
from search.storage.schema import Base

config = context.config
# Any constant: advisory locks are per database.
MIGRATION_LOCK_KEY = 0x68697374_6D696772  # "histmigr"


def _url() -> str:
    return config.attributes.get("url") or config.get_main_option("sqlalchemy.url") or load_settings().db_url


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=Base.metadata,
        literal_binds=True,
        render_as_batch=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # Foreign keys stay off while migrating: batch mode copies a table and drops the old one, and
    # that DROP with foreign keys on would cascade-delete every embedding of the tiles it moves.
    # BEGIN IMMEDIATE (SQLite) or a transaction-level advisory lock (Postgres) makes two processes that open
    # a new database migrate one after the other; the second then finds the schema at head.
    engine = create_db_engine(_url(), foreign_keys=False, begin="IMMEDIATE")
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=True,
                compare_type=True,
                # BEGIN is ours (see create_db_engine), so SQLite DDL is transactional: the whole
                # upgrade, version stamp included, commits or rolls back as one.
                transactional_ddl=True,
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                context.run_migrations()
                if connection.dialect.name == "sqlite":
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration left rows with dangling foreign keys: {broken[:10]}")
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
