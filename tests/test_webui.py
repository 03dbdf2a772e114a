"""The web UI and JSON API in process (FastAPI TestClient) over a real small index."""

from __future__ import annotations

import hashlib
import io
import re

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from search.engine.engine import Engine
from search.engine.filters import Filters
from tests.archives import bomb_png
from tests.index_fixture import HOSTILE, build_index
from webui import server
from webui.app import create_app
from webui.privacy import redact_paths


@pytest.fixture
def indexed(tiny_settings, tiny_encoder, tmp_path):
    # Paging and twin tests see the plain ranking; spreading has its own tests (test_webui_results.py).
    settings = tiny_settings.model_copy(update={"max_per_slide": 0})
    return build_index(settings, tiny_encoder, tmp_path / "tiles")


def _client(indexed, encoder, **overrides) -> tuple[TestClient, Engine]:
    settings = indexed.settings.model_copy(update=overrides)
    engine = Engine(settings, store=indexed.store, encoder=encoder)
    return TestClient(create_app(settings, engine)), engine


@pytest.fixture
def client(indexed, tiny_encoder):
    client, _ = _client(indexed, tiny_encoder)
    return client


@pytest.fixture
def engine(client) -> Engine:
    return client.app.state.engine


def _tile_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'data-tile-id="(\d+)"', html)]


def _unlinked(answer, links: list[tuple[str, str, int]] | None = None):
    """``answer`` without its ``*_url`` fields, which are collected in ``links`` as (field, url, tile id)."""
    links = [] if links is None else links
    if isinstance(answer, list):
        return [_unlinked(item, links) for item in answer]
    if not isinstance(answer, dict):
        return answer
    links += [(key, value, answer.get("tile_id")) for key, value in answer.items() if key.endswith("url")]
    return {key: _unlinked(value, links) for key, value in answer.items() if not key.endswith("url")}


def _twin(api_answer: dict, engine_answer: dict) -> list[tuple[str, str, int]]:
    """Check that the API served the engine's answer with links added, and that every tile links to
    its page and thumbnail; returns the links."""
    links: list[tuple[str, str, int]] = []
    assert _unlinked(api_answer, links) == engine_answer
    expected = {"url": "/tiles/{}", "thumbnail_url": "/images/thumbs/{}.jpg", "image_url": "/images/tiles/{}.jpg"}
    for key, url, tile_id in links:
        # Image URLs name their content (?v=), so a rebuilt index never shows a stale cached image.
        bare, _, version = url.partition("?v=")
        assert bare == expected[key].format(tile_id) and (bool(version) == (key != "url"))
    assert not [key for key, _, _ in links if key not in expected]
    linked = {tile_id for key, _, tile_id in links if key == "url"}
    assert linked == {tile_id for key, _, tile_id in links if key == "thumbnail_url"}
    return links


def _png(size: tuple[int, int] = (64, 64), colour: str = "purple") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def test_search_page_and_its_json_twin(client, engine):
    page = client.get("/", params={"q": "cribriform glands", "k": 12})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    api = client.get("/api/search", params={"q": "cribriform glands", "k": 12})
    links = _twin(api.json(), engine.search_text("cribriform glands", k=12))
    assert {tile_id for _, _, tile_id in links} == {r["tile_id"] for r in api.json()["results"]}
    assert _tile_ids(page.text) == [r["tile_id"] for r in api.json()["results"]]
    for r in api.json()["results"]:
        assert f'href="/similar/{r["tile_id"]}"' in page.text
        assert f'href="/tiles/{r["tile_id"]}?back=' in page.text
    # Text search is a plain GET form: it works with JavaScript off.
    assert re.search(r'<form[^>]*method="get" action="/"', page.text) and 'name="q"' in page.text


def test_front_page_offers_examples_and_filters(client):
    page = client.get("/").text
    assert page.count('href="/?q=') >= 4
    assert 'name="case"' in page and 'name="slide"' in page and 'name="meta.organ"' in page
    assert 'enctype="multipart/form-data"' in page and 'type="file"' in page
    assert '<script src="/static/upload.js"' in page


