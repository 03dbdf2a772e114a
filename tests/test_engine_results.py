"""Issue 10's structural properties on the tiny model: exact re-rank, calibration, why-this-hit, spread,
exclude this case, rotation invariance, composition, kept uploads, query log, scale, abbreviations."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from indexer.texts import sync_word_vectors
from search.conch.encoder import DEFAULT_TEMPLATES
from search.core.errors import BadQuery, ConfigError
from search.engine.engine import Engine
from search.engine.options import SearchOptions, options_from
from search.engine.spread import spread
from search.storage.build_checks import CALIBRATION_FILE, publish_build
from search.storage.index_directory import IndexDirectory
from search.storage.vectors import VectorIndex
from tests.index_fixture import CAPTIONS, TERMS, build_index


@pytest.fixture
def indexed(tiny_settings, tiny_encoder, tmp_path):
    return build_index(tiny_settings, tiny_encoder, tmp_path / "tiles")


def _engine(indexed, encoder, **settings) -> Engine:
    return Engine(indexed.settings.model_copy(update=settings), store=indexed.store, encoder=encoder)


@pytest.fixture
def engine(indexed, tiny_encoder):
    engine = _engine(indexed, tiny_encoder)
    yield engine
    engine.close()


def _exact(indexed, vector: np.ndarray) -> list[tuple[int, float]]:
    scores = [(i, float(v @ vector)) for i, v in indexed.vectors.items()]
    return sorted(scores, key=lambda p: (-p[1], p[0]))


def _pad(indexed, n: int) -> None:
    """Add ``n`` bare tiles with random unit vectors, so approximate indexes have something to miss."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((n, len(next(iter(indexed.vectors.values())))), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    source_id = indexed.store.get_or_create_source("folder", str(indexed.folder / "pad"))
    rows = [{"source_id": source_id, "locator": f"pad{i}", "path": f"pad{i}.png", "content_hash": f"p{i}",
             "fingerprint": f"{i}", "meta": {}} for i in range(n)]  # fmt: skip
    ids = indexed.store.add_tiles(rows, vectors, indexed.fingerprint)
    indexed.vectors.update(zip(ids, vectors, strict=True))


def _republish(indexed, index_type: str, min_recall: float = 0.0, **build) -> dict:
    ids = np.asarray(list(indexed.vectors), dtype=np.int64)
    vectors = np.stack(list(indexed.vectors.values()))
    index = VectorIndex.build(ids, vectors, index_type, **build)
    directory = IndexDirectory(indexed.settings.data_dir / "index")
    return publish_build(indexed.store, directory, index, ids, vectors, indexed.fingerprint,
                         calibration_size=20, min_recall=min_recall, recall_queries=30)  # fmt: skip


# --- exact re-rank ---------------------------------------------------------------------------------


def test_approximate_candidates_are_reranked_by_exact_cosine(indexed, tiny_encoder):
    # IVF-PQ scores are approximations of the cosine (product-quantised codes): every score shown must
    # be the exact cosine of the tile's stored vector, and the page sorted by it.
    _pad(indexed, 600)
    build = _republish(indexed, "ivfpq")
    assert build["index_type"] == "ivfpq"
    engine = _engine(indexed, tiny_encoder, max_per_slide=0, rerank_factor=8)
    tile_id = indexed.ids["C2/C2-S1/t3.png"]
    query = indexed.vectors[tile_id]
    approximate, ids = engine.live_index.get().search(query, 11)
    exact_of = {int(i): float(indexed.vectors[int(i)] @ query) for i in ids[0]}
    assert max(abs(s - exact_of[int(i)]) for s, i in zip(approximate[0], ids[0], strict=True)) > 1e-3
    result = engine.similar(tile_id, k=10)
    # Exact on the stored vectors (float16 segment files): the tile's query vector is stored too.
    stored = indexed.store.get_embeddings([tile_id, *(r["tile_id"] for r in result["results"])], indexed.fingerprint)
    for r, vector in zip(result["results"], stored[1:], strict=True):
        assert r["score"] == pytest.approx(float(vector @ stored[0]), abs=1e-6)
    scores = [r["score"] for r in result["results"]]
    assert len(scores) == 10 and scores == sorted(scores, reverse=True)
    assert result["exact_scores"] is True and result["index_type"] == "ivfpq"
    # The over-fetched candidates hold the exact top 10 here, so the page is the exact ranking.
    exact = [i for i, _ in _exact(indexed, query) if i != tile_id][:10]
    assert [r["tile_id"] for r in result["results"]] == exact


