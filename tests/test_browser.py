"""What a pathologist does, in a real Chromium against a real uvicorn server on a free port."""

from __future__ import annotations

import base64
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from search.engine.engine import Engine
from tests.index_fixture import build_index
from webui.app import create_app

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = Path("/tmp/histosearch_results.png")


def _need_chromium() -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: no Chromium at {CHROMIUM}")
        pytest.skip(f"no Chromium at {CHROMIUM}: install it to run the browser tests")


@pytest.fixture
def server(tiny_settings, tiny_encoder, tmp_path):
    """A uvicorn server over a small real index, on a free port of 127.0.0.1, in a background thread."""
    # The plain ranking by default (no spread, no confidence floor); the tests of those controls set them.
    settings = tiny_settings.model_copy(update={"max_per_slide": 0, "min_confidence": 0})
    indexed = build_index(settings, tiny_encoder, tmp_path / "tiles")
    app = create_app(indexed.settings, Engine(indexed.settings, store=indexed.store, encoder=tiny_encoder))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", indexed
    uv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def page():
    _need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
        yield page
        browser.close()
        assert errors == [], f"the page reported errors: {errors}"


def _result_ids(page) -> list[int]:
    return [int(x) for x in page.locator("article.card").evaluate_all("cards => cards.map(c => c.dataset.tileId)")]


def test_text_search_similar_and_tile_page(server, page):
    base, indexed = server
    page.goto(base + "/")
    page.fill("input[name=q]", "cribriform glands with comedonecrosis")
    with page.expect_navigation():
        page.click("form[role=search] button[type=submit]")
    assert "q=cribriform" in page.url
    page.wait_for_selector("article.card")
    assert len(_result_ids(page)) == 24
    # Thumbnails really load (naturalWidth > 0), served by id.
    page.wait_for_function(
        "() => [...document.querySelectorAll('img.thumb')].slice(0, 4).every(i => i.complete && i.naturalWidth > 0)"
    )
    page.screenshot(path=str(SCREENSHOT), full_page=False)

    first = _result_ids(page)[0]
    with page.expect_navigation():
        page.locator("article.card").first.locator("a.similar").click()
    assert page.url.endswith(f"/similar/{first}")
    similar_ids = _result_ids(page)
    assert similar_ids and first not in similar_ids

    with page.expect_navigation():
        page.locator("article.card").first.locator("img.thumb").click()
    assert re.search(r"/tiles/\d+$", page.url)
    page.wait_for_function("() => document.querySelector('img.large').naturalWidth > 0")
    assert page.locator("ol.captions li").count() > 0
    assert "Metadata" in page.content()


def test_image_upload_finds_the_tile(server, page, tmp_path):
    base, indexed = server
    path = "C1/C1-S1/tile_2_1.png"
    page.goto(base + "/")
    # Choosing a file submits the form (upload.js); the server redirects to a GET results page.
    with page.expect_navigation(url=re.compile(r"/\?image=")):
        page.set_input_files("form[data-image-form] input[type=file]", str(indexed.folder / path))
    page.wait_for_selector("article.card")
    assert _result_ids(page)[0] == indexed.ids[path]
    with page.expect_navigation():
        page.click("text=Find similar cases")
    assert page.locator("section.case").count() == 2


def test_neighbours_on_the_tile_page(server, page):
    base, indexed = server
    centre = indexed.ids["C1/C1-S1/tile_1_1.png"]
    page.goto(f"{base}/tiles/{centre}")
    assert page.locator(".neighbours a").count() == 9
    with page.expect_navigation():
        page.locator(".neighbours a").first.click()
    assert page.url.endswith(f"/tiles/{indexed.ids['C1/C1-S1/tile_0_0.png']}")


DISPATCH = """([b64, kind]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
  const event = kind === "drop"
    ? new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true})
    : new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true, cancelable: true});
  (kind === "drop" ? document.querySelector(".dropzone") : document.body).dispatchEvent(event);
}"""


