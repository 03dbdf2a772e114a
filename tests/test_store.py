"""The store as a whole on real SQLite files and a real Postgres server: opening, sessions, texts, a writer
killed mid-write.

Migrations are in test_database.py, the schema in test_schema.py, each noun in test_<noun>.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from search.core.errors import ConfigError
from search.storage.store import Store
from tests.store_fixture import random_vectors

ROOT = Path(__file__).resolve().parents[1]


def test_in_memory_sqlite_is_refused() -> None:
    with pytest.raises(ConfigError, match="in-memory"):
        Store("sqlite://")


def test_reader_is_not_blocked_by_an_open_write_transaction(db: Store, src: int) -> None:
    reader = Store(db.db_url)
    try:
        with db.session(write=True) as s:
            s.execute(text("INSERT INTO meta (key, value) VALUES ('k', 'v')"))
            started = time.monotonic()
            assert reader.get_meta("k") is None  # the uncommitted row is invisible, and no wait
            assert time.monotonic() - started < 5
        assert reader.get_meta("k") == "v"
    finally:
        reader.close()


def test_session_rolls_back_on_error(db: Store) -> None:
    with pytest.raises(RuntimeError), db.session(write=True) as s:
        s.execute(text("INSERT INTO meta (key, value) VALUES ('k', 'v')"))
        raise RuntimeError("boom")
    assert db.get_meta("k") is None


# --- texts -------------------------------------------------------------------------------------


def test_texts(db: Store) -> None:
    vectors = random_vectors(3)
    items = [("a tumour", {"organ": "lung"}), ("necrosis", {}), ("a tumour", {})]
    assert db.add_texts("captions", items, vectors, "m1") == 2
    assert db.add_texts("captions", [("necrosis", {}), ("stroma", {})], random_vectors(2, seed=3), "m1") == 1
    assert db.add_texts("other", [("necrosis", {})], random_vectors(1), "m1") == 1

    ids, matrix = db.text_matrix("m1")
    assert ids.dtype == np.int64 and len(ids) == 4
    np.testing.assert_array_equal(matrix[:2], vectors[:2])

    texts = db.get_texts([int(ids[1]), 999, int(ids[0])])
    assert [(t["corpus"], t["text"], t["tags"]) for t in texts] == [
        ("captions", "necrosis", {}),
        ("captions", "a tumour", {"organ": "lung"}),
    ]

    missing = db.texts_missing_embeddings("m2")
    assert [i for i, _ in missing] == ids.tolist()
    assert missing[0][1] == "a tumour"
    assert db.texts_missing_embeddings("m1") == []
    db.set_text_embeddings([int(ids[0])], random_vectors(1, seed=7), "m2")
    assert [i for i, _ in db.texts_missing_embeddings("m2")] == ids[1:].tolist()
    ids2, matrix2 = db.text_matrix("m2")
    assert ids2.tolist() == [ids[0]]
    np.testing.assert_array_equal(matrix2, random_vectors(1, seed=7))
    empty_ids, empty = db.text_matrix("m3")
    assert empty_ids.shape == (0,) and empty.shape == (0, 0)


# --- crash safety ------------------------------------------------------------------------------

WRITER = """
import sys
import numpy as np
from search.storage.store import Store

store = Store(sys.argv[1])
source = store.get_or_create_source("folder", "/archive")
batch = 0
while True:
    rows = [
        {"source_id": source, "locator": f"{batch}/{i}", "path": "p", "content_hash": "h", "fingerprint": "f"}
        for i in range(50)
    ]
    store.add_tiles(rows, np.full((50, 16), batch, np.float32), "m1")
    batch += 1
"""


def test_kill_9_during_writes_loses_and_duplicates_nothing(database_url: str) -> None:
    url = database_url
    Store(url).close()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), url], env=env)
    reader = Store(url)
    try:
        deadline = time.monotonic() + 30
        while reader.counts()["tiles"] < 500:
            assert writer.poll() is None, "the writer process died on its own"
            assert time.monotonic() < deadline, "the writer wrote too little"
            time.sleep(0.05)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()

        after = Store(url)
        counts = after.counts()
        assert counts["tiles"] % 50 == 0 and counts["tiles"] == counts["embedded"]
        ids, vectors = next(after.iter_embeddings("m1", batch=10**6))
        assert len(ids) == counts["tiles"] == len(np.unique(ids))
        # Every batch is whole: each stored vector value names its batch, 50 tiles each.
        _, per_batch = np.unique(vectors[:, 0], return_counts=True)
        assert set(per_batch.tolist()) == {50}
        if url.startswith("sqlite"):
            with after.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        after.close()
    finally:
        if writer.poll() is None:
            writer.kill()
        reader.close()
