"""What a pathologist does, in a real Chromium against a real uvicorn server on a free port."""

from __future__ import annotations

import base64
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import text

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


@contextmanager
def serving(app) -> Iterator[str]:
    """``app`` served by uvicorn on a free port of 127.0.0.1 in a background thread; yields its base URL."""
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
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()


def _plain(settings):
    """The plain ranking (no spread, no confidence floor): the tiny model's hits are all low-confidence, and
    the pages keep those folded away; the tests of those controls set them."""
    return settings.model_copy(update={"max_per_slide": 0, "min_confidence": 0})


@pytest.fixture
def server(tiny_settings, tiny_encoder, tmp_path):
    """A uvicorn server over a small real index."""
    indexed = build_index(_plain(tiny_settings), tiny_encoder, tmp_path / "tiles")
    app = create_app(indexed.settings, Engine(indexed.settings, store=indexed.store, encoder=tiny_encoder))
    with serving(app) as base:
        yield base, indexed


@pytest.fixture
def page():
    _need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        page.reported_errors = errors  # a test expecting an error status removes its line
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

    results_url = page.url
    with page.expect_navigation():
        page.locator("article.card").first.locator("a.tile-link").click()
    assert re.search(r"/tiles/\d+\?back=", page.url)
    page.wait_for_function("() => document.querySelector('img.large').naturalWidth > 0")
    assert page.locator("ol.captions li").count() > 0
    assert "Metadata" in page.content()
    # The way back leads to the results the tile was opened from.
    with page.expect_navigation():
        page.click("a[data-back]")
    assert page.url == results_url


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
    page.wait_for_function("() => document.querySelector('.query-patch img').naturalWidth > 0")
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


# --- what a pathologist hit (issue 13) ----------------------------------------------------------------

LONG_FIELDS = {
    "tumour_infiltrating_lymphocytes": "brisk",
    "histological_grade_nottingham_total_score": "3 (tubules 3, pleomorphism 3, mitoses 2)",
    "oestrogen_receptor_allred_score": "8",
}


def _long_metadata(indexed) -> None:
    """Give every tile the realistic manifest columns whose long names broke the cards."""
    with indexed.store.session(write=True) as s:
        for key, value in LONG_FIELDS.items():
            update = text("UPDATE tiles SET meta = json_set(meta, :path, :value)")
            s.execute(update, {"path": f'$."{key}"', "value": value})


@pytest.fixture
def long_server(tiny_settings, tiny_encoder, tmp_path):
    indexed = build_index(_plain(tiny_settings), tiny_encoder, tmp_path / "tiles")
    _long_metadata(indexed)
    app = create_app(indexed.settings, Engine(indexed.settings, store=indexed.store, encoder=tiny_encoder))
    with serving(app) as base:
        yield base, indexed


def test_cards_stay_readable_with_long_metadata_names(long_server, page):
    base, _ = long_server
    page.goto(base + "/?q=" + "dense lymphocytic infiltrate")
    page.wait_for_selector("article.card")
    cards = page.locator("article.card")
    heights = cards.evaluate_all("cards => cards.map(c => c.getBoundingClientRect().height)")
    assert max(heights) < 520, heights  # was 1,268 px: every value one character wide
    # Each value keeps a usable width; a long name is cut with an ellipsis and kept whole in its title.
    widths = (
        page.locator("article.card")
        .first.locator("dl.facts dd")
        .evaluate_all("dds => dds.map(d => d.getBoundingClientRect().width)")
    )
    assert min(widths) > 60, widths
    names = page.locator("article.card").first.locator("dl.facts dt[title]")
    assert names.count() == 3  # the first three fields; the rest on hover, in the quick view and on the tile page
    assert "tumour_infiltrating_lymphocytes" in (page.locator("article.card").first.get_attribute("title") or "")
    page.screenshot(path="/tmp/histosearch_long_metadata.png", full_page=False)