# --- recall at build -------------------------------------------------------------------------------


def test_each_build_records_recall_and_a_low_build_is_not_published(indexed, tiny_encoder):
    from search.core.errors import BuildRejected

    assert indexed.build["checks"]["recall_at_10"] == 1.0  # flat: exact
    assert indexed.build["checks"]["text_recall"] == 1.0  # the captions and terms were queries too
    directory = IndexDirectory(indexed.settings.data_dir / "index")
    live = directory.live_build_id()
    _pad(indexed, 2000)
    with pytest.raises(BuildRejected, match=r"recall@10 0\.\d+ .* below the floor 0.99 \(setting min_recall\)"):
        _republish(indexed, "ivf", min_recall=0.99, nprobe=1)
    assert directory.live_build_id() == live and indexed.store.live_build()["id"] == live
    assert _engine(indexed, tiny_encoder).status()["index"]["checks"]["recall_at_10"] == 1.0


# --- calibration -----------------------------------------------------------------------------------


def test_calibrated_scores_are_monotone_and_drawn_once_per_build(indexed, tiny_encoder):
    engine = _engine(indexed, tiny_encoder, max_per_slide=0)
    result = engine.search_text("dense lymphocytic infiltrate", k=len(indexed.ids))
    hits = result["results"]
    zs, pcts = [h["z"] for h in hits], [h["percentile"] for h in hits]
    assert zs == sorted(zs, reverse=True) and pcts == sorted(pcts, reverse=True)
    sample = np.load(
        IndexDirectory(indexed.settings.data_dir / "index").build_file(indexed.build["id"], CALIBRATION_FILE)
    )
    query = tiny_encoder.encode_texts(["dense lymphocytic infiltrate"])[0]
    against = sample @ query
    assert hits[0]["z"] == pytest.approx((hits[0]["score"] - against.mean()) / against.std(), abs=1e-3)
    # The best hit may be in the sample itself: its own sampled score ties with it up to float rounding
    # (another summation order), and either side of the tie is right.
    exact = float(indexed.vectors[hits[0]["tile_id"]] @ query)
    assert hits[0]["score"] == pytest.approx(exact, abs=1e-4)
    low, high = 100 * np.mean(against < exact - 1e-5), 100 * np.mean(against <= exact + 1e-5)
    assert low - 0.01 <= hits[0]["percentile"] <= high + 0.01
    calibration = result["calibration"]
    assert (
        calibration["available"]
        and calibration["sample"] == len(sample)
        and "standard deviations" in calibration["explanation"]
    )
    # Same build, another engine (a restart): the same sample, so the same calibrated scores.
    again = _engine(indexed, tiny_encoder, max_per_slide=0).search_text("dense lymphocytic infiltrate", k=3)
    assert [h["z"] for h in again["results"]] == zs[:3]


def test_no_confident_match_below_the_threshold(indexed, tiny_encoder):
    engine = _engine(indexed, tiny_encoder)
    best_z = engine.search_text("necrosis", k=5)["calibration"]["best_z"]
    assert (
        engine.search_text("necrosis", k=5, options=SearchOptions(min_confidence=best_z + 0.01))["calibration"][
            "confident"
        ]
        is False
    )
    assert (
        engine.search_text("necrosis", k=5, options=SearchOptions(min_confidence=best_z))["calibration"]["confident"]
        is True
    )
    # Page two is judged by the best hit of the whole list, not by its own.
    page2 = engine.search_text("necrosis", k=2, offset=2, options=SearchOptions(min_confidence=best_z, max_per_slide=0))
    assert page2["calibration"]["confident"] is True and page2["calibration"]["best_z"] == best_z


