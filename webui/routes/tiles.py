"""One tile: the image large, its slide neighbours, metadata and the nearest captions; JSON twins."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from search.core.errors import HistosearchError

from ..deps import EngineDep, TileId
from ..pages import render
from ..privacy import for_client
from ..urls import safe_next, tile_links

router = APIRouter()

DescribeK = Annotated[int, Query(ge=1, description="texts to return")]
Corpus = Annotated[str | None, Query(description="only texts of this corpus")]


def neighbour_grid(tile: dict) -> list[list[dict | None]]:
    """The 3 x 3 block of grid positions around the tile, row by row; None where no tile was indexed."""
    if not tile["neighbours"]:
        return []
    at = {(n["dx"], n["dy"]): n for n in tile["neighbours"]}
    return [[at.get((dx, dy)) for dx in (-1, 0, 1)] for dy in (-1, 0, 1)]


@router.get("/tiles/{tile_id}", response_class=HTMLResponse, include_in_schema=False)
def tile_page(
    request: Request, engine: EngineDep, tile_id: TileId, corpus: Corpus = None, back: str = ""
) -> HTMLResponse:
    tile = for_client(request, engine.tile(tile_id))
    try:
        describe = engine.describe(tile_id=tile_id, k=10, corpus=corpus or None)
    except HistosearchError as exc:
        # The tile page stays useful without a live index or texts: say why the captions are missing.
        describe = {"results": [], "corpora": [], "corpus": corpus, "error": exc.message}
    context = {
        "page": "",
        "tile": tile,
        "grid": neighbour_grid(tile),
        "describe": describe,
        # The results page the tile was opened from (only a path on this server).
        "back_url": safe_next(back) if back else None,
        "back_param": quote(safe_next(back), safe="") if back else None,
    }
    return render(request, "tile.html", context)


@router.get("/api/tiles/{tile_id}", tags=["tiles"])
def api_tile(request: Request, engine: EngineDep, tile_id: TileId) -> dict:
    """A tile's metadata and, for whole-slide tiles, its neighbours on the same slide and level. Its archive's
    path is cut to its name unless the client sent the access token."""
    return tile_links(for_client(request, engine.tile(tile_id)))


@router.get("/api/tiles/{tile_id}/describe", tags=["tiles"])
def api_describe(engine: EngineDep, tile_id: TileId, k: DescribeK = 10, corpus: Corpus = None) -> dict:
    """Image -> text: the embedded captions and terms nearest to the tile."""
    return engine.describe(tile_id=tile_id, k=k, corpus=corpus)