def test_card_fields_setting_chooses_the_fields(tiny_settings, tiny_encoder, tmp_path, page):
    indexed = build_index(_plain(tiny_settings), tiny_encoder, tmp_path / "tiles")
    _long_metadata(indexed)
    settings = indexed.settings.model_copy(update={"card_fields": ["oestrogen_receptor_allred_score", "organ"]})
    app = create_app(settings, Engine(settings, store=indexed.store, encoder=tiny_encoder))
    with serving(app) as base:
        page.goto(base + "/?q=gland")
        names = page.locator("article.card").first.locator("dl.facts dt[title]").all_inner_texts()
        assert names == ["oestrogen_receptor_allred_score", "organ"]
        page.goto("about:blank")  # no image still loading when the server stops


def test_upload_applies_the_chosen_filters_and_shows_the_patch(server, page):
    base, indexed = server
    path = "C2/C2-S2/t4.png"  # a colon tile: with organ = breast it cannot come back
    page.goto(base + "/")
    page.select_option("select[name='meta.organ']", "breast")
    with page.expect_navigation(url=re.compile(r"/\?image=")):
        page.set_input_files("form[data-image-form] input[type=file]", str(indexed.folder / path))
    assert "meta.organ=breast" in page.url and "case=" not in page.url  # no empty parameters
    page.wait_for_selector("article.card")
    ids = _result_ids(page)
    breast = {i for p, i in indexed.ids.items() if p.startswith("C1/")}
    assert ids and set(ids) <= breast
    # The uploaded patch is shown with its size, and the filter as a removable chip.
    page.wait_for_function("() => document.querySelector('.query-patch img').naturalWidth > 0")
    assert "64 × 64 px" in page.locator(".query-patch").inner_text()
    assert page.locator(".chip").inner_text().startswith("organ: breast")
    page.screenshot(path="/tmp/histosearch_upload_filtered.png", full_page=False)
    with page.expect_navigation():
        page.click(".chip a")
    assert "meta.organ" not in page.url and "image=" in page.url
    assert indexed.ids[path] == _result_ids(page)[0]


def test_upload_feedback_before_the_answer(server, page):
    base, indexed = server
    page.goto(base + "/")
    assert "JPEG, PNG, TIFF or WebP" in page.locator(".limits").inner_text()
    assert "20 MB" in page.locator(".limits").inner_text()
    # Hold the form back, so the state between choosing a patch and its results can be looked at.
    page.evaluate("HTMLFormElement.prototype.submit = function () { window.submitted = true; }")
    page.set_input_files("form[data-image-form] input[type=file]", str(indexed.folder / "C1/C1-S1/tile_0_0.png"))
    page.wait_for_function("() => document.querySelector('img.upload-preview').naturalWidth > 0")
    status = page.locator(".upload-status").inner_text()
    assert "embedding" in status and "64 × 64 px" in status
    assert page.locator("form[data-image-form] button[type=submit]").is_disabled()
    assert page.evaluate("window.submitted") is True
    page.screenshot(path="/tmp/histosearch_upload_feedback.png", full_page=False)


def test_banners_say_what_to_run_before_the_first_query(tiny_settings, tmp_path, page):
    settings = tiny_settings.model_copy(update={"checkpoint": tmp_path / "nowhere" / "pytorch_model.bin"})
    engine = Engine(settings)
    engine.warm_up()  # what `serve` does at start: the model's real error is known before any query
    with serving(create_app(settings, engine)) as base:
        page.goto(base + "/")
        index_banner = page.locator("[data-banner=index]")
        assert "histosearch index /path/to/tiles" in index_banner.inner_text()
        model_banner = page.locator("[data-banner=model]")
        assert "histosearch model fetch" in model_banner.inner_text()
        assert str(tmp_path) not in page.content()  # no server paths for a client without the token
        page.screenshot(path="/tmp/histosearch_banners.png", full_page=True)
        page.goto(base + "/status")
        state = page.locator("[data-model-state]").inner_text()
        assert "failed to load" in state and "loads on the first query" not in state
        page.goto("about:blank")