# --- why this hit ----------------------------------------------------------------------------------


def test_each_hit_shows_its_best_terms_and_the_query_words(indexed, tiny_encoder):
    engine = _engine(indexed, tiny_encoder)
    result = engine.search_text("cribriform glands with necrosis, grade 3", k=5)
    texts = CAPTIONS + TERMS
    text_vectors = tiny_encoder.encode_texts(texts)
    for hit in result["results"]:
        scores = text_vectors @ indexed.vectors[hit["tile_id"]]
        best = [texts[i] for i in np.argsort(-scores)[:3]]
        assert [t["text"] for t in hit["why"]] == best
        # "3" is left out: a number alone describes nothing, and would cost the text tower a pass.
        expected = ["cribriform", "glands", "necrosis", "grade"]
        words = tiny_encoder.encode_texts(expected) @ indexed.vectors[hit["tile_id"]]
        assert [w["word"] for w in hit["words"]] == expected
        assert [w["score"] for w in hit["words"]] == pytest.approx(words.tolist(), abs=1e-4)
    # Image queries have no words; their hits still say what they look like.
    image_hits = engine.search_image(indexed.image("C1/C1-S2/t1.png"), k=3)["results"]
    assert all(h["why"] and "words" not in h for h in image_hits)


@pytest.mark.parametrize("ensemble", [False, True])
def test_a_text_query_and_its_new_words_take_one_forward_pass(indexed, tiny_encoder, monkeypatch, ensemble):
    engine = _engine(indexed, tiny_encoder, prompt_ensemble=ensemble)
    passes = []
    forward = tiny_encoder.model.encode_text
    monkeypatch.setattr(tiny_encoder.model, "encode_text", lambda *a, **k: passes.append(1) or forward(*a, **k))
    text = "solid nests with keratinisation"
    hits = engine.search_text(text, k=3)["results"]
    assert len(passes) == 1
    templates = DEFAULT_TEMPLATES if ensemble else None
    np.testing.assert_allclose(
        engine.queries.query_vector(text=text).vector, tiny_encoder.encode_texts([text], templates=templates)[0],
        atol=1e-5,
    )  # fmt: skip
    words = tiny_encoder.encode_texts(["solid", "nests", "keratinisation"])
    for hit in hits:
        expected = words @ indexed.vectors[hit["tile_id"]]
        assert [w["score"] for w in hit["words"]] == pytest.approx(expected.tolist(), abs=1e-4)
    passes.clear()
    engine.search_text("keratinisation in solid nests", k=3)  # a new text whose words are known: one pass
    assert len(passes) == 1
    passes.clear()
    engine.search_text("solid", k=3)  # its one word is known already
    assert len(passes) == (1 if ensemble else 0)


def test_words_embedded_ahead_of_queries_cost_the_query_no_pass(indexed, tiny_encoder, monkeypatch):
    # What an indexing run does after embedding the corpora: their words, for per-word scores.
    assert sync_word_vectors(indexed.store, tiny_encoder, indexed.settings.data_dir, texts_changed=True) > 0
    engine = _engine(indexed, tiny_encoder)
    passes = []
    forward = tiny_encoder.model.encode_text
    monkeypatch.setattr(tiny_encoder.model, "encode_text", lambda t, **k: passes.append(len(t)) or forward(t, **k))
    hits = engine.search_text("necrosis in colonic stroma", k=3)["results"]  # words of the terms and captions
    assert passes == [1]  # one pass of one text: the query, none of its words
    words = tiny_encoder.encode_texts(["necrosis", "colonic", "stroma"])
    for hit in hits:
        expected = words @ indexed.vectors[hit["tile_id"]]
        assert [w["score"] for w in hit["words"]] == pytest.approx(expected.tolist(), abs=1e-4)
    engine.close()


def test_terms_are_cached_per_tile(engine, monkeypatch):
    engine.search_text("necrosis", k=5)
    calls = []
    original = engine.store.get_texts
    monkeypatch.setattr(engine.store, "get_texts", lambda ids: calls.append(ids) or original(ids))
    engine.search_text("necrosis", k=4)  # another page (not the cached one) of tiles already explained
    assert calls == []