def test_similar_page_and_twin(client, engine, indexed):
    tile_id = indexed.ids["C1/C1-S1/tile_0_1.png"]
    page = client.get(f"/similar/{tile_id}")
    api = client.get(f"/api/similar/{tile_id}")
    _twin(api.json(), engine.similar(tile_id))
    assert _tile_ids(page.text) == [r["tile_id"] for r in api.json()["results"]]
    assert tile_id not in _tile_ids(page.text)


def test_cases_page_and_twin(client, engine, indexed):
    page = client.get("/cases", params={"q": "gland"})
    api = client.get("/api/cases", params={"q": "gland"})
    links = _twin(api.json(), engine.cases(text="gland"))
    case_tiles = {t["tile_id"] for c in api.json()["results"] for s in c["slides"] for t in s["tiles"]}
    assert case_tiles and {tile_id for _, _, tile_id in links} == case_tiles
    assert re.findall(r'data-case="([^"]+)"', page.text) == [c["case"] for c in api.json()["results"]]
    tile_id = indexed.ids["C2/C2-S1/t2.png"]
    _twin(client.get("/api/cases", params={"tile": tile_id}).json(), engine.cases(tile_id=tile_id))
    assert client.get("/cases", params={"tile": tile_id}).status_code == 200
    assert client.get("/api/cases").status_code == 400


def test_tile_page_and_twins(client, engine, indexed):
    tile_id = indexed.ids["C1/C1-S1/tile_1_1.png"]
    page = client.get(f"/tiles/{tile_id}")
    assert page.status_code == 200
    tile = client.get(f"/api/tiles/{tile_id}").json()
    links = _twin(tile, redact_paths(engine.tile(tile_id)))
    assert ("image_url", f"/images/tiles/{tile_id}.jpg", tile_id) in [(k, u.split("?")[0], i) for k, u, i in links]
    assert {n["tile_id"] for n in tile["neighbours"]} | {tile_id} == {i for key, _, i in links if key == "url"}
    describe = client.get(f"/api/tiles/{tile_id}/describe", params={"k": 4}).json()
    assert describe == engine.describe(tile_id=tile_id, k=4)
    assert f'src="/images/tiles/{tile_id}.jpg?v=' in page.text
    assert page.text.count("/images/thumbs/") == 9  # the 3 x 3 neighbourhood
    for text in engine.describe(tile_id=tile_id, k=3)["results"]:
        assert text["text"] in page.text.replace("&lt;", "<").replace("&gt;", ">").replace("&#39;", "'")
    terms = client.get(f"/api/tiles/{tile_id}/describe", params={"corpus": "terms"}).json()
    assert {r["corpus"] for r in terms["results"]} == {"terms"}


def test_status_page_and_twin(client, engine):
    page = client.get("/status")
    assert page.status_code == 200
    assert client.get("/api/status").json() == redact_paths(engine.status())
    assert "flat" in page.text and "conch_tiny" in page.text


def test_openapi_lists_the_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/api/search",
        "/api/search/image",
        "/api/similar/{tile_id}",
        "/api/cases",
        "/api/cases/image",
        "/api/tiles/{tile_id}",
        "/api/tiles/{tile_id}/describe",
        "/api/status",
    ):
        assert path in paths


def test_image_upload_finds_the_tile(client, engine, indexed):
    path = "C2/C2-S2/t4.png"
    data = (indexed.folder / path).read_bytes()
    api = client.post("/api/search/image", files={"image": ("query.png", data, "image/png")}, data={"k": "5"})
    assert api.status_code == 200
    assert api.json()["results"][0]["tile_id"] == indexed.ids[path]
    filtered = client.post(
        "/api/search/image", files={"image": ("q.png", data, "image/png")}, data={"case": "C1", "meta.organ": "breast"}
    )
    assert {r["case"] for r in filtered.json()["results"]} == {"C1"}
    # The page form posts, then redirects to a GET page that can be reloaded and paged.
    posted = client.post("/search/image", files={"image": ("q.png", data, "image/png")}, follow_redirects=False)
    assert posted.status_code == 303
    page = client.get(posted.headers["location"])
    assert _tile_ids(page.text)[0] == indexed.ids[path]
    ref = api.json()["query"]["image"]
    assert client.get("/api/search", params={"image": ref, "k": 5}).json() == api.json()
    _twin(api.json(), engine.search_image(ref, k=5))
    cases = client.post("/cases/image", files={"image": ("q.png", data, "image/png")}, follow_redirects=False)
    assert cases.status_code == 303 and "/cases?image=" in cases.headers["location"]
    assert client.get(cases.headers["location"]).status_code == 200
    posted_cases = client.post("/api/cases/image", files={"image": ("q.png", data, "image/png")}).json()
    assert posted_cases["results"]
    _twin(posted_cases, engine.cases(image=ref))


