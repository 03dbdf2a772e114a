"""`histosearch slides ...` after `histosearch index`: slide vectors are made at index time and kept in step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from search.cli import main
from search.slides.aggregate import mean_vector
from search.storage.store import Store
from tests.archives import make_tiles


@pytest.fixture
def cli(tiny_settings, tiny_model_args, monkeypatch):
    monkeypatch.setenv("HISTOSEARCH_DATA_DIR", str(tiny_settings.data_dir))
    monkeypatch.setenv("HISTOSEARCH_CACHE_DIR", str(tiny_settings.cache_dir))
    monkeypatch.setenv("HISTOSEARCH_TILE_SIZE", "64")
    return lambda *args: main([*args, *tiny_model_args])


def test_index_makes_slide_vectors_and_slides_commands_use_them(cli, tiny_settings, tmp_path, capsys):
    tiles = make_tiles(tmp_path / "tiles", 12)
    assert cli("index", str(tmp_path / "tiles"), "--quiet", "--workers", "0") == 0
    assert "slide vectors: mean 3 updated / 0 removed, medoid 3 updated / 0 removed" in capsys.readouterr().out

    assert cli("status") == 0
    assert "slide vectors: mean 3, medoid 3" in capsys.readouterr().out
    assert cli("slides", "similar", "slide0", "--json", "--same-case") == 0
    similar = json.loads(capsys.readouterr().out)
    assert similar["kind"] == "mean" and {r["slide_key"] for r in similar["results"]} == {"slide1", "slide2"}
    assert cli("slides", "similar", "slide0", "--kind", "medoid", "--same-case", "-k", "1") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("similar to slide0 by medoid: mean of the 50% of CONCH tiles nearest") and len(out) == 2

    assert cli("slides", "query", "cribriform glands", "-k", "2", "--json") == 0
    ranked = json.loads(capsys.readouterr().out)
    assert len(ranked["results"]) == 2 and ranked["results"][0]["score"] >= ranked["results"][1]["score"]

    # a reindex after a tile left its slide re-makes that slide's vector from the remaining tiles
    tiles[0].unlink()
    assert cli("reindex", "--quiet", "--workers", "0") == 0
    assert "mean 1 updated" in capsys.readouterr().out
    store = Store(tiny_settings.db_url)
    slide = store.get_slide("slide0")
    tile_ids = [t["id"] for t in store.slide_tiles(slide["id"])]
    fingerprint = store.live_build()["model_fingerprint"]
    ids, vectors = store.slide_vectors("mean")
    stored = dict(zip(ids.tolist(), vectors, strict=True))[slide["id"]]
    assert np.allclose(stored, mean_vector(store.get_embeddings(tile_ids, fingerprint)), atol=1e-6)
    store.close()


def test_slides_commands_fail_with_one_line(cli, tmp_path, capsys):
    make_tiles(tmp_path / "tiles", 3)
    assert cli("index", str(tmp_path / "tiles"), "--quiet", "--workers", "0") == 0
    capsys.readouterr()
    assert cli("slides", "similar", "nope") == 2
    assert capsys.readouterr().err.strip() == (
        "histosearch: error: no slide 'nope': `histosearch status` counts the indexed slides"
    )
    assert cli("slides", "similar", "slide0", "--kind", "wsc") == 2
    assert "no wsc slide vectors are published" in capsys.readouterr().err