def test_a_repeated_query_is_served_from_memory_until_the_build_changes(indexed, tiny_encoder, monkeypatch):
    engine = _engine(indexed, tiny_encoder)
    first = engine.search_text("necrosis", k=5)
    first["results"][0]["score"] = -1.0  # a caller (the web layer) adding to its copy changes no later answer
    searched = []
    monkeypatch.setattr(engine.pages, "_page", lambda *a: searched.append(a) or {"results": []})
    again = engine.search_text("necrosis", k=5)
    assert searched == [] and again["results"][0]["score"] > 0
    assert engine.query_log()["total"] == 2  # still logged
    engine.search_text("necrosis", k=5, offset=1)
    engine.search_text("necrosis", k=5, options=SearchOptions(max_per_slide=0))
    assert len(searched) == 2
    # A new build (any reindex publishes one) is searched afresh.
    _republish(indexed, "flat")
    engine.search_text("necrosis", k=5)
    assert len(searched) == 3


# --- spread across cases ---------------------------------------------------------------------------


def _hit(tile_id, slide, x=None, y=None, case="A", level=0):
    return {
        "tile_id": tile_id,
        "slide": slide,
        "case": case,
        "x": x,
        "y": y,
        "level": level,
        "score": 1 - tile_id / 100,
    }


def test_spread_merges_adjacent_tiles_and_caps_each_slide():
    hits = [
        _hit(1, "S1", 0, 0),
        _hit(2, "S1", 64, 64),
        _hit(3, "S1", 256, 0),
        _hit(4, "S2", case="B"),
        _hit(5, "S1", 512, 0),
        _hit(6, "S1", 128, 128),
        _hit(7, "S1", 1024, 0),
        _hit(8, None, case=None),
    ]
    steps = {("S1", 0): (64, 64)}
    out = spread(hits, max_per_slide=2, steps=steps)
    assert [r["tile_id"] for r in out.results] == [1, 3, 4, 8]
    # 2 touches 1 diagonally, 6 touches 2: one result of three tiles; 5 and 7 are past the cap.
    assert out.results[0]["merged"] == 3 and out.results[0]["merged_ids"] == [1, 2, 6]
    assert (out.merged, out.hidden) == (2, 2)
    off = spread(hits, max_per_slide=0, steps=steps)
    assert [r["tile_id"] for r in off.results] == list(range(1, 9)) and off.merged == off.hidden == 0
    other = spread(hits, max_per_slide=0, steps=steps, exclude_case="A")
    assert [r["tile_id"] for r in other.results] == [4, 8] and other.excluded == 6


def test_engine_spreads_a_page_across_slides(indexed, tiny_encoder):
    engine = _engine(indexed, tiny_encoder, max_per_slide=1)
    result = engine.search_image(indexed.image("C1/C1-S1/tile_1_1.png"), k=10)
    slides = [r["slide"] for r in result["results"]]
    assert sorted(slides) == ["C1-S1", "C1-S2", "C2-S1", "C2-S2"]
    grid = next(r for r in result["results"] if r["slide"] == "C1-S1")
    assert grid["merged"] == 9  # the whole 3 x 3 grid touches the centre tile
    assert result["spread"]["hidden"] == 7 * 3 - 3 + 0  # the other slides' tiles beyond the first
    plain = engine.search_image(indexed.image("C1/C1-S1/tile_1_1.png"), k=10, options=SearchOptions(max_per_slide=0))
    assert len(plain["results"]) == 10 and all(r["merged"] == 1 for r in plain["results"])


def test_exclude_this_case_leaves_out_the_query_patient(engine, indexed):
    tile_id = indexed.ids["C1/C1-S2/t4.png"]
    result = engine.similar(tile_id, k=30, options=SearchOptions(exclude_case=True, max_per_slide=0))
    assert {r["case"] for r in result["results"]} == {"C2"} and len(result["results"]) == 14
    assert result["spread"]["exclude_case"] == "C1" and result["spread"]["excluded"] == 15


