"""The query engine over a real small index (SQLite + FAISS in tmp_path, tiny CONCH with synthetic weights)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from search.core.errors import BadQuery, IndexUnavailable, NotFound
from search.engine.engine import Engine
from search.engine.filters import Filters, filters_from
from search.engine.ranking import MAX_DEPTH
from tests.index_fixture import CAPTIONS, TERMS, build_index


@pytest.fixture
def indexed(tiny_settings, tiny_encoder, tmp_path):
    # These tests check the plain ranking; spreading across slides has its own (test_engine_results.py).
    settings = tiny_settings.model_copy(update={"max_per_slide": 0})
    return build_index(settings, tiny_encoder, tmp_path / "tiles")


@pytest.fixture
def engine(indexed, tiny_encoder):
    engine = Engine(indexed.settings, store=indexed.store, encoder=tiny_encoder)
    yield engine
    engine.close()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_an_indexed_tile_finds_itself_first_by_image(engine, indexed):
    path = "C2/C2-S1/t3.png"
    result = engine.search_image(indexed.image(path), k=5)
    first = result["results"][0]
    assert first["tile_id"] == indexed.ids[path]
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    assert first["rank"] == 1
    assert (first["slide"], first["case"], first["path"]) == ("C2-S1", "C2", path)
    assert first["meta"] == {"organ": "colon"}
    assert not [key for key in first if key.endswith("url")]  # the engine returns ids; the web layer links
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True)
    assert result["total"] == len(indexed.ids)
    assert result["query"]["image"]


def test_image_reference_serves_later_pages_without_the_image(engine, indexed):
    image = indexed.image("C1/C1-S2/t0.png")
    ref = engine.image_ref(image)
    assert engine.search_image(ref, k=3) == engine.search_image(image, k=3)
    with pytest.raises(BadQuery, match="upload the image again"):
        engine.search_image("not-a-known-reference", k=3)


@pytest.mark.parametrize("ensemble", [False, True])
def test_text_search_ranks_by_the_text_embedding(indexed, tiny_encoder, ensemble):
    from search.conch.encoder import DEFAULT_TEMPLATES

    settings = indexed.settings.model_copy(update={"prompt_ensemble": ensemble})
    engine = Engine(settings, store=indexed.store, encoder=tiny_encoder)
    query = "cribriform   glands "
    result = engine.search_text(query, k=len(indexed.ids))
    assert result["query"] == {"text": "cribriform glands", "searched": "cribriform glands"}
    q = tiny_encoder.encode_texts(["cribriform glands"], templates=DEFAULT_TEMPLATES if ensemble else None)[0]
    expected = sorted(indexed.ids.values(), key=lambda i: -float(indexed.vectors[i] @ q))
    assert [r["tile_id"] for r in result["results"]][:5] == expected[:5]
    assert result["results"][0]["score"] == pytest.approx(float(indexed.vectors[expected[0]] @ q), abs=1e-4)


def test_text_queries_are_cached_per_query_string(engine, tiny_encoder, monkeypatch):
    engine.search_text("necrosis", k=3)
    calls = []
    original = tiny_encoder.encode_texts

    def counting(texts, **kwargs):
        calls.append(list(texts))
        return original(texts, **kwargs)

    monkeypatch.setattr(tiny_encoder, "encode_texts", counting)
    engine.search_text("necrosis", k=5)
    assert calls == []
    engine.search_text("mitosis", k=5)
    assert calls == [["mitosis"]]


def test_similar_uses_the_stored_vector_and_excludes_the_tile(engine, indexed):
    tile_id = indexed.ids["C1/C1-S1/tile_1_1.png"]
    result = engine.similar(tile_id, k=len(indexed.ids))
    ids = [r["tile_id"] for r in result["results"]]
    assert tile_id not in ids
    assert len(ids) == len(indexed.ids) - 1
    assert result["total"] == len(indexed.ids) - 1
    query = indexed.vectors[tile_id]
    best = max((i for i in indexed.ids.values() if i != tile_id), key=lambda i: _cos(indexed.vectors[i], query))
    assert ids[0] == best


def test_similar_works_without_an_encoder(indexed):
    # No encoder given and none could be built: similar must not need one.
    engine = Engine(indexed.settings.model_copy(update={"checkpoint": indexed.folder / "missing.bin"}))
    tile_id = indexed.ids["C1/C1-S2/t2.png"]
    assert engine.similar(tile_id, k=3)["results"]
    assert engine.status()["model"]["loaded"] is False


def test_filters_restrict_results(engine, indexed):
    query = indexed.image("C1/C1-S1/tile_0_0.png")
    by_case = engine.search_image(query, k=50, filters=Filters(case="C2"))
    assert by_case["results"] and {r["case"] for r in by_case["results"]} == {"C2"}
    assert by_case["total"] == 14
    assert by_case["filters"] == {"case": "C2"}
    by_slide = engine.search_image(query, k=50, filters=Filters(slide="C1-S2"))
    assert {r["slide"] for r in by_slide["results"]} == {"C1-S2"} and len(by_slide["results"]) == 7
    by_meta = engine.search_image(query, k=50, filters=Filters(meta={"organ": "breast"}))
    assert {r["meta"]["organ"] for r in by_meta["results"]} == {"breast"} and len(by_meta["results"]) == 16
    by_source = engine.search_image(query, k=50, filters=Filters(source=str(indexed.folder)))
    assert len(by_source["results"]) == len(indexed.ids)
    nothing = engine.search_image(query, k=5, filters=Filters(meta={"organ": "lung"}))
    assert nothing["results"] == [] and nothing["total"] == 0


def test_filters_from_request_parameters():
    filters = filters_from({"source": "", "case": "C1", "meta.organ": "colon", "meta.": "x", "k": "5", "image": b""})
    assert filters == Filters(case="C1", meta={"organ": "colon"})
    assert not filters_from({})


def test_paging_slices_the_ranking(engine, indexed):
    query = indexed.image("C2/C2-S2/t1.png")
    everything = engine.search_image(query, k=len(indexed.ids))["results"]
    page = engine.search_image(query, k=7, offset=7)
    assert [r["tile_id"] for r in page["results"]] == [r["tile_id"] for r in everything[7:14]]
    assert [r["rank"] for r in page["results"]] == list(range(8, 15))
    last = engine.search_image(query, k=7, offset=28)
    assert len(last["results"]) == len(indexed.ids) - 28


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query": ""}, "empty query"),
        ({"query": "   "}, "empty query"),
        ({"query": "x" * 501}, "limit is 500"),
        ({"query": "gland", "k": 0}, "k must be between 1 and 500"),
        ({"query": "gland", "k": 501}, "k must be between 1 and 500"),
        ({"query": "gland", "offset": -1}, "offset"),
        ({"query": "gland", "k": 500, "offset": MAX_DEPTH}, "rank"),
    ],
)
def test_bad_queries_are_refused(engine, kwargs, message):
    with pytest.raises(BadQuery, match=message):
        engine.search_text(**kwargs)


def test_unknown_tile_is_not_found(engine):
    with pytest.raises(NotFound, match="no tile with id 999999"):
        engine.similar(999999)
    with pytest.raises(NotFound):
        engine.tile(999999)
    with pytest.raises(NotFound):
        engine.tile_bytes(999999)


def test_cases_group_hits_and_aggregate_the_best_scores(engine, indexed):
    query = indexed.image("C1/C1-S1/tile_2_2.png")
    result = engine.cases(image=query, top_tiles=100, per_case=3, k=10)
    assert [c["rank"] for c in result["results"]] == [1, 2]
    assert {c["case"] for c in result["results"]} == {"C1", "C2"}
    ranking = engine.search_image(query, k=len(indexed.ids))["results"]
    for case in result["results"]:
        members = [r for r in ranking if r["case"] == case["case"]]
        assert case["hits"] == len(members)
        assert case["score"] == pytest.approx(np.mean([r["score"] for r in members[:3]]), abs=1e-6)
        assert [t["tile_id"] for t in case["tiles"]] == [r["tile_id"] for r in members[:3]]
        slides = {s["slide"]: s for s in case["slides"]}
        assert set(slides) == {r["slide"] for r in members}
        for slide, entry in slides.items():
            assert entry["hits"] == sum(r["slide"] == slide for r in members)
    scores = [c["score"] for c in result["results"]]
    assert scores == sorted(scores, reverse=True)


def test_cases_count_missing_tiles_at_the_cutoff_when_truncated(engine, indexed):
    tile_id = indexed.ids["C2/C2-S1/t0.png"]
    result = engine.cases(tile_id=tile_id, top_tiles=4, per_case=3, k=5)
    assert result["query"] == {"tile_id": tile_id}
    hits = engine.similar(tile_id, k=4)["results"]
    cutoff = hits[-1]["score"]
    assert result["cutoff"] == pytest.approx(cutoff)
    for case in result["results"]:
        scores = [r["score"] for r in hits if r["case"] == case["case"]][:3]
        padded = scores + [cutoff] * (3 - len(scores))
        assert case["score"] == pytest.approx(float(np.mean(padded)), abs=1e-6)


def test_cases_by_text_and_bad_arguments(engine):
    assert engine.cases(text="gland", k=1)["results"][0]["rank"] == 1
    with pytest.raises(BadQuery, match="exactly one"):
        engine.cases()
    with pytest.raises(BadQuery, match="exactly one"):
        engine.cases(text="gland", tile_id=1)
    with pytest.raises(BadQuery, match="per_case"):
        engine.cases(text="gland", per_case=0)


def test_describe_ranks_texts_by_cosine(engine, indexed, tiny_encoder):
    tile_id = indexed.ids["C1/C1-S2/t4.png"]
    result = engine.describe(tile_id=tile_id, k=len(CAPTIONS) + len(TERMS))
    texts = CAPTIONS + TERMS
    vectors = tiny_encoder.encode_texts(texts)
    expected = [texts[i] for i in np.argsort(-(vectors @ indexed.vectors[tile_id]), kind="stable")]
    assert [r["text"] for r in result["results"]] == expected
    assert result["results"][0]["score"] == pytest.approx(float(max(vectors @ indexed.vectors[tile_id])), abs=1e-5)
    assert result["corpora"] == ["captions", "terms"]
    only_terms = engine.describe(tile_id=tile_id, k=2, corpus="terms")
    assert len(only_terms["results"]) == 2 and {r["corpus"] for r in only_terms["results"]} == {"terms"}
    with pytest.raises(BadQuery, match="no text corpus named 'nope'"):
        engine.describe(tile_id=tile_id, corpus="nope")
    by_image = engine.describe(image=indexed.image("C1/C1-S2/t4.png"), k=3)
    assert [r["text"] for r in by_image["results"]] == expected[:3]


def test_tile_has_metadata_and_grid_neighbours(engine, indexed):
    centre = engine.tile(indexed.ids["C1/C1-S1/tile_1_1.png"])
    assert (centre["slide"], centre["case"], centre["level"], centre["x"], centre["y"]) == ("C1-S1", "C1", 0, 64, 64)
    assert not [key for key in (*centre, *centre["neighbours"][0]) if key.endswith("url")]
    offsets = {(n["dx"], n["dy"]): n["tile_id"] for n in centre["neighbours"]}
    assert len(offsets) == 9
    assert offsets[(1, -1)] == indexed.ids["C1/C1-S1/tile_2_0.png"]
    corner = engine.tile(indexed.ids["C1/C1-S1/tile_0_0.png"])
    assert len(corner["neighbours"]) == 4
    plain = engine.tile(indexed.ids["C2/C2-S2/t0.png"])
    assert plain["neighbours"] == []


def test_tile_bytes_rereads_the_source(engine, indexed):
    path = "C1/C1-S2/t1.png"
    data, content_type = engine.tile_bytes(indexed.ids[path])
    assert content_type == "image/png"
    assert data == (indexed.folder / path).read_bytes()
    thumb, thumb_type = engine.tile_bytes(indexed.ids[path], thumbnail=True)
    assert thumb_type == "image/jpeg"
    with Image.open(io.BytesIO(thumb)) as im:
        assert im.format == "JPEG" and max(im.size) <= 192


def test_tile_bytes_of_a_vanished_file_is_not_found(engine, indexed):
    path = "C2/C2-S2/t5.png"
    (indexed.folder / path).unlink()
    with pytest.raises(NotFound, match="cannot be read"):
        engine.tile_bytes(indexed.ids[path])


def test_no_live_index_is_unavailable(tiny_settings, tiny_encoder):
    engine = Engine(tiny_settings, encoder=tiny_encoder)
    with pytest.raises(IndexUnavailable, match="histosearch index"):
        engine.search_text("gland")
    assert engine.status()["index"] is None


def test_fingerprint_mismatch_is_unavailable(indexed, tiny_encoder, monkeypatch):
    engine = Engine(indexed.settings, store=indexed.store, encoder=tiny_encoder)
    monkeypatch.setattr(tiny_encoder, "fingerprint", "conch_tiny-0000000000000000")
    with pytest.raises(IndexUnavailable, match="histosearch reindex"):
        engine.search_text("gland")
    with pytest.raises(IndexUnavailable, match="histosearch reindex"):
        engine.search_image(indexed.image("C1/C1-S2/t0.png"))
    # Stored vectors still answer: they are in the index's own model space.
    assert engine.similar(indexed.ids["C1/C1-S2/t0.png"], k=2)["results"]


def test_status_fields(engine, indexed):
    job = indexed.store.start_job("index", {"paths": ["x"]}, total=40)
    indexed.store.update_job(job, done=10)
    indexed.store.record_error("C9/bad.png", "not a JPEG, PNG, TIFF or WebP image")
    status = engine.status()
    assert status["counts"]["tiles"] == len(indexed.ids)
    assert status["counts"]["texts"] == len(CAPTIONS) + len(TERMS)
    assert status["model"]["name"] == "conch_tiny" and status["model"]["embed_dim"] == 32
    assert status["device"] == "cpu"
    assert status["index"]["type"] == "flat"
    assert status["index"]["size"] == len(indexed.ids)
    assert status["index"]["model_fingerprint"] == indexed.fingerprint
    assert status["index"]["built_at"]
    assert status["running_job"]["progress"] == pytest.approx(0.25)
    assert status["last_job"]["id"] == job
    assert status["recent_errors"][0]["path"] == "C9/bad.png"
    assert status["sources"][0]["tiles"] == len(indexed.ids)


def test_facets_list_filter_values_with_counts(engine, indexed):
    facets = engine.facets()
    assert sorted(v["value"] for v in facets["cases"]["values"]) == ["C1", "C2"]
    assert sorted(v["value"] for v in facets["slides"]["values"]) == ["C1-S1", "C1-S2", "C2-S1", "C2-S2"]
    organs = {v["value"]: v["count"] for v in facets["meta"]["organ"]["values"]}
    assert sorted(organs) == ["breast", "colon"] and sum(organs.values()) == len(indexed.ids)


def test_warm_up_loads_the_model_and_index_or_says_what_is_missing(indexed, tiny_settings):
    engine = Engine(indexed.settings)
    try:
        assert engine.warm_up() == []
        assert engine.status()["model"]["loaded"]
    finally:
        engine.close()
    bare = Engine(tiny_settings.model_copy(update={"checkpoint": None, "data_dir": tiny_settings.data_dir / "x"}))
    try:
        problems = bare.warm_up()
    finally:
        bare.close()
    assert any("histosearch model fetch" in p for p in problems)
    assert any("histosearch index" in p for p in problems)
