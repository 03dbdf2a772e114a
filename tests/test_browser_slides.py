"""The slide page in a real Chromium: two whole slides indexed by the indexer, a text heatmap over the
thumbnail, a click on a cell opening its tile, similar slides with their method named."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from indexer.indexer import Indexer
from search.engine.engine import Engine
from tests.archives import make_slide
from tests.test_browser import page  # noqa: F401  (the Chromium page fixture)
from webui.app import create_app

pytestmark = pytest.mark.browser
SCREENSHOT = Path("/tmp/histosearch_slide_heatmap.png")


@pytest.fixture
def slide_server(tiny_settings, tiny_encoder, tmp_path):
    root = tmp_path / "slides"
    for case in ("caseA", "caseB"):
        (root / case).mkdir(parents=True)
    make_slide(root / "caseA" / "a1.tif", tissue=(512, 768, 1280, 1280), seed=1)
    make_slide(root / "caseB" / "b1.tif", tissue=(256, 256, 1024, 1536), seed=2)
    Indexer(tiny_settings, encoder=tiny_encoder).run([root])
    engine = Engine(tiny_settings, encoder=tiny_encoder)
    app = create_app(tiny_settings, engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    uv.should_exit = True
    thread.join(10)
    sock.close()


def test_slide_page_heatmap_cells_open_their_tiles(slide_server, page):  # noqa: F811
    base, engine = slide_server
    page.goto(base + "/slides?q=necrosis")
    assert page.locator("li.slide-hit").count() == 2
    with page.expect_navigation():
        page.locator("li.slide-hit a").first.click()
    assert re.search(r"/slides/\d+\?q=necrosis$", page.url)
    slide_id = int(re.search(r"/slides/(\d+)", page.url)[1])
    expected = engine.slides.heatmap(slide_id, text="necrosis")
    cells = page.locator("svg.slide-view a.cell")
    assert cells.count() == len(expected["cells"]) > 0
    # the thumbnail (the slide's lowest level) loads, and the colour scale is drawn with its end values
    thumbnail = page.request.get(f"{base}/slides/{slide_id}/thumbnail.jpg")
    assert thumbnail.status == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert page.locator(".legend span").first.inner_text() == f"{expected['min']:.3f}"
    assert (
        page.locator("section.similar-slides[data-kind=mean] h3")
        .inner_text()
        .startswith("mean · mean of the slide's CONCH tile vectors")
    )
    page.wait_for_timeout(300)  # let the SVG <image> paint before the screenshot
    page.screenshot(path=str(SCREENSHOT), full_page=False)

    best = max(expected["cells"], key=lambda c: c["score"])
    with page.expect_navigation():
        page.locator(f"svg.slide-view a.cell[data-tile-id='{best['tile_id']}'] rect").click()
    assert page.url.endswith(f"/tiles/{best['tile_id']}")
    with page.expect_navigation():
        page.click("text=Where on the slide")
    assert page.url.endswith(f"tile={best['tile_id']}")
    assert page.locator("svg.slide-view a.cell").count() == len(expected["cells"])
