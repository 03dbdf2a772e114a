"""A data dir under damage: the live index, the database, a full disk, unwritable folders; doctor and backup."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest
from sqlalchemy import event

import search.storage.store as store_module
from indexer.indexer import Indexer
from search.cli import main
from search.core.errors import ConfigError, IndexUnavailable
from search.engine.engine import Engine
from search.storage.index_directory import IndexDirectory
from search.storage.segmented import SegmentedIndex
from search.storage.store import Store
from tests.archives import make_tiles


@pytest.fixture
def cli(tiny_settings, tiny_model_args, monkeypatch):
    monkeypatch.setenv("HISTOSEARCH_DATA_DIR", str(tiny_settings.data_dir))
    monkeypatch.setenv("HISTOSEARCH_CACHE_DIR", str(tiny_settings.cache_dir))
    monkeypatch.setenv("HISTOSEARCH_TILE_SIZE", "64")

    def run(*args: str, model: bool = True) -> int:
        return main([*args, *(tiny_model_args if model else [])])

    return run


@pytest.fixture
def indexed(tiny_settings, tiny_encoder, tmp_path):
    make_tiles(tmp_path / "tiles", 6)
    indexer = Indexer(tiny_settings, encoder=tiny_encoder)
    report = indexer.run([tmp_path / "tiles"])
    indexer.store.close()
    return report.build


def _live_file(settings) -> os.PathLike:
    directory = IndexDirectory(settings.data_dir / "index")
    # A build of index segments: its first part, the file holding the vectors.
    build_id = directory.live_build_id()
    return directory.build_dir(build_id) / SegmentedIndex.load(directory.build_dir(build_id)).manifest.parts[0]


def _damage(settings, how: str) -> None:
    directory = IndexDirectory(settings.data_dir / "index")
    if how == "truncated":
        path = _live_file(settings)
        path.write_bytes(path.read_bytes()[:100])
    elif how == "deleted":
        _live_file(settings).unlink()
    else:
        directory.pointer.write_text("garbage\n")


@pytest.mark.parametrize("how", ["truncated", "deleted", "garbage pointer"])
def test_a_damaged_live_index_is_found_and_rebuilt_from_the_stored_vectors(
    tiny_settings, tiny_encoder, indexed, monkeypatch, how
):
    assert len(indexed["checksum"]) == 64
    _damage(tiny_settings, how)
    engine = Engine(tiny_settings, encoder=tiny_encoder)
    try:
        assert engine.status()["index_problem"] is not None
        with pytest.raises(IndexUnavailable, match="doctor --repair|missing"):
            engine.search_text("glands", k=3)
    finally:
        engine.close()

    def no_embedding(*args, **kwargs):
        raise AssertionError("a damaged index is rebuilt from the stored vectors, not re-embedded")

    monkeypatch.setattr(tiny_encoder, "encode_uint8", no_embedding)
    report = Indexer(tiny_settings, encoder=tiny_encoder).run(kind="reindex")
    assert report.damage and "nothing re-embedded" in report.summary()
    assert report.build["id"] > indexed["id"] and report.build["count"] == 6
    engine = Engine(tiny_settings, encoder=tiny_encoder)
    try:
        assert engine.status()["index_problem"] is None
        assert engine.search_text("glands", k=3)["total"] == 6
    finally:
        engine.close()


def test_doctor_checks_everything_and_repairs_what_can_be_rebuilt(cli, tiny_settings, indexed, capsys):
    assert cli("doctor", model=False) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["ok      database", "ok      index", "ok      files", "ok      jobs"]
    _damage(tiny_settings, "truncated")
    stray = tiny_settings.data_dir / "index" / "builds" / "999"
    stray.mkdir()
    (stray / "index.faiss").write_bytes(b"left over")
    (tiny_settings.data_dir / "index" / "LIVE.tmp-1-2").write_text("3")
    assert cli("doctor", model=False) == 1
    out = capsys.readouterr().out
    assert "PROBLEM index: " in out and "does not match its recorded checksum" in out
    assert "PROBLEM files: orphaned: " in out and "builds/999" in out and "doctor --repair" in out
    assert cli("doctor", "--repair", model=False) == 0
    out = capsys.readouterr().out
    assert "fixed   index: " in out and "rebuilt from the 6 stored vectors" in out
    assert "fixed   files: " in out and not stray.exists()
    assert cli("doctor", model=False) == 0
    assert cli("query", "glands", "-k", "2") == 0


def test_status_says_the_index_is_damaged(cli, tiny_settings, indexed, capsys):
    _damage(tiny_settings, "truncated")
    assert cli("status") == 0
    assert "index: DAMAGED: " in capsys.readouterr().out
    assert cli("query", "glands") == 2
    err = capsys.readouterr().err
    assert "doctor --repair" in err and len(err.strip().splitlines()) == 1


def test_an_empty_database_file_is_refused_never_replaced(cli, tiny_settings, capsys):
    tiny_settings.data_dir.mkdir(parents=True)
    tiny_settings.db_path.write_bytes(b"")
    assert cli("status") == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"histosearch: error: {tiny_settings.db_path}: the database file is empty (0 bytes): restore it from a "
        "backup (`histosearch backup` makes one), or see `histosearch doctor`"
    )
    assert tiny_settings.db_path.stat().st_size == 0
    with pytest.raises(ConfigError, match="empty"):
        Store(tiny_settings.db_url)


def test_a_damaged_database_is_one_line_naming_it(cli, tiny_settings, indexed, capsys):
    data = bytearray(tiny_settings.db_path.read_bytes())
    page = 4096
    data[page : len(data)] = os.urandom(len(data) - page)  # every page but the header's overwritten
    tiny_settings.db_path.write_bytes(bytes(data))
    for wal in tiny_settings.data_dir.glob("histosearch.db-*"):
        wal.unlink()
    assert cli("status") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tiny_settings.db_path) in err and "backup" in err
    assert cli("doctor", model=False) == 1
    assert "PROBLEM database: " in capsys.readouterr().out


def test_backup_is_a_consistent_copy_taken_while_a_writer_holds_a_transaction(cli, tiny_settings, indexed, capsys):
    writer = sqlite3.connect(tiny_settings.db_path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO meta (key, value) VALUES ('uncommitted', 'x')")
    target = tiny_settings.data_dir.parent / "backup.db"
    try:
        assert cli("backup", str(target), model=False) == 0
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert "backed up" in capsys.readouterr().out
    with sqlite3.connect(target) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert copy.execute("select count(*) from tiles").fetchone()[0] == 6
        assert copy.execute("select count(*) from meta where key = 'uncommitted'").fetchone()[0] == 0
    assert cli("backup", str(target), model=False) == 2
    assert "already exists" in capsys.readouterr().err
    # Restored into a fresh data dir, the backup is a working index once doctor rebuilds its FAISS file.
    restored = tiny_settings.data_dir.parent / "restored"
    restored.mkdir()
    target.rename(restored / "histosearch.db")
    target.with_name("backup.db.vectors").rename(restored / "vectors")
    assert main(["--data-dir", str(restored), "doctor", "--repair"]) == 0
    assert "rebuilt from the 6 stored vectors" in capsys.readouterr().out


def test_a_data_dir_that_cannot_be_created_is_one_line(cli, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    assert main(["--data-dir", str(tmp_path / "a-file" / "data"), "status"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"histosearch: error: data dir {tmp_path / 'a-file' / 'data'}: cannot create it")
    assert len(err.splitlines()) == 1
    assert main(["--data-dir", str(tmp_path / "a-file" / "data"), "index", str(tmp_path), "--quiet"]) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_a_read_only_data_dir_still_answers_status_and_query(cli, tiny_settings, indexed, monkeypatch, capsys):
    data = tiny_settings.data_dir
    for path in [*data.rglob("*"), data]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    if os.geteuid() == 0:
        # root writes through any mode: answer as the permission bits do for everyone else.
        monkeypatch.setattr(
            "search.storage.database.os.access",
            lambda path, mode: not (mode & os.W_OK and os.stat(path).st_mode & stat.S_IWUSR == 0),
        )
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    try:
        assert Store(tiny_settings.db_url).read_only
        assert cli("status") == 0
        assert "tiles: 6 in 1 sources" in capsys.readouterr().out
        assert cli("query", "glands", "-k", "2") == 0
        hits = [line for line in capsys.readouterr().out.splitlines() if line.lstrip()[:1].isdigit()]
        assert len(hits) == 2  # besides each hit's terms and the calibration verdict
        assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before
    finally:
        for path in [data, *data.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_disk_full_fails_the_job_with_the_reason_in_one_line(cli, tiny_settings, tmp_path, monkeypatch, capsys):
    make_tiles(tmp_path / "few", 2)
    assert cli("index", str(tmp_path / "few"), "--quiet", "--workers", "0") == 0
    capsys.readouterr()
    pages = sqlite3.connect(tiny_settings.db_path).execute("PRAGMA page_count").fetchone()[0]
    real = store_module.create_db_engine

    def full_disk(url, **kwargs):
        # SQLite's own "database or disk is full", a few pages past the database's size.
        engine = real(url, **kwargs)
        event.listen(engine, "connect", lambda conn, _: conn.execute(f"PRAGMA max_page_count={pages + 2}"))
        return engine

    monkeypatch.setattr(store_module, "create_db_engine", full_disk)
    make_tiles(tmp_path / "many", 60, seed=5)
    assert cli("index", str(tmp_path / "many"), "--quiet", "--workers", "0") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tiny_settings.db_path}: disk full" in err
    monkeypatch.setattr(store_module, "create_db_engine", real)
    job = Store(tiny_settings.db_url).last_job()
    assert job["status"] == "failed" and job["message"].startswith(f"{tiny_settings.db_path}: disk full")
    # Space freed: the same command resumes and completes.
    assert cli("index", str(tmp_path / "many"), "--quiet", "--workers", "0") == 0


def test_the_status_page_says_the_index_is_damaged(tiny_settings, tiny_encoder, indexed):
    from fastapi.testclient import TestClient

    from webui.app import create_app

    _damage(tiny_settings, "garbage pointer")
    app = create_app(tiny_settings, Engine(tiny_settings, encoder=tiny_encoder))
    with TestClient(app) as client:
        page = client.get("/status")
        assert page.status_code == 200 and "damaged:" in page.text and "doctor --repair" in page.text
        assert "damaged pointer" in client.get("/api/status").json()["index_problem"]
