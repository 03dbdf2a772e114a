"""Vector segment files: append, crash recovery, orphans, databases from before segments, float16 cost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from alembic import command
from sqlalchemy import create_engine, text

from search.storage import segments as segments_module
from search.storage.database import alembic_config
from search.storage.schema import Embedding, VectorSegment
from search.storage.segments import VectorSegments
from search.storage.store import Store
from tests.store_fixture import db_url, random_vectors, tile_row


def test_rows_past_the_committed_count_are_cut_off_by_the_next_append(db: Store, src: int) -> None:
    first = random_vectors(4, seed=1)
    ids = db.add_tiles([tile_row(src, f"t{i}") for i in range(4)], first, "m1")
    with db.session() as s:
        (segment_id,) = s.scalars(text("SELECT id FROM vector_segments")).all()
    # A writer that appended and fsynced, then died before its commit: rows past the count of 4.
    db.segments.append(segment_id, 4, random_vectors(3, seed=2))
    assert db.segments.path(segment_id).stat().st_size == 7 * first.shape[1] * 2
    np.testing.assert_array_equal(db.get_embeddings(ids, "m1"), first)

    second = random_vectors(2, seed=3)
    more = db.add_tiles([tile_row(src, "u0"), tile_row(src, "u1")], second, "m1")
    assert db.segments.path(segment_id).stat().st_size == 6 * first.shape[1] * 2
    np.testing.assert_array_equal(db.get_embeddings(ids + more, "m1"), np.vstack([first, second]))


def test_a_segment_file_no_row_names_is_removed(db: Store, src: int) -> None:
    db.add_tiles([tile_row(src, "a")], random_vectors(1), "m1")
    # The transaction that created segment 99 rolled back after its file was written.
    db.segments.append(99, 0, random_vectors(2))
    assert db.remove_unreferenced_segments() == 1
    assert not db.segments.path(99).exists()
    assert db.remove_unreferenced_segments() == 0
    assert db.counts()["embedded"] == 1


def test_a_full_segment_is_followed_by_a_new_one(db: Store, src: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("search.storage.embeddings.SEGMENT_ROWS", 3)
    vectors = random_vectors(7)
    ids = []
    for n in range(0, 7, 2):
        ids += db.add_tiles([tile_row(src, f"t{i}") for i in range(n, min(n + 2, 7))], vectors[n : n + 2], "m1")
    with db.session() as s:
        rows = s.execute(text("SELECT id, rows FROM vector_segments ORDER BY id")).all()
    assert [r[1] for r in rows] == [4, 3]  # a batch goes whole into the segment open when it starts
    np.testing.assert_array_equal(db.get_embeddings(ids[::-1], "m1"), vectors[::-1])
    batches = list(db.iter_embeddings("m1", batch=3))
    assert np.concatenate([b[0] for b in batches]).tolist() == ids
    np.testing.assert_array_equal(np.vstack([b[1] for b in batches]), vectors)


def test_re_embedding_appends_and_points_at_the_new_rows(db: Store, src: int) -> None:
    ids = db.add_tiles([tile_row(src, "a"), tile_row(src, "b")], random_vectors(2), "m1")
    new = random_vectors(1, seed=9)
    db.set_embeddings([ids[1]], new, "m2")
    np.testing.assert_array_equal(db.get_embeddings([ids[1]], "m2"), new)
    with db.session() as s:
        assert s.get(Embedding, ids[1]).model_fingerprint == "m2"
        assert s.query(VectorSegment).count() == 2  # one per model
    assert db.embedded_ids("m1").tolist() == [ids[0]]


def test_reads_of_rows_the_file_does_not_hold_name_the_file(tmp_path: Path) -> None:
    segments = VectorSegments(tmp_path)
    segments.append(1, 0, random_vectors(2))
    with pytest.raises(OSError, match="seg-000001.f16: holds 2 vectors"):
        segments.read(1, 8, np.array([5]))


def test_a_database_from_before_segments_is_read_and_written(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    command.upgrade(alembic_config(db_url(path)), "0001")
    legacy = np.random.default_rng(4).standard_normal((2, 8)).astype(np.float32)  # float32: kept exactly
    engine = create_engine(db_url(path))
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO sources VALUES (1, 'folder', '/a', '2020-01-01', NULL)"))
        for i, vector in enumerate(legacy, start=1):
            conn.execute(
                text(
                    "INSERT INTO tiles (id, source_id, locator, path, content_hash, fingerprint, meta, created_at) "
                    "VALUES (:i, 1, :loc, :loc, 'h', 'f', '{}', '2020-01-01')"
                ),
                {"i": i, "loc": f"t{i}"},
            )
            conn.execute(text("INSERT INTO embeddings VALUES (:i, 'm1', :v)"), {"i": i, "v": vector.tobytes()})
    engine.dispose()

    store = Store(db_url(path))
    try:
        new = random_vectors(1)
        (added,) = store.add_tiles([tile_row(1, "t3")], new, "m1")
        np.testing.assert_array_equal(store.get_embeddings([added, 2, 1], "m1"), np.vstack([new, legacy[::-1]]))
        ids, vectors = next(store.iter_embeddings("m1"))
        assert ids.tolist() == [1, 2, added]
        np.testing.assert_array_equal(vectors, np.vstack([legacy, new]))
    finally:
        store.close()


def test_float16_moves_cosines_by_less_than_1e_3() -> None:
    rng = np.random.default_rng(0)
    stored = rng.standard_normal((2000, 512)).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    queries = rng.standard_normal((20, 512)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    halved = stored.astype(segments_module.DTYPE).astype(np.float32)
    error = np.abs(queries @ halved.T - queries @ stored.T)
    assert 0 < error.max() < 1e-3