def test_filters_are_get_parameters(client, engine):
    api = client.get("/api/search", params={"q": "gland", "k": 50, "case": "C2", "meta.organ": "colon", "slide": ""})
    _twin(api.json(), engine.search_text("gland", k=50, filters=Filters(case="C2", meta={"organ": "colon"})))
    assert {r["case"] for r in api.json()["results"]} == {"C2"}
    page = client.get("/", params={"q": "gland", "case": "C2"}).text
    assert re.search(r'<option value="C2" selected>C2 · \d+</option>', page)
    # A filter left at "any" is not carried in the URL: the page redirects to the URL without it.
    empty = client.get("/", params={"q": "gland", "case": "", "slide": ""}, follow_redirects=False)
    assert empty.status_code == 303 and empty.headers["location"] == "/?q=gland"


def test_paging_links(client, engine):
    first = client.get("/", params={"q": "gland", "k": 12}).text
    assert 'rel="next"' in first and 'rel="prev"' not in first
    second_url = re.search(r'href="([^"]+)" rel="next"', first).group(1).replace("&amp;", "&")
    assert "offset=12" in second_url
    second = client.get(second_url).text
    assert 'rel="prev"' in second
    assert _tile_ids(second) == [r["tile_id"] for r in engine.search_text("gland", k=12, offset=12)["results"]]
    last = client.get("/", params={"q": "gland", "k": 12, "offset": 24}).text
    assert 'rel="next"' not in last and len(_tile_ids(last)) == 6


def test_images_by_id_with_cache_headers(client, engine, indexed):
    tile_id = indexed.ids["C1/C1-S2/t3.png"]
    # The URL the pages link names the content: cached for good. A bare id is revalidated each time.
    versioned = client.get(f"/api/tiles/{tile_id}").json()["thumbnail_url"]
    assert versioned.startswith(f"/images/thumbs/{tile_id}.jpg?v=")
    cached = client.get(versioned)
    assert "immutable" in cached.headers["cache-control"] and "max-age=31536000" in cached.headers["cache-control"]
    thumb = client.get(f"/images/thumbs/{tile_id}.jpg")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert "no-cache" in thumb.headers["cache-control"] and thumb.content == cached.content
    assert client.get(f"/images/thumbs/{tile_id}.jpg?v=stale").headers["cache-control"].endswith("no-cache")
    assert Image.open(io.BytesIO(thumb.content)).format == "JPEG"
    etag = thumb.headers["etag"]
    again = client.get(f"/images/thumbs/{tile_id}.jpg", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    full = client.get(f"/images/tiles/{tile_id}.jpg")
    assert full.headers["content-type"] == "image/png"
    assert full.content == (indexed.folder / "C1/C1-S2/t3.png").read_bytes()
    assert full.headers["etag"] != etag
    assert client.get("/images/tiles/999999.jpg").status_code == 404
    assert client.get("/images/tiles/..%2F..%2Fetc%2Fpasswd.jpg").status_code in (404, 422)


@pytest.mark.parametrize(
    ("payload", "status", "code", "words"),
    [
        (b"\x89PNG" + b"0" * 25_000, 413, "too_large", "max_upload_bytes"),  # over the file limit, within the body's
        (b"0" * 200_000, 413, "too_large", "max_upload_bytes"),  # refused before the route reads it
        (b"hello, not an image", 422, "bad_input", "not a JPEG, PNG, TIFF or WebP"),
        (_png((100, 100)), 422, "bad_input", "too many pixels (limit 4096, setting max_upload_pixels)"),
        # 12 kB claiming the archive limit of 100 Mpx: refused from its header, far below max_image_pixels.
        (bomb_png(10_000, 10_000), 422, "bad_input", "10000x10000 is too many pixels"),
    ],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_upload_limits(indexed, tiny_encoder, payload, status, code, words):
    client, _ = _client(indexed, tiny_encoder, max_upload_bytes=20_000, max_upload_pixels=64 * 64)
    response = client.post("/api/search/image", files={"image": ("upload.png", payload, "image/png")})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and words in error["message"]
    page = client.post("/search/image", files={"image": ("upload.png", payload, "image/png")})
    assert page.status_code == status and page.headers["content-type"].startswith("text/html")


def test_upload_without_a_file_names_the_field(client):
    response = client.post("/api/search/image", data={"k": "3"})
    assert response.status_code == 422 and "image" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"q": "x" * 501}, 400),
        ({"q": "gland", "k": 501}, 400),
        ({"q": "gland", "k": 0}, 422),
        ({"q": "gland", "offset": -1}, 422),
        ({"q": "gland", "k": "many"}, 422),
    ],
)
def test_query_length_and_k_are_bounded(client, params, status):
    assert client.get("/api/search", params=params).status_code == status
    assert client.get("/", params=params).status_code == status


