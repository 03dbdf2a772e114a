"""Slide vectors at index time and slide search: aggregation, reindex updates, live reload, similar slides,
text -> slide, heatmaps."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from indexer.slides import sync_slide_vectors, wsc_fingerprint
from search.core.errors import BadQuery, IndexUnavailable, NotFound
from search.core.settings import load_settings
from search.engine.engine import Engine
from search.engine.slides import PER_SLIDE, SlideSearch, colourise, tile_grid
from search.slides.aggregate import mean_vector, medoid_vector
from search.storage.slides import slide_index_directory
from search.wsc.bag import BagParams
from search.wsc.model import SlideEmbedding
from tests.index_fixture import build_index
from tests.slide_fixture import FINGERPRINT, PITCH, add_slide, synthetic_slides
from tests.wsc_fixture import mmm_ready, real_tiny_zip


@pytest.fixture
def settings(tmp_path):
    return load_settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", device="cpu")


@pytest.fixture
def synthetic(settings):
    slides = synthetic_slides(settings)
    yield slides
    slides.store.close()


@pytest.fixture
def search(settings, synthetic):
    sync_slide_vectors(synthetic.store, settings, FINGERPRINT)
    engine = Engine(settings, store=synthetic.store)
    yield engine.slides
    engine.close()


def test_slide_vectors_equal_the_stated_aggregations(settings, synthetic):
    report = sync_slide_vectors(synthetic.store, settings, FINGERPRINT)
    assert report.updated == {"mean": 5, "medoid": 5} and report.published == ["mean", "medoid"]
    for kind, aggregate in (("mean", mean_vector), ("medoid", medoid_vector)):
        ids, vectors = synthetic.store.slide_vectors(kind)
        for slide_id, vector in zip(ids, vectors, strict=True):
            key = next(k for k, v in synthetic.slide_ids.items() if v == slide_id)
            tiles = np.stack([synthetic.vectors[t] for t in synthetic.tiles[key]])
            assert np.allclose(vector, aggregate(tiles), atol=1e-3)  # tile vectors are stored as float16
    kinds = synthetic.store.slide_vector_kinds()
    assert kinds["mean"]["model_fingerprint"] == FINGERPRINT and kinds["medoid"]["method"] == "medoid(fraction=0.5)"


def test_reindex_updates_only_changed_slides_and_drops_emptied_ones(settings, synthetic):
    store = synthetic.store
    sync_slide_vectors(store, settings, FINGERPRINT)
    again = sync_slide_vectors(store, settings, FINGERPRINT)
    assert again.updated == {"mean": 0, "medoid": 0} and again.published == []
    # a new tile on A-1 moves its vectors and only its vectors
    row = {"source_id": synthetic.source_id, "locator": "A-1/new.png", "path": "A-1/new.png",
           "slide_id": synthetic.slide_ids["A-1"], "x": 0, "y": 3 * PITCH, "width": 224, "height": 224,
           "content_hash": "new", "fingerprint": "f", "meta": {}}  # fmt: skip
    new_vector = np.eye(16, dtype=np.float32)[5:6]
    store.add_tiles([row], new_vector, FINGERPRINT)
    before = dict(zip(*store.slide_vectors("mean"), strict=True))
    report = sync_slide_vectors(store, settings, FINGERPRINT)
    assert report.updated == {"mean": 1, "medoid": 1}
    after = dict(zip(*store.slide_vectors("mean"), strict=True))
    tiles = np.stack([synthetic.vectors[t] for t in synthetic.tiles["A-1"]] + [new_vector[0]])
    assert np.allclose(after[synthetic.slide_ids["A-1"]], mean_vector(tiles), atol=1e-3)  # float16 storage
    assert all(np.array_equal(before[s], after[s]) for s in before if s != synthetic.slide_ids["A-1"])
    # a slide whose tiles all left has no vector any more
    store.delete_tiles(synthetic.tiles["D-1"])
    report = sync_slide_vectors(store, settings, FINGERPRINT)
    assert report.removed == {"mean": 1, "medoid": 1}
    assert synthetic.slide_ids["D-1"] not in store.slide_vectors("mean")[0]
    # another model re-makes every vector
    assert sync_slide_vectors(store, settings, "other-model").updated == {"mean": 0, "medoid": 0}


def test_similar_slides_follow_the_known_mixtures_and_leave_the_case_out(search, synthetic):
    result = search.similar("A-1", kind="mean", k=3)
    keys = [r["slide_key"] for r in result["results"]]
    assert keys[0] == "B-1" and "A-2" not in keys  # nearest mixture from another case; same case left out
    assert keys[1] == "C-1"  # shares prototype 1 with A-1; D-1 shares nothing
    assert result["method"]["description"].startswith("mean of the slide's CONCH tile vectors")
    with_case = search.similar("A-1", kind="mean", k=2, same_case=True)
    assert [r["slide_key"] for r in with_case["results"]] == ["A-2", "B-1"]
    # the medoid variant keeps the majority tissue only: and B-1 are all "prototype 0" slides
    medoid = search.similar("A-1", kind="medoid", k=2, same_case=True)
    assert {r["slide_key"] for r in medoid["results"]} == {"A-2", "B-1"}
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(IndexUnavailable, match="no wsc slide vectors are published"):
        search.similar("A-1", kind="wsc")
    with pytest.raises(BadQuery, match="unknown slide-vector kind"):
        search.similar("A-1", kind="max")
    with pytest.raises(NotFound, match="no slide 'Z-9'"):
        search.similar("Z-9")


def test_live_reload_picks_up_new_slide_vectors(settings, search, synthetic):
    assert "E-1" not in [r["slide_key"] for r in search.similar("D-1", k=10, same_case=True)["results"]]
    first_build = slide_index_directory(settings.data_dir, "mean").live_build_id()
    add_slide(synthetic.store, synthetic.source_id, "E-1", "case-E", {3: 10}, seed=99)
    sync_slide_vectors(synthetic.store, settings, FINGERPRINT)
    assert slide_index_directory(settings.data_dir, "mean").live_build_id() == first_build + 1
    # the same SlideSearch (a running server) answers from the new build
    assert search.similar("D-1", k=1)["results"][0]["slide_key"] == "E-1"


def test_heatmap_values_are_the_per_tile_scores_and_the_png_is_the_grid(search, synthetic):
    query_tile = synthetic.tiles["C-1"][0]
    heatmap = search.heatmap("A-1", tile_id=query_tile)
    assert heatmap["grid"] == {"rows": 3, "cols": 4, "pitch": float(PITCH)}
    q = synthetic.vectors[query_tile]
    by_tile = {c["tile_id"]: c for c in heatmap["cells"]}
    assert sorted(by_tile) == sorted(synthetic.tiles["A-1"])
    for n, tile_id in enumerate(synthetic.tiles["A-1"]):
        assert by_tile[tile_id]["score"] == pytest.approx(
            float(synthetic.vectors[tile_id] @ q), abs=1e-3
        )  # float16 storage
        assert (by_tile[tile_id]["row"], by_tile[tile_id]["col"]) == (n // 4, n % 4)
    png = Image.open(io.BytesIO(SlideSearch.heatmap_png(heatmap)))
    assert png.size == (4, 3) and png.mode == "RGBA"
    best = max(heatmap["cells"], key=lambda c: c["score"])
    assert png.getpixel((best["col"], best["row"])) == (*colourise(np.array([1.0]))[0], 255)
    assert png.getpixel((3, 2))[3] == 0  # 10 tiles on a 4 x 3 grid: the last two cells are empty
    with pytest.raises(BadQuery, match="exactly one query"):
        search.heatmap("A-1")


def test_slide_page_data_has_grid_cells_and_kinds(search, synthetic):
    page = search.slide("A-1")
    assert page["slide_key"] == "A-1" and page["case_key"] == "case-A" and page["n_tiles"] == 10
    assert page["grid"]["extent"] == [4 * PITCH, 3 * PITCH]
    assert set(page["kinds"]) == {"mean", "medoid"}
    assert {t["tile_id"] for t in page["tiles"]} == set(synthetic.tiles["A-1"])


def test_tile_grid_pitch_and_positionless_tiles():
    tiles = [{"id": i, "x": x, "y": y, "width": 10} for i, (x, y) in enumerate([(0, 0), (896, 0), (448, 448)])]
    grid = tile_grid(tiles)
    assert (grid["rows"], grid["cols"], grid["pitch"]) == (2, 3, 448.0)
    assert grid["cells"] == {0: (0, 0), 1: (0, 2), 2: (1, 1)}
    assert tile_grid([{"id": 1, "x": None, "y": None, "width": 5}]) is None


@pytest.fixture
def indexed_search(tiny_settings, tiny_encoder, tmp_path):
    indexed = build_index(tiny_settings, tiny_encoder, tmp_path / "tiles")
    sync_slide_vectors(indexed.store, tiny_settings, indexed.fingerprint)
    engine = Engine(tiny_settings, store=indexed.store, encoder=tiny_encoder)
    yield indexed, engine.slides, tiny_encoder
    engine.close()


def test_text_to_slide_is_the_mean_of_each_slides_best_tile_scores(indexed_search):
    indexed, search, encoder = indexed_search
    result = search.search_text("cribriform glands", k=4)
    q = encoder.encode_texts(["cribriform glands"])[0]
    tiles = {t["id"]: t for t in indexed.store.get_tiles(list(indexed.vectors))}
    expected = {}
    for tile_id, vector in indexed.vectors.items():
        expected.setdefault(tiles[tile_id]["slide_key"], []).append(float(vector @ q))
    expected = {k: float(np.mean(sorted(v, reverse=True)[:PER_SLIDE])) for k, v in expected.items()}
    got = {r["slide_key"]: r["score"] for r in result["results"]}
    assert got == pytest.approx(expected, abs=1e-5)
    assert [r["slide_key"] for r in result["results"]] == sorted(expected, key=lambda k: -expected[k])
    assert all(len(r["best_tiles"]) == PER_SLIDE for r in result["results"])


def test_text_heatmap_and_attention_ranking(indexed_search):
    indexed, search, encoder = indexed_search
    q = encoder.encode_texts(["necrosis"])[0]
    heatmap = search.heatmap("C1-S1", text="necrosis")
    for cell in heatmap["cells"]:
        assert cell["score"] == pytest.approx(float(indexed.vectors[cell["tile_id"]] @ q), abs=1e-5)
    with pytest.raises(IndexUnavailable, match="no WSC slide vectors"):
        search.search_text("necrosis", method="attention")
    # WSC attention on two slides: the score is the attention-weighted mean of tile scores
    store = indexed.store
    weights = {}
    for key in ("C1-S1", "C2-S1"):
        slide = store.get_slide(key)
        ids = [t["id"] for t in store.slide_tiles(slide["id"])]
        w = np.linspace(1, 2, len(ids)).astype(np.float32)
        w /= w.sum()
        weights[key] = dict(zip(ids, w, strict=True))
        vector = np.ones(4, np.float32) / 2
        store.set_slide_vector(slide["id"], "wsc", vector, model_fingerprint="wsc:x", method="wsc",
                               tiles_digest="d", n_tiles=len(ids), attention=(np.array(ids), w))  # fmt: skip
    result = search.search_text("necrosis", method="attention", k=5)
    assert {r["slide_key"] for r in result["results"]} == {"C1-S1", "C2-S1"}
    for r in result["results"]:
        expected = sum(w * float(indexed.vectors[t] @ q) for t, w in weights[r["slide_key"]].items())
        assert r["score"] == pytest.approx(expected, abs=1e-5)


class _FakeWsc:
    """Stands in for the WSC model: the slide vector is the bag's mean colour, attention the crops' brightness."""

    def __init__(self) -> None:
        self.bags: list[torch.Tensor] = []

    def embed_bag(self, bag: torch.Tensor) -> SlideEmbedding:
        self.bags.append(bag)
        brightness = bag.mean(dim=(1, 2, 3))
        return SlideEmbedding(bag.mean(dim=(0, 2, 3)), brightness / brightness.sum())


def test_wsc_vectors_from_re_read_tiles_with_attention_per_tile(tiny_settings, tiny_encoder, tmp_path):
    weights = tmp_path / "WSC-MTL-tiny.pt.zip"
    weights.write_bytes(b"stand-in weights")
    settings = tiny_settings.model_copy(update={"wsc_weights": weights, "wsc_max_tiles": 5})
    indexed = build_index(settings, tiny_encoder, tmp_path / "tiles")
    fake = _FakeWsc()
    calls = []

    def loader(path: Path, cache_dir, trusted, device):
        calls.append(path)
        return fake, "ab" * 32

    report = sync_slide_vectors(indexed.store, settings, indexed.fingerprint, wsc_loader=loader)
    assert report.updated["wsc"] == 4 and "wsc" in report.published
    assert all(bag.shape == (5, 3, 224, 224) for bag in fake.bags)  # 7 or 9 tiles, capped at 5 crops
    slide = indexed.store.get_slide("C1-S1")
    ids, vectors = indexed.store.slide_vectors("wsc")
    attention = indexed.store.slide_attention([slide["id"]])[slide["id"]]
    assert set(attention) == {t["id"] for t in indexed.store.slide_tiles(slide["id"])}
    assert sum(attention.values()) == pytest.approx(1.0)
    assert sum(w > 0 for w in attention.values()) == 5  # the 4 tiles left out of the bag get no attention
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    fingerprint = indexed.store.slide_vector_digests("wsc")[slide["id"]][1]
    assert fingerprint == wsc_fingerprint(hashlib.sha256(b"stand-in weights").hexdigest(), BagParams(0.5, 5, 0))
    # nothing changed: the model is not even loaded
    again = sync_slide_vectors(indexed.store, settings, indexed.fingerprint, wsc_loader=loader)
    assert again.updated["wsc"] == 0 and len(calls) == 1
    # another seed is another bag: every WSC vector is re-made
    reseeded = settings.model_copy(update={"wsc_seed": 1})
    assert sync_slide_vectors(indexed.store, reseeded, indexed.fingerprint, wsc_loader=loader).updated["wsc"] == 4


def test_missing_wsc_weights_is_reported_not_fatal(settings, synthetic, tmp_path):
    missing = settings.model_copy(update={"wsc_weights": tmp_path / "nope.pt.zip"})
    report = sync_slide_vectors(synthetic.store, missing, FINGERPRINT)
    assert any("no such WSC weights file" in e for e in report.errors)


@pytest.mark.skipif(mmm_ready() is not None, reason=str(mmm_ready()))
def test_wsc_vectors_at_index_time_with_real_mmm_classes(tiny_settings, tiny_encoder, tmp_path):
    weights = tmp_path / "tiny.pt.zip"
    real_tiny_zip(weights)
    settings = tiny_settings.model_copy(update={"wsc_weights": weights, "wsc_max_tiles": 6})
    indexed = build_index(settings, tiny_encoder, tmp_path / "tiles")
    report = sync_slide_vectors(indexed.store, settings, indexed.fingerprint)
    assert report.updated["wsc"] == 4 and report.errors == []
    engine = Engine(settings, store=indexed.store, encoder=tiny_encoder)
    result = engine.slides.similar("C1-S1", kind="wsc", k=3, same_case=True)
    assert len(result["results"]) == 3 and result["method"]["model_fingerprint"].startswith("wsc:")
    ranked = engine.slides.search_text("necrosis", method="attention", k=4)
    assert len(ranked["results"]) == 4
    engine.close()