@pytest.mark.parametrize("kind", ["drop", "paste"])
def test_dropped_or_pasted_image_is_searched(server, page, kind):
    base, indexed = server
    path = "C2/C2-S1/t5.png"
    b64 = base64.b64encode((indexed.folder / path).read_bytes()).decode()
    page.goto(base + "/")
    with page.expect_navigation(url=re.compile(r"/\?image=")):
        page.evaluate(DISPATCH, [b64, kind])
    page.wait_for_selector("article.card")
    assert _result_ids(page)[0] == indexed.ids[path]


def _apply(page, **fields) -> None:
    """Fill the Refine panel's fields (text and number inputs by name, checkboxes by True/False) and apply."""
    form = page.locator("form[data-refine]")
    for name, value in fields.items():
        field = form.locator(f"input[name={name}]:not([type=hidden])")
        if isinstance(value, bool):
            field.set_checked(value)
        else:
            field.fill(str(value))
    with page.expect_navigation():
        form.locator("button[type=submit]").click()


def test_confidence_threshold_and_spread_controls(server, page):
    base, indexed = server
    page.goto(base + "/?q=DCIS")
    page.wait_for_selector("article.card")
    assert "Searched for: ductal carcinoma in situ" in page.inner_text(".summary")
    card = page.locator("article.card").first
    assert "cos 0." in card.inner_text() and "z " in card.inner_text() and "looks like:" in card.inner_text()
    assert "standard deviations" in page.inner_text("p.explain")
    _apply(page, min_confidence=1000)
    assert "min_confidence=1000" in page.url
    assert page.locator(".no-confident").is_visible()
    assert not page.locator("article.card").first.is_visible()  # noise is not shown as if it were signal
    page.click("details.low-confidence summary")
    assert page.locator("article.card").first.is_visible()
    _apply(page, min_confidence=0, max_per_slide=1)
    assert not page.locator(".no-confident").count()
    assert len(_result_ids(page)) == 4  # one result per slide
    assert "+8 adjacent tiles" in page.inner_text("body")  # the grid slide's neighbours, merged


def test_upload_with_rotation_magnification_and_composed_texts(server, page):
    base, indexed = server
    path = "C2/C2-S1/t2.png"
    page.goto(base + "/")
    page.check("form[data-image-form] input[name=tta][type=checkbox]")
    page.fill("form[data-image-form] input[name=magnification]", "20")
    with page.expect_navigation(url=re.compile(r"/\?image=")):
        page.set_input_files("form[data-image-form] input[type=file]", str(indexed.folder / path))
    assert "tta=1" in page.url and "magnification=20" in page.url
    page.wait_for_function("() => document.querySelector('img.query-image').naturalWidth > 0")
    assert indexed.ids[path] in _result_ids(page)[:5]  # averaged over rotations the tile need not stay first
    assert page.locator("form[data-refine] input[name=tta][type=checkbox]").is_checked()
    _apply(page, plus="necrosis", minus="adipose tissue", weight=0.25)
    assert "Composed: query + “necrosis” − “adipose tissue” (weight 0.25)" in page.inner_text(".summary")
    export = page.locator("a", has_text="CSV").get_attribute("href")
    answer = page.request.get(base + export)
    assert answer.ok and answer.text().splitlines()[0].startswith("rank,tile_id,score,z,percentile")
    assert "plus=necrosis" in export


def test_exclude_this_case_on_a_similar_search(server, page):
    base, indexed = server
    tile_id = indexed.ids["C1/C1-S2/t3.png"]
    page.goto(f"{base}/similar/{tile_id}?k=48")
    page.wait_for_selector("article.card")
    c1 = {i for p, i in indexed.ids.items() if p.startswith("C1/")}
    assert set(_result_ids(page)) & c1
    _apply(page, exclude_case=True)
    ids = _result_ids(page)
    assert ids and not set(ids) & c1
    with page.expect_navigation():
        page.locator("article.card").first.locator("a.other-cases").click()
    assert "exclude_case=1" in page.url