def test_empty_query_is_a_bad_api_request_but_the_blank_search_page(client):
    assert client.get("/api/search", params={"q": " "}).json()["error"]["code"] == "bad_query"
    page = client.get("/", params={"q": " "})
    assert page.status_code == 200 and _tile_ids(page.text) == []


def test_auth_token_off_needs_nothing(client):
    assert client.get("/api/status").status_code == 200
    assert client.get("/").status_code == 200


def test_auth_token_on(indexed, tiny_encoder):
    client, _ = _client(indexed, tiny_encoder, auth_token="s3cret-token-16chars")
    tile_id = indexed.ids["C1/C1-S2/t0.png"]
    denied = client.get("/api/status")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"
    assert denied.headers["www-authenticate"] == "Bearer"
    assert client.get("/api/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/status", headers={"Authorization": "Bearer s3cret-token-16chars"}).status_code == 200
    assert client.get(f"/images/thumbs/{tile_id}.jpg").status_code == 401
    upload = client.post("/api/search/image", files={"image": ("q.png", _png(), "image/png")})
    assert upload.status_code == 401
    redirect = client.get("/?q=gland", follow_redirects=False)
    assert redirect.status_code == 303 and redirect.headers["location"] == "/login?next=%2F%3Fq%3Dgland"
    assert client.get("/login").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    wrong = client.post("/login", data={"token": "nope", "next": "/"}, follow_redirects=False)
    assert wrong.status_code == 401 and "histosearch_session" not in wrong.cookies
    right = client.post("/login", data={"token": "s3cret-token-16chars", "next": "/status"}, follow_redirects=False)
    assert right.status_code == 303 and right.headers["location"] == "/status"
    assert "s3cret-token-16chars" not in right.headers["set-cookie"]
    assert client.get("/").status_code == 200  # the cookie now opens pages
    assert client.get(f"/images/thumbs/{tile_id}.jpg").status_code == 200
    offsite = client.post(
        "/login",
        data={"token": "s3cret-token-16chars", "next": "//evil.example/"},
        headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )
    assert offsite.headers["location"] == "/"
    client.post("/logout", headers={"Origin": "http://testserver"})
    assert client.get("/", follow_redirects=False).status_code == 303


def test_metadata_captions_and_queries_are_escaped(client, indexed):
    hostile_id = indexed.ids["C2/C2-S2/t6.png"]
    pages = [
        client.get(f"/tiles/{hostile_id}").text,
        client.get("/", params={"q": "gland", "k": 50}).text,
        client.get("/", params={"q": HOSTILE}).text,
        client.get("/cases", params={"q": HOSTILE}).text,
    ]
    for html in pages:
        assert "<script>alert" not in html
        assert "&lt;script&gt;alert(" in html
    tile_page = pages[0]
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; glandular epithelium" in tile_page  # the caption
    error_page = client.get("/similar/999999", params={"case": HOSTILE}).text
    assert "<script>alert" not in error_page


