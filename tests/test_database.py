"""Opening a database, SQLite and Postgres: the same migrations from nothing and back, concurrent first opens,
connection settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from search.core.errors import ConfigError
from search.storage import database
from search.storage.database import alembic_config
from search.storage.store import Store
from tests.store_fixture import db_url

ROOT = Path(__file__).resolve().parents[1]
TABLES = {
    "eval_runs",
    "vector_segments",
    "sources",
    "cases",
    "slides",
    "slide_vectors",
    "tiles",
    "embeddings",
    "texts",
    "text_embeddings",
    "builds",
    "jobs",
    "file_errors",
    "meta",
    "query_log",
}


def test_migrations_build_schema_from_nothing_and_downgrade_to_base(database_url: str) -> None:
    url = database_url
    Store(url).close()
    engine = create_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
        head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head

        command.downgrade(alembic_config(url), "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}

        store = Store(url)
        assert store.counts()["tiles"] == 0
        store.close()
        assert set(inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
    finally:
        engine.dispose()


def test_processes_opening_a_new_database_together_all_succeed(database_url: str) -> None:
    url = database_url
    code = "import sys; from search.storage.store import Store; print(Store(sys.argv[1]).counts()['tiles'])"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert [(p.returncode, out.strip()) for p, (out, _) in zip(procs, results, strict=True)] == [(0, b"0")] * 3, [
        err.decode()[-500:] for _, err in results
    ]


def test_second_open_runs_no_migration_and_keeps_data(database_url: str, monkeypatch) -> None:
    url = database_url
    first = Store(url)
    first.set_meta("model", "abc")
    first.close()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("upgrade ran on a database already at head")

    monkeypatch.setattr(database.command, "upgrade", refuse)
    second = Store(url)
    assert second.get_meta("model") == "abc"
    second.close()


def test_database_newer_than_the_code_is_refused(database_url: str) -> None:
    url = database_url
    Store(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff_future'"))
    engine.dispose()
    with pytest.raises(ConfigError, match="ffff_future.*newer"):
        Store(url)


def test_sqlite_connections_use_wal_foreign_keys_and_busy_timeout(tmp_path: Path) -> None:
    db = Store(db_url(tmp_path / "h.db"))
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    db.close()
