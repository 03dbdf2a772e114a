"""Embeddings on real SQLite: float16 rows of a segment, re-embedding under a new model."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError

from search.core.errors import NotFound
from search.storage.schema import Embedding
from search.storage.store import Store
from tests.store_fixture import random_vectors, tile_row


def test_vectors_are_stored_as_little_endian_float16_rows_of_a_segment(db: Store, src: int) -> None:
    vectors = random_vectors(3).astype(">f8")  # any float input is stored as <f2
    db.add_tiles([tile_row(src, "a")], vectors[:1], "m1")
    ids = db.add_tiles([tile_row(src, "b"), tile_row(src, "c")], vectors[1:], "m1")
    with db.session() as s:
        row = s.get(Embedding, ids[1])
    assert row.vector is None and row.position == 2
    data = np.fromfile(db.segments.path(row.segment_id), dtype="<f2").reshape(-1, vectors.shape[1])
    np.testing.assert_array_equal(data.astype(np.float32), vectors.astype(np.float32))


def test_model_change_reembeds_in_place(db: Store, src: int) -> None:
    ids = db.add_tiles([tile_row(src, "a"), tile_row(src, "b")], random_vectors(2), "m1")
    (extra,) = db.add_tiles([tile_row(src, "c")], random_vectors(1), "m1")
    new = random_vectors(2, seed=9)
    db.set_embeddings(ids, new, "m2")
    assert db.tile_states(src)["a"].model_fingerprint == "m2"
    (batch_ids, batch_vectors), *_ = db.iter_embeddings("m2")
    assert batch_ids.tolist() == ids
    np.testing.assert_array_equal(batch_vectors, new)
    assert db.counts()["embedded_by_model"] == {"m1": 1, "m2": 2}
    with pytest.raises(NotFound, match=rf"model m1 for tile\(s\) {ids[0]}, {ids[1]};"):
        db.get_embeddings([ids[0], extra, ids[1]], "m1")
    with pytest.raises(IntegrityError):
        db.set_embeddings([999_999], random_vectors(1), "m2")