# --- rotation / flip invariance --------------------------------------------------------------------


def test_a_rotated_query_returns_the_same_ranking_with_tta(indexed, tiny_encoder):
    engine = _engine(indexed, tiny_encoder, max_per_slide=0)
    image = indexed.image("C2/C2-S2/t5.png")
    views = [image, image.transpose(Image.Transpose.ROTATE_90), image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
             image.transpose(Image.Transpose.TRANSPOSE)]  # fmt: skip
    on = SearchOptions(tta=True)
    rankings = [[r["tile_id"] for r in engine.search_image(v, k=30, options=on)["results"]] for v in views]
    assert all(r == rankings[0] for r in rankings)
    vectors = [engine.queries.query_vector(image=v, tta=True).vector for v in views]
    assert all(np.allclose(v, vectors[0], atol=1e-5) for v in vectors)
    off = [engine.queries.query_vector(image=v, tta=False).vector for v in views]
    assert not np.allclose(off[0], off[1], atol=1e-3)  # without it the tiny model is not rotation invariant
    assert engine.search_image(image, k=3, options=on)["query"]["tta"] is True


def test_tta_defaults_to_on_only_for_a_gpu_encoder(indexed, tiny_encoder, monkeypatch):
    import torch

    assert _engine(indexed, tiny_encoder).queries.tta_default() is False  # the CPU encoder
    assert _engine(indexed, tiny_encoder, query_tta=True).queries.tta_default() is True
    assert _engine(indexed, None).queries.tta_default(load=False) is False  # a page does not build the model
    monkeypatch.setattr(tiny_encoder, "device", torch.device("cuda"))
    assert _engine(indexed, tiny_encoder).queries.tta_default() is True
    assert _engine(indexed, tiny_encoder, query_tta=False).queries.tta_default() is False


# --- composed queries ------------------------------------------------------------------------------


def test_composed_query_is_the_weighted_sum(indexed, tiny_encoder):
    engine = _engine(indexed, tiny_encoder, max_per_slide=0)
    tile_id = indexed.ids["C1/C1-S2/t2.png"]
    options = SearchOptions(plus=("necrosis",), minus=("stroma", "DCIS"), weight=0.7)
    result = engine.similar(tile_id, k=29, options=options)
    plus, stroma, dcis = tiny_encoder.encode_texts(["necrosis", "stroma", "ductal carcinoma in situ"])
    expected = indexed.vectors[tile_id] + 0.7 * plus - 0.7 * stroma - 0.7 * dcis
    expected /= np.linalg.norm(expected)
    exact = [p for p in _exact(indexed, expected) if p[0] != tile_id]
    assert [r["tile_id"] for r in result["results"]] == [i for i, _ in exact]
    assert result["query"]["plus"] == ["necrosis"] and result["query"]["minus"] == [
        "stroma",
        "ductal carcinoma in situ",
    ]
    with pytest.raises(BadQuery, match="weight"):
        engine.similar(tile_id, k=3, options=SearchOptions(plus=("x",), weight=0))


# --- uploads survive a restart, and the query log ---------------------------------------------------


def test_an_uploaded_image_permalink_survives_a_restart(indexed, tiny_encoder):
    image = indexed.image("C2/C2-S1/t0.png")
    ref = _engine(indexed, tiny_encoder).image_ref(image)
    restarted = _engine(indexed, tiny_encoder)  # a new process: nothing in memory
    assert restarted.search_image(ref, k=3)["results"][0]["tile_id"] == indexed.ids["C2/C2-S1/t0.png"]
    assert restarted.describe(image=ref, k=2)["results"]
    # The patch the result pages show (/images/uploads/{ref}.jpg) is made again from the kept upload.
    shown = restarted.upload_preview(ref)
    assert (shown["width"], shown["height"]) == image.size and shown["jpeg"][:2] == b"\xff\xd8"
    query = restarted.search_image(ref, k=1)["query"]
    assert (query["width"], query["height"]) == image.size