def test_pages_load_nothing_from_elsewhere(client, indexed):
    tile_id = indexed.ids["C1/C1-S1/tile_1_1.png"]
    for url in ("/", "/?q=gland", f"/tiles/{tile_id}", "/cases?q=gland", "/status", "/login"):
        html = client.get(url).text
        assert not re.search(r'(src|href|action)="(https?:)?//', html), url
    for asset in ("/static/style.css", "/static/upload.js"):
        assert not re.search(r"https?:|@import|url\(", client.get(asset).text), asset
    assert "default-src 'self'" in client.get("/").headers["content-security-policy"]


def _snapshot(indexed) -> dict:
    data_dir = indexed.settings.data_dir
    files = {}
    for path in sorted(data_dir.rglob("*")):
        # SQLite readers update their read marks in the -shm index; it holds no data.
        if path.is_file() and not path.name.endswith("-shm"):
            files[str(path.relative_to(data_dir))] = (
                path.stat().st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return {"files": files, "counts": indexed.store.counts()}


def test_get_requests_never_write(indexed, tiny_encoder):
    # The query log is the one write a query makes by design (setting query_log; test_query_log.py).
    client, _ = _client(indexed, tiny_encoder, query_log=False)
    tile_id = indexed.ids["C1/C1-S1/tile_1_1.png"]
    image_ref = client.post("/api/search/image", files={"image": ("q.png", _png(), "image/png")}).json()["query"]
    # An upload is kept on disk by content hash so its permalink survives a restart; GETs add nothing.
    before = _snapshot(indexed)
    assert [name for name in before["files"] if name.startswith("uploads/")] == [f"uploads/{image_ref['image']}.png"]
    for url in (
        "/",
        "/?q=gland&k=48",
        f"/?image={image_ref['image']}",
        f"/similar/{tile_id}",
        "/cases?q=gland",
        f"/cases?tile={tile_id}",
        f"/tiles/{tile_id}",
        "/status",
        "/api/search?q=necrosis",
        f"/api/similar/{tile_id}",
        "/api/cases?q=gland",
        f"/api/tiles/{tile_id}",
        f"/api/tiles/{tile_id}/describe",
        "/api/status",
        f"/images/tiles/{tile_id}.jpg",
        f"/images/thumbs/{tile_id}.jpg",
        "/login",
        "/nowhere",
    ):
        client.get(url)
    assert _snapshot(indexed) == before


def test_serve_binds_loopback_by_default(indexed, monkeypatch, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    server.serve(indexed.settings)
    assert calls[0]["host"] == "127.0.0.1" and calls[0]["port"] == indexed.settings.port
    assert "warning" not in capsys.readouterr().err
    server.serve(indexed.settings.model_copy(update={"host": "0.0.0.0"}))
    assert "without an access token" in capsys.readouterr().err
    server.serve(indexed.settings.model_copy(update={"host": "0.0.0.0", "auth_token": "t" * 16}))
    assert "warning" not in capsys.readouterr().err
    # On all addresses with only the loopback names allowed, people's requests by name would get 400: say so.
    loopback_only = {"host": "0.0.0.0", "auth_token": "t" * 16, "allowed_hosts": ["localhost", "127.0.0.1"]}
    server.serve(indexed.settings.model_copy(update=loopback_only))
    assert "HISTOSEARCH_ALLOWED_HOSTS" in capsys.readouterr().err
    named = {**loopback_only, "allowed_hosts": ["search.lab.example"]}
    server.serve(indexed.settings.model_copy(update=named))
    assert "HISTOSEARCH_ALLOWED_HOSTS" not in capsys.readouterr().err


def test_serve_leaves_no_warm_up_thread_behind(indexed, monkeypatch):
    """A warm-up thread still loading the model at interpreter exit aborts the process (exit 134)."""
    import threading

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    server.serve(indexed.settings)
    assert [t.name for t in threading.enumerate() if t.name == "histosearch-warm-up"] == []


def test_uploaded_patch_is_shown_with_its_size(client, indexed):
    data = (indexed.folder / "C2/C2-S2/t4.png").read_bytes()
    answer = client.post("/api/search/image", files={"image": ("q.png", data, "image/png")}).json()
    query = answer["query"]
    assert (query["width"], query["height"]) == (64, 64)
    patch = client.get(f"/images/uploads/{query['image']}.jpg")
    assert patch.status_code == 200 and Image.open(io.BytesIO(patch.content)).size == (64, 64)
    page = client.get("/", params={"image": query["image"]}).text
    assert f'src="/images/uploads/{query["image"]}.jpg"' in page and "64 × 64 px" in page
    cases = client.get("/cases", params={"image": query["image"]}).text
    assert f'src="/images/uploads/{query["image"]}.jpg"' in cases
    assert client.get("/images/uploads/0123456789abcdef0123.jpg").status_code == 404


def test_facets_api_counts_and_hides_server_paths(client, indexed):
    slides = client.get("/api/facets/slide", params={"prefix": "c2"}).json()
    assert {v["value"] for v in slides["values"]} == {"C2-S1", "C2-S2"} and slides["distinct"] == 2
    assert sum(v["count"] for v in slides["values"]) == sum(p.startswith("C2/") for p in indexed.ids)
    sources = client.get("/api/facets/source").json()
    assert sources["values"][0]["label"] == "tiles" and str(indexed.folder) not in str(sources)
    assert client.get("/api/facets/organ").json()["error"]["code"] == "bad_query"


def test_score_labels_are_relative_and_never_negative(client):
    page = client.get("/", params={"q": "gland"}).text
    shares = [int(x) for x in re.findall(r"(\d+)% of the best match", page)]
    assert shares[0] == 100 and all(0 <= s <= 100 for s in shares) and shares == sorted(shares, reverse=True)
    cases = client.get("/cases", params={"q": "gland"}).text
    assert not re.search(r"<figcaption>-", cases) and "% of the best case" in cases


def test_query_errors_are_inline_with_the_query_kept(client):
    page = client.get("/", params={"q": "cribriform glands", "k": 10_000})
    assert page.status_code == 400
    assert 'class="inline-error"' in page.text and 'value="cribriform glands"' in page.text
    assert "max_k" in page.text and "data-image-form" in page.text
    bad = client.post("/search/image", files={"image": ("q.txt", b"not an image", "text/plain")})
    assert bad.status_code == 422 and "That image cannot be used" in bad.text and 'role="search"' in bad.text


def test_status_shows_per_run_counts_and_refused_files(client, engine):
    store = engine.store
    job = store.start_job("index", {"paths": []})
    store.record_error("case9/broken.png", "corrupt or truncated image", job_id=job)
    store.record_error("case9/huge.png", "40000x40000 is too many pixels", job_id=job)
    store.update_job(job, done=172, total=174, errors=2)
    store.finish_job(job, "done", "…/tiles (folder): 172 new, 2 errors")
    status = client.get("/api/status").json()["last_job"]
    assert (status["total"], status["done"], status["errors"], status["refused_total"]) == (174, 172, 2, 2)
    page = client.get("/status").text
    assert re.search(r'data-count="seen">174<.*data-count="done">172<.*data-count="refused">2<', page, re.S)
    assert "case9/huge.png" in page and "too many pixels" in page


def test_tile_page_links_back_and_filters(client, indexed):
    tile_id = indexed.ids["C1/C1-S1/tile_1_1.png"]
    page = client.get(f"/tiles/{tile_id}", params={"back": "/?q=gland&case=C1"}).text
    assert 'href="/?q=gland&amp;case=C1" rel="prev"' in page
    assert f'href="/similar/{tile_id}?case=C1"' in page and f'href="/similar/{tile_id}?slide=C1-S1"' in page
    offsite = client.get(f"/tiles/{tile_id}", params={"back": "//evil.example/"}).text
    assert "evil.example" not in offsite
