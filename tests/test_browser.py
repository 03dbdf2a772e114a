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
    indexed = build_index(tiny_settings, tiny_encoder, tmp_path / "tiles")
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