def test_errors_are_shown_inline_with_the_query_kept(tiny_settings, tiny_encoder, page):
    # No index yet: the query fails, the page says why on the search page itself, and keeps the query.
    with serving(create_app(tiny_settings, Engine(tiny_settings, encoder=tiny_encoder))) as base:
        page.goto(base + "/")
        page.fill("input[name=q]", "signet ring cells")
        page.click("form[role=search] button[type=submit]")
        page.wait_for_selector(".inline-error")
        assert page.input_value("input[name=q]") == "signet ring cells"
        error = page.locator(".inline-error").inner_text()
        assert "Search is not available yet" in error and "histosearch index" in error
        assert page.locator("form[data-image-form]").count() == 1  # still a search page, not a dead end
        # The page is answered with the error's status (503), which Chromium logs.
        page.reported_errors.remove(
            "Failed to load resource: the server responded with a status of 503 (Service Unavailable)"
        )
        page.screenshot(path="/tmp/histosearch_inline_error.png", full_page=False)
        page.goto("about:blank")


def test_lightbox_steps_through_results_and_slash_focuses_search(server, page):
    base, _ = server
    page.goto(base + "/?q=gland&k=12")
    page.wait_for_selector("article.card")
    ids = _result_ids(page)
    page.locator("article.card").nth(1).locator("img.thumb").click()
    box = page.locator(".lightbox")
    assert box.is_visible()
    assert page.locator(".lightbox img").get_attribute("src").startswith(f"/images/tiles/{ids[1]}.jpg")
    page.wait_for_function("() => document.querySelector('.lightbox img').naturalWidth > 0")
    page.screenshot(path="/tmp/histosearch_lightbox.png", full_page=False)
    page.keyboard.press("ArrowRight")
    assert page.locator(".lightbox img").get_attribute("src").startswith(f"/images/tiles/{ids[2]}.jpg")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    assert page.locator(".lightbox img").get_attribute("src").startswith(f"/images/tiles/{ids[0]}.jpg")
    assert f"/tiles/{ids[0]}" in page.locator(".lightbox .lb-tile").get_attribute("href")
    page.keyboard.press("Escape")
    assert not box.is_visible()
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.name") == "q"


def test_case_and_slide_on_cards_are_links_that_filter(server, page):
    base, _ = server
    page.goto(base + "/?q=gland")
    link = page.locator("article.card").first.locator("dl.facts dd a").first
    case = link.inner_text()
    with page.expect_navigation():
        link.click()
    assert f"case={case}" in page.url and "q=gland" in page.url
    assert {c for c in page.locator("article.card dl.facts dd a").all_inner_texts() if c.startswith("C")} >= {case}
    assert page.locator(".chip").count() == 1


def test_many_valued_filters_are_a_typeahead_with_counts(tiny_settings, tiny_encoder, tmp_path, page):
    indexed = build_index(tiny_settings, tiny_encoder, tmp_path / "tiles")
    app = create_app(indexed.settings, Engine(indexed.settings, store=indexed.store, encoder=tiny_encoder))
    app.state.templates.env.globals["DROPDOWN_MAX"] = 1  # four slides: more than a dropdown holds here
    with serving(app) as base:
        page.goto(base + "/")
        field = page.locator("input[name=slide][data-facet]")
        options = "() => [...document.querySelectorAll('#values-slide option')].map(o => o.value + ' ' + o.label)"
        assert len(page.evaluate(options)) == 4
        field.fill("c2")
        page.wait_for_function(f"() => ({options})().length == 2")
        # The two slides of case C2 (any case), each with its tile count from the server.
        assert all(re.fullmatch(r"C2-S[12] \d+ tiles?", o) for o in page.evaluate(options))
        page.goto("about:blank")
