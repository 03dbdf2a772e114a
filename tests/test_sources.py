"""Sources, cases, slides and slide vectors on real SQLite and Postgres."""

from __future__ import annotations

import numpy as np

from search.storage.schema import Case, Slide
from search.storage.store import Store
from tests.store_fixture import random_vectors, tile_row


def test_sources_cases_and_slides(db: Store) -> None:
    a = db.get_or_create_source("folder", "/archive/a")
    assert db.get_or_create_source("folder", "/archive/a") == a
    b = db.get_or_create_source("zip", "/archive/b.zip")
    assert b != a
    assert db.get_or_create_source("tar", "/archive/b.zip") == b  # the kind follows the file

    db.add_tiles([tile_row(a, "t1"), tile_row(a, "t2")], random_vectors(2), "m1")
    assert db.sources()[0]["last_scanned_at"] is None
    db.mark_scanned(a)
    listed = db.sources()
    assert [(s["id"], s["kind"], s["uri"], s["tiles"]) for s in listed] == [
        (a, "folder", "/archive/a", 2),
        (b, "tar", "/archive/b.zip", 0),
    ]
    assert listed[0]["last_scanned_at"].endswith("+00:00")
    assert listed[0]["added_at"].endswith("+00:00")

    case = db.upsert_case("C1", {"site": "lung"})
    assert db.upsert_case("C1") == case
    assert db.upsert_case("C1", {"site": "colon"}) == case
    slide = db.upsert_slide("S1", a, case, "C1/S1.svs", mpp=0.25, width=1000, height=800, meta={"stain": "HE"})
    assert db.upsert_slide("S1", a, None, "moved/S1.svs", mpp=0.5) == slide
    (tile_id,) = db.add_tiles([tile_row(a, "t3", slide_id=slide)], random_vectors(1), "m1")
    (tile,) = db.get_tiles([tile_id])
    assert tile["slide_key"] == "S1" and tile["case_key"] is None  # the second upsert unlinked the case
    with db.session() as s:
        stored = s.get(Slide, slide)
        assert (stored.path, stored.mpp, stored.width, stored.meta) == ("moved/S1.svs", 0.5, None, {"stain": "HE"})
        assert s.get(Case, case).meta == {"site": "colon"}


def test_a_slide_vector_is_replaced_in_place_on_both_databases(db: Store, src: int) -> None:
    slide = db.upsert_slide("S1", src, None, "slides/S1")
    for digest, value in (("d1", 1.0), ("d2", 2.0)):
        vector = np.full(4, value, np.float32)
        kwargs = {"model_fingerprint": "m1", "method": "mean", "tiles_digest": digest, "n_tiles": 3}
        db.set_slide_vector(slide, "mean", vector, **kwargs)
    assert db.slide_vector_digests("mean") == {slide: ("d2", "m1", "mean")}
    ids, vectors = db.slide_vectors("mean")
    assert ids.tolist() == [slide] and vectors.tolist() == [[2.0] * 4]