def test_kept_uploads_are_capped_oldest_first(indexed, tiny_encoder):
    import os

    engine = _engine(indexed, tiny_encoder, upload_store_bytes=30_000)
    refs = []
    for n, path in enumerate(["C2/C2-S1/t0.png", "C2/C2-S1/t1.png", "C2/C2-S1/t2.png"]):
        refs.append(engine.image_ref(indexed.image(path).resize((96, 96))))
        kept = engine.queries.uploads.path(refs[-1])
        os.utime(kept, ns=(n * 10**9, n * 10**9))
    folder = indexed.settings.data_dir / "uploads"
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 30_000
    assert not engine.queries.uploads.path(refs[0]).exists() and engine.queries.uploads.path(refs[-1]).exists()
    with pytest.raises(BadQuery, match="upload the image again"):
        _engine(indexed, tiny_encoder).search_image(refs[0], k=3)


def test_queries_are_logged_without_image_bytes(indexed, tiny_encoder):
    engine = _engine(indexed, tiny_encoder)
    engine.search_text("DCIS", k=4, options=SearchOptions(max_per_slide=0))
    ref = engine.image_ref(indexed.image("C1/C1-S2/t0.png"))
    engine.search_image(ref, k=2)
    log = engine.query_log()
    assert log["enabled"] and log["total"] == 2
    image, text = log["entries"]
    assert (
        text["kind"] == "text"
        and text["text"] == "DCIS"
        and text["results"] == 4
        and text["options"] == {"max_per_slide": 0, "weight": 0.5}
    )
    assert text["build_id"] == indexed.build["id"] and text["model_fingerprint"] == indexed.fingerprint
    assert image["kind"] == "image" and image["image_hash"] == ref and image["text"] is None
    off = _engine(indexed, tiny_encoder, query_log=False)
    off.search_text("necrosis", k=2)
    assert off.query_log()["total"] == 2 and off.query_log()["enabled"] is False


# --- scale -----------------------------------------------------------------------------------------


def test_hits_at_another_scale_are_flagged_and_can_be_left_out(engine, indexed):
    image = indexed.image("C1/C1-S2/t3.png")
    same = engine.search_image(image, k=5, options=SearchOptions(magnification=20))  # 0.5 um/px, like the tiles
    assert same["query_mpp"] == 0.5 and not any(r["scale_mismatch"] for r in same["results"])
    far = engine.search_image(image, k=5, options=SearchOptions(magnification=5))  # 2 um/px
    assert far["results"] and all(r["scale_mismatch"] for r in far["results"])
    assert engine.search_image(image, k=5, options=SearchOptions(magnification=5, same_scale=True))["results"] == []
    unknown = engine.search_image(image, k=5)
    assert all(r["scale_mismatch"] is None for r in unknown["results"])
    with pytest.raises(BadQuery, match="magnification"):
        options_from({"magnification": "high"})


# --- abbreviations ---------------------------------------------------------------------------------


def test_abbreviations_expand_before_embedding(indexed, tiny_encoder, tmp_path):
    engine = _engine(indexed, tiny_encoder, max_per_slide=0)
    result = engine.search_text("DCIS with TILs", k=30)
    assert result["query"] == {
        "text": "DCIS with TILs",
        "searched": "ductal carcinoma in situ with tumour-infiltrating lymphocytes",
    }
    expected = tiny_encoder.encode_texts([result["query"]["searched"]])[0]
    assert [r["tile_id"] for r in result["results"]] == [i for i, _ in _exact(indexed, expected)]
    table = tmp_path / "abbr.csv"
    table.write_text("abbreviation,expansion\nDCIS,intraductal carcinoma\nCRIB,cribriform\n")
    custom = _engine(indexed, tiny_encoder, abbreviations_file=table)
    assert custom.search_text("DCIS CRIB", k=1)["query"]["searched"] == "intraductal carcinoma cribriform"
    table.write_text("short,long\n")
    with pytest.raises(ConfigError, match="abbreviation,expansion"):
        _engine(indexed, tiny_encoder, abbreviations_file=table)
