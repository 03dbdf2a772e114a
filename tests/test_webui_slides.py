"""The slide pages and their JSON twins over a small real index with slide vectors."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.slides import sync_slide_vectors
from search.engine.engine import Engine
from tests.index_fixture import build_index, tile_image
from webui.app import create_app


@pytest.fixture
def client(tiny_settings, tiny_encoder, tmp_path):
    indexed = build_index(tiny_settings, tiny_encoder, tmp_path / "tiles")
    sync_slide_vectors(indexed.store, tiny_settings, indexed.fingerprint)
    engine = Engine(tiny_settings, store=indexed.store, encoder=tiny_encoder)
    with TestClient(create_app(tiny_settings, engine)) as client:
        client.indexed = indexed
        yield client


def _slide_id(client, key: str) -> int:
    return client.indexed.store.get_slide(key)["id"]


def test_text_to_slide_json_and_page(client):
    answer = client.get("/api/slides/search", params={"q": "necrosis", "k": 3}).json()
    assert answer["method"] == "tiles" and len(answer["results"]) == 3
    first = answer["results"][0]
    assert first["url"] == f"/slides/{first['id']}" and first["thumbnail_url"] == f"/slides/{first['id']}/thumbnail.jpg"
    assert all(t["url"] == f"/tiles/{t['tile_id']}" for t in first["best_tiles"])
    page = client.get("/slides", params={"q": "necrosis", "k": 3})
    assert page.status_code == 200
    assert re.findall(r'data-slide-id="(\d+)"', page.text) == [str(r["id"]) for r in answer["results"]]
    assert client.get("/api/slides/search", params={"q": "x", "method": "max"}).json()["error"]["code"] == "bad_query"


def test_slide_json_has_similar_slides_by_kind_and_a_heatmap(client):
    slide_id = _slide_id(client, "C1-S1")
    answer = client.get(f"/api/slides/{slide_id}", params={"q": "necrosis"}).json()
    assert answer["slide_key"] == "C1-S1" and answer["grid"]["rows"] == 3 and answer["grid"]["cols"] == 3
    assert set(answer["similar"]) == {"mean", "medoid"}
    for kind, result in answer["similar"].items():
        keys = [r["slide_key"] for r in result["results"]]
        assert "C1-S2" not in keys and set(keys) == {"C2-S1", "C2-S2"}  # own case left out
        assert result["method"]["method"].startswith(kind)
    with_case = client.get(f"/api/slides/{slide_id}/similar", params={"kind": "mean", "same_case": "true"}).json()
    assert "C1-S2" in [r["slide_key"] for r in with_case["results"]]
    heatmap = answer["heatmap"]
    assert len(heatmap["cells"]) == 9 and heatmap["png_url"] == f"/slides/{slide_id}/heatmap.png?q=necrosis"
    by_key = client.get("/api/slides/C1-S1/heatmap", params={"q": "necrosis"}).json()
    assert [c["score"] for c in by_key["cells"]] == [c["score"] for c in heatmap["cells"]]


def test_heatmap_png_is_the_size_of_the_grid(client):
    tile_id = client.indexed.ids["C2/C2-S1/t0.png"]
    response = client.get(f"/slides/{_slide_id(client, 'C1-S1')}/heatmap.png", params={"tile": tile_id})
    assert response.headers["content-type"] == "image/png"
    png = Image.open(io.BytesIO(response.content))
    assert png.size == (3, 3)
    # the brightest (highest) cell is the tile most similar to the query tile
    heatmap = client.get("/api/slides/C1-S1/heatmap", params={"tile": tile_id}).json()
    best = max(heatmap["cells"], key=lambda c: c["score"])
    values = np.asarray(png.convert("RGB"), dtype=int).sum(axis=2)
    assert np.unravel_index(values.argmax(), values.shape) == (best["row"], best["col"])


def test_slide_page_draws_the_heatmap_cells_as_links_to_their_tiles(client):
    slide_id = _slide_id(client, "C1-S1")
    page = client.get(f"/slides/{slide_id}", params={"q": "necrosis"})
    assert page.status_code == 200
    cells = re.findall(r'<a href="/tiles/(\d+)" class="cell" data-tile-id="\d+" data-score="([-\d.]+)"', page.text)
    heatmap = client.get(f"/api/slides/{slide_id}/heatmap", params={"q": "necrosis"}).json()
    assert {int(t): float(s) for t, s in cells} == pytest.approx(
        {c["tile_id"]: c["score"] for c in heatmap["cells"]}, abs=1e-4
    )
    assert 'id="heat"' in page.text and f"/slides/{slide_id}/thumbnail.jpg" in page.text
    assert "mean of the slide&#39;s CONCH tile vectors" in page.text  # the method is named


def test_thumbnail_is_a_mosaic_of_the_grid_for_tile_folders(client):
    response = client.get(f"/slides/{_slide_id(client, 'C1-S1')}/thumbnail.jpg")
    image = Image.open(io.BytesIO(response.content))
    assert response.headers["content-type"] == "image/jpeg" and image.size[0] == image.size[1] > 0


def test_patch_upload_redirects_to_its_heatmap(client):
    buffer = io.BytesIO()
    tile_image(3).save(buffer, format="PNG")
    slide_id = _slide_id(client, "C1-S1")
    response = client.post(f"/slides/{slide_id}/heatmap/image", files={"image": ("p.png", buffer.getvalue())},
                           follow_redirects=False)  # fmt: skip
    assert response.status_code == 303 and response.headers["location"].startswith(f"/slides/{slide_id}?image=")
    page = client.get(response.headers["location"])
    assert "the uploaded patch" in page.text and page.text.count('class="cell"') == 9


def test_errors_have_the_api_shape(client):
    assert client.get("/api/slides/9999").json()["error"]["code"] == "not_found"
    no_grid = client.get("/api/slides/C1-S2/heatmap", params={"q": "necrosis"}).json()
    assert no_grid["error"]["code"] == "bad_query" and "no grid positions" in no_grid["error"]["message"]
    assert client.get("/api/slides/C1-S1/heatmap").json()["error"]["message"].startswith("a heatmap needs")
    assert "no grid positions" in client.get("/slides/C1-S2").text


def test_status_lists_the_slide_vector_kinds(client):
    status = client.get("/api/status").json()
    assert set(status["slide_vectors"]) == {"mean", "medoid"}
    assert status["slide_vectors"]["mean"]["count"] == 4
    assert "slide vectors: medoid" in client.get("/status").text
