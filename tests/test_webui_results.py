"""Issue 10 in the web UI and JSON API: result options as parameters, calibrated pages, export, image -> text
for uploads, kept uploads, the query log, and build checks on the status page."""

from __future__ import annotations

import csv
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from search.engine.engine import Engine
from tests.index_fixture import build_index
from webui.app import create_app


@pytest.fixture
def indexed(tiny_settings, tiny_encoder, tmp_path):
    return build_index(tiny_settings, tiny_encoder, tmp_path / "tiles")


def _client(indexed, encoder, **overrides) -> TestClient:
    settings = indexed.settings.model_copy(update=overrides)
    return TestClient(create_app(settings, Engine(settings, store=indexed.store, encoder=encoder)))


@pytest.fixture
def client(indexed, tiny_encoder):
    return _client(indexed, tiny_encoder)


def _png(path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).save(buffer, "PNG")
    return buffer.getvalue()


def test_options_are_query_parameters_of_every_search(client, indexed):
    tile_id = indexed.ids["C1/C1-S2/t1.png"]
    answer = client.get(f"/api/similar/{tile_id}", params={"exclude_case": 1, "max_per_slide": 0, "k": 30}).json()
    assert {r["case"] for r in answer["results"]} == {"C2"} and answer["options"]["exclude_case"] is True
    spread = client.get("/api/search", params={"q": "gland", "max_per_slide": 1, "k": 30}).json()
    assert len(spread["results"]) == 4 and spread["spread"]["max_per_slide"] == 1
    composed = client.get(
        "/api/search", params=[("q", "gland"), ("plus", "necrosis"), ("minus", "stroma"), ("weight", "0.3")]
    )
    assert composed.json()["query"]["plus"] == ["necrosis"] and composed.json()["query"]["minus"] == ["stroma"]
    bad = client.get("/api/search", params={"q": "gland", "max_per_slide": -1})
    assert bad.status_code == 400 and "max_per_slide" in bad.json()["error"]["message"]
    cases = client.get("/api/cases", params={"tile": tile_id, "plus": "necrosis"}).json()
    assert cases["query"]["plus"] == ["necrosis"]


def test_a_page_says_no_confident_match_and_shows_what_was_searched(client):
    page = client.get("/", params={"q": "DCIS", "min_confidence": 1000}).text
    assert "No confident match" in page and "Show the" in page
    assert "Searched for: <q>ductal carcinoma in situ</q>" in page
    assert "standard deviations" in page  # the one-line explanation
    assert 'class="cosine muted"' in page and "looks like:" in page
    confident = client.get("/", params={"q": "DCIS", "min_confidence": 0}).text
    assert "No confident match" not in confident


def test_export_this_page_as_csv(client, indexed):
    page = client.get("/", params={"q": "gland", "k": 12, "max_per_slide": 0}).text
    assert 'href="/api/search?q=gland&amp;max_per_slide=0&amp;k=12&amp;offset=0&amp;format=csv"' in page
    answer = client.get("/api/search", params={"q": "gland", "k": 12, "max_per_slide": 0, "format": "csv"})
    assert (
        answer.headers["content-type"].startswith("text/csv") and "attachment" in answer.headers["content-disposition"]
    )
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    api = client.get("/api/search", params={"q": "gland", "k": 12, "max_per_slide": 0}).json()["results"]
    assert [int(r["tile_id"]) for r in rows] == [r["tile_id"] for r in api]
    assert float(rows[0]["score"]) == pytest.approx(api[0]["score"]) and rows[0]["why"] and rows[0]["url"]
    similar = client.get(f"/api/similar/{api[0]['tile_id']}", params={"format": "csv", "k": 3})
    assert len(list(csv.DictReader(io.StringIO(similar.text)))) == 3


def test_exported_cells_cannot_run_spreadsheet_formulas():
    from webui.export import csv_response

    hit = {"rank": 1, "tile_id": 7, "score": 0.5, "path": '=HYPERLINK("x")', "case": "-1+1", "meta": {}, "why": []}
    rows = list(csv.DictReader(io.StringIO(csv_response({"results": [hit]}, "x.csv").body.decode())))
    assert rows[0]["path"] == '\'=HYPERLINK("x")' and rows[0]["case"] == "'-1+1" and rows[0]["score"] == "0.5"


def test_upload_keeps_options_and_the_image_page_describes_it(client, indexed):
    path = indexed.folder / "C2/C2-S2/t3.png"
    answer = client.post(
        "/search/image",
        files={"image": ("q.png", _png(path), "image/png")},
        data={"tta": ["0", "1"], "magnification": "20", "k": "12"},
        follow_redirects=False,
    )
    location = answer.headers["location"]
    assert answer.status_code == 303 and "tta=1" in location and "magnification=20" in location
    page = client.get(location).text
    ref = location.split("image=")[1].split("&")[0]
    assert f'src="/images/uploads/{ref}.jpg"' in page and "Looks like:" in page
    assert 'name="plus"' in page and 'name="minus"' in page and 'name="tta" value="1" checked' in page
    kept = client.get(f"/images/uploads/{ref}.jpg")
    assert kept.status_code == 200 and kept.headers["content-type"] == "image/jpeg"
    assert client.get("/images/uploads/0123456789abcdef0123.jpg").status_code == 404
    described = client.get("/api/describe", params={"image": ref, "k": 3}).json()
    assert described["query"]["image"] == ref and len(described["results"]) == 3
    posted = client.post("/api/describe/image", files={"image": ("q.png", _png(path), "image/png")}, data={"k": "2"})
    assert [r["text"] for r in posted.json()["results"]] == [r["text"] for r in described["results"][:2]]


def test_query_log_page_and_api(client, indexed):
    client.get("/api/search", params={"q": "necrosis", "case": "C1"})
    log = client.get("/api/query-log").json()
    assert log["enabled"] and log["total"] == 1
    assert log["entries"][0]["text"] == "necrosis" and log["entries"][0]["filters"] == {"case": "C1"}
    page = client.get("/query-log").text
    assert "necrosis" in page and "Query log" in page


def test_status_shows_the_builds_recall(client):
    assert client.get("/api/status").json()["index"]["checks"]["recall_at_10"] == 1.0
    assert "1.000 against exact search" in client.get("/status").text
