"""Tiles on real SQLite: written with their vectors atomically, id reuse, filters, facets, neighbours."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from search.core.errors import BadQuery, NotFound
from search.storage.repository import CHUNK
from search.storage.store import Store, TileState
from tests.store_fixture import random_vectors, tile_row


def test_add_tiles_then_read_them_back(db: Store, src: int) -> None:
    vectors = random_vectors(3)
    ids = db.add_tiles(
        [tile_row(src, "a", level=0, x=0, y=0, meta={"stain": "HE"}), tile_row(src, "b"), tile_row(src, "c")],
        vectors,
        "m1",
    )
    assert ids == sorted(ids) and len(set(ids)) == 3

    states = db.tile_states(src)
    assert states["a"] == TileState(ids[0], "f-a", "h-a", "m1")
    assert set(states) == {"a", "b", "c"}

    got = db.get_embeddings([ids[2], ids[0]], "m1")
    assert got.dtype == np.float32 and got.flags.writeable
    np.testing.assert_array_equal(got, vectors[[2, 0]])

    tiles = db.get_tiles([ids[1], 999_999, ids[0]])
    assert [t["id"] for t in tiles] == [ids[1], ids[0]]
    assert tiles[1]["source"] == {"id": src, "kind": "folder", "uri": "/archive/a"}
    assert tiles[1]["meta"] == {"stain": "HE"} and tiles[0]["meta"] == {}
    assert tiles[1]["created_at"].endswith("+00:00")

    batches = list(db.iter_embeddings("m1", batch=2))
    assert [b[0].tolist() for b in batches] == [ids[:2], ids[2:]]
    assert batches[0][0].dtype == np.int64
    np.testing.assert_array_equal(np.vstack([b[1] for b in batches]), vectors)
    assert list(db.iter_embeddings("other")) == []


def test_add_tiles_is_atomic(db: Store, src: int) -> None:
    db.add_tiles([tile_row(src, "a")], random_vectors(1), "m1")
    before = db.counts()
    with pytest.raises(IntegrityError):
        db.add_tiles([tile_row(src, "b"), tile_row(src, "a")], random_vectors(2), "m1")
    with pytest.raises(IntegrityError):
        db.add_tiles([tile_row(src, "c"), tile_row(src, "c")], random_vectors(2), "m1")
    with pytest.raises(ValueError, match="shape"):
        db.add_tiles([tile_row(src, "d")], random_vectors(2), "m1")
    with pytest.raises(ValueError, match="unknown keys.*colour"):
        db.add_tiles([tile_row(src, "e", colour="red")], random_vectors(1), "m1")
    assert db.counts() == before
    assert set(db.tile_states(src)) == {"a"}


def test_tile_ids_are_never_reused(db: Store, src: int) -> None:
    ids = db.add_tiles([tile_row(src, str(i)) for i in range(3)], random_vectors(3), "m1")
    db.delete_tiles(ids[1:])
    (again,) = db.add_tiles([tile_row(src, "1")], random_vectors(1), "m1")
    assert again > max(ids)

    (replaced,) = db.replace_tiles([ids[0]], [tile_row(src, "0", content_hash="new")], random_vectors(1, seed=5), "m1")
    assert replaced > again
    assert db.get_tiles([ids[0]]) == []
    assert db.tile_states(src)["0"] == TileState(replaced, "f-0", "new", "m1")
    np.testing.assert_array_equal(db.get_embeddings([replaced], "m1"), random_vectors(1, seed=5))
    # The cascade removed the old vectors: only the two live tiles have one.
    assert db.counts()["embedded"] == 2


def test_replace_tiles_is_atomic(db: Store, src: int) -> None:
    ids = db.add_tiles([tile_row(src, "a"), tile_row(src, "b")], random_vectors(2), "m1")
    with pytest.raises(IntegrityError):
        db.replace_tiles([ids[0]], [tile_row(src, "b")], random_vectors(1), "m1")
    assert {k: v.id for k, v in db.tile_states(src).items()} == {"a": ids[0], "b": ids[1]}


def test_update_fingerprints_keeps_ids(db: Store, src: int) -> None:
    ids = db.add_tiles([tile_row(src, "a"), tile_row(src, "b")], random_vectors(2), "m1")
    db.update_fingerprints([(ids[0], "moved"), (ids[1], "touched")])
    states = db.tile_states(src)
    assert (states["a"].id, states["a"].fingerprint) == (ids[0], "moved")
    assert (states["b"].id, states["b"].fingerprint) == (ids[1], "touched")


def test_deleting_a_source_cascades_to_its_tiles(db: Store, src: int) -> None:
    db.add_tiles([tile_row(src, "a")], random_vectors(1), "m1")
    db.record_error("a/broken.png", "not an image", source_id=src)
    with db.session(write=True) as s:
        s.execute(text("DELETE FROM sources WHERE id = :id"), {"id": src})
    counts = db.counts()
    assert (counts["tiles"], counts["embedded"]) == (0, 0)
    assert db.recent_errors() == []


def test_large_id_lists_are_chunked(db: Store, src: int) -> None:
    n = CHUNK + 5
    ids = db.add_tiles([tile_row(src, str(i)) for i in range(n)], np.zeros((n, 2), np.float32), "m1")
    assert db.get_embeddings(ids, "m1").shape == (n, 2)
    assert len(db.get_tiles(ids)) == n
    db.delete_tiles(ids)
    assert db.counts()["tiles"] == 0


# --- filters, neighbours, facets ---------------------------------------------------------------


@pytest.fixture
def catalogue(db: Store) -> dict[str, list[int]]:
    a = db.get_or_create_source("folder", "/archive/a")
    b = db.get_or_create_source("zip", "/archive/b.zip")
    c1 = db.upsert_case("C1")
    c2 = db.upsert_case("C2")
    s1 = db.upsert_slide("S1", a, c1, "C1/S1")
    s2 = db.upsert_slide("S2", b, c2, "C2/S2")
    s3 = db.upsert_slide("S3", b, None, "S3")
    ids = db.add_tiles(
        [
            tile_row(a, "1", slide_id=s1, meta={"stain": "HE", "year": 2020}),
            tile_row(a, "2", slide_id=s1, meta={"stain": "IHC"}),
            tile_row(b, "3", slide_id=s2, meta={"stain": "HE"}),
            tile_row(b, "4", slide_id=s3, meta={"stain": "HE", "year": 2021}),
            tile_row(b, "5", meta={'rater "A"': "yes", "Färbung": "HE"}),
        ],
        random_vectors(5),
        "m1",
    )
    return {"a": [a], "b": [b], "ids": ids}


def test_tile_ids_matching_filters(db: Store, catalogue: dict[str, list[int]]) -> None:
    t1, t2, t3, t4, t5 = catalogue["ids"]

    def match(**kw: object) -> list[int]:
        result = db.tile_ids_matching(**kw)
        assert result.dtype == np.int64
        return result.tolist()

    assert match() == [t1, t2, t3, t4, t5]
    assert match(source="/archive/b.zip") == [t3, t4, t5]
    assert match(source=str(catalogue["a"][0])) == [t1, t2]
    assert match(source=catalogue["a"][0]) == [t1, t2]
    assert match(source="/nowhere") == []
    assert match(slide="S1") == [t1, t2]
    assert match(case="C2") == [t3]
    assert match(meta={"stain": "HE"}) == [t1, t3, t4]
    assert match(meta={"year": "2021"}) == [t4]
    assert match(meta={"stain": "HE", "year": "2020"}) == [t1]
    assert match(meta={"stain": "HE", "year": "2019"}) == []
    assert match(source="/archive/b.zip", meta={"stain": "HE"}) == [t3, t4]
    assert match(case="C1", meta={"stain": "IHC"}) == [t2]
    assert match(slide="S1", case="C2") == []
    # Keys a JSON path cannot name (quotes, non-ASCII) still match.
    assert match(meta={'rater "A"': "yes"}) == [t5]
    assert match(meta={"Färbung": "HE"}) == [t5]


def _values(facet: dict) -> list[tuple[str, int]]:
    return [(v["value"], v["count"]) for v in facet["values"]]


def test_facet_values_with_tile_counts(db: Store, catalogue: dict[str, list[int]]) -> None:
    facets = db.facet_values()
    a, b = catalogue["a"][0], catalogue["b"][0]
    assert facets["sources"]["values"] == [
        {"value": str(b), "count": 3, "label": "/archive/b.zip"},
        {"value": str(a), "count": 2, "label": "/archive/a"},
    ]
    assert _values(facets["slides"]) == [("S1", 2), ("S2", 1), ("S3", 1)]
    assert _values(facets["cases"]) == [("C1", 2), ("C2", 1)]
    assert sorted(facets["meta"]) == ["Färbung", 'rater "A"', "stain", "year"]
    assert _values(facets["meta"]["stain"]) == [("HE", 3), ("IHC", 1)]
    # Counts add up to the tiles that carry the field.
    assert sum(n for _, n in _values(facets["meta"]["stain"])) == 4


def test_facet_values_say_when_they_are_cut(db: Store, catalogue: dict[str, list[int]]) -> None:
    limited = db.facet_values(limit=1)
    assert _values(limited["slides"]) == [("S1", 2)] and limited["slides"]["distinct"] == 3
    assert _values(limited["meta"]["stain"]) == [("HE", 3)] and limited["meta"]["stain"]["distinct"] == 2
    assert len(db.facet_values(max_keys=2)["meta"]) == 2


def test_facet_typeahead_by_substring(db: Store, catalogue: dict[str, list[int]]) -> None:
    assert _values(db.facet("slide", "s3")) == [("S3", 1)]
    assert _values(db.facet("meta.stain", "ih")) == [("IHC", 1)]
    assert db.facet("source", "b.zip")["values"][0]["label"] == "/archive/b.zip"
    assert db.facet("case", "nothing like it") == {"values": [], "distinct": 0}
    with pytest.raises(BadQuery, match="no filter field 'organ'"):
        db.facet("organ")


def test_counts(db: Store, catalogue: dict[str, list[int]]) -> None:
    db.add_texts("captions", [("a tumour", {})], random_vectors(1), "m1")
    assert db.counts() == {
        "sources": 2,
        "slides": 3,
        "cases": 2,
        "tiles": 5,
        "texts": 1,
        "embedded": 5,
        "embedded_by_model": {"m1": 5},
    }


def _grid(db: Store, src: int, slide: int, level: int, stride: int, n: int = 5) -> dict[tuple[int, int], int]:
    cells = [(i, j) for j in range(n) for i in range(n)]
    rows = [
        tile_row(src, f"{slide}/{level}/{i}/{j}", slide_id=slide, level=level, x=100 + i * stride, y=50 + j * stride)
        for i, j in cells
    ]
    return dict(zip(cells, db.add_tiles(rows, random_vectors(len(rows)), "m1"), strict=True))


def test_neighbours(db: Store, src: int) -> None:
    s1 = db.upsert_slide("S1", src, None, "S1.svs")
    s2 = db.upsert_slide("S2", src, None, "S2.svs")
    grid = _grid(db, src, s1, level=0, stride=224)
    _grid(db, src, s1, level=1, stride=224)  # same coordinates, other level
    _grid(db, src, s2, level=0, stride=224)  # same coordinates, other slide
    db.delete_tiles([grid[(3, 2)]])  # a hole (e.g. background) in the 3x3 block

    around = db.neighbours(grid[(2, 2)])
    expected = [(i, j) for j in (1, 2, 3) for i in (1, 2, 3) if (i, j) != (3, 2)]
    assert [t["id"] for t in around] == [grid[c] for c in expected]
    assert [(t["dx"], t["dy"]) for t in around] == [(i - 2, j - 2) for i, j in expected]
    assert around[0]["slide_key"] == "S1"

    corner = db.neighbours(grid[(0, 0)], radius=2)
    assert sorted(t["id"] for t in corner) == sorted(grid[(i, j)] for i in range(3) for j in range(3))

    (lonely,) = db.add_tiles([tile_row(src, "no-slide", x=0, y=0)], random_vectors(1), "m1")
    assert db.neighbours(lonely) == []
    with pytest.raises(NotFound):
        db.neighbours(999_999)


def test_neighbours_of_a_single_column(db: Store, src: int) -> None:
    slide = db.upsert_slide("S1", src, None, "S1")
    ids = db.add_tiles(
        [tile_row(src, str(j), slide_id=slide, level=0, x=0, y=j * 512) for j in range(4)], random_vectors(4), "m1"
    )
    assert [(t["id"], t["dx"], t["dy"]) for t in db.neighbours(ids[1])] == [
        (ids[0], 0, -1),
        (ids[1], 0, 0),
        (ids[2], 0, 1),
    ]
