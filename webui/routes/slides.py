"""Slides: text -> slide search, a slide's page (thumbnail, heatmap of a query, similar slides), the heatmap
as a PNG, and the JSON twins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse

from search.core.errors import HistosearchError
from search.engine.slides import COLOUR_STOPS, SlideSearch, colourise

from ..deps import EngineDep, UploadedImage
from ..errors import IMAGE_RESPONSES
from ..pages import render
from ..urls import heatmap_links, slide_links, slide_url, slides_links

router = APIRouter()

SlideK = Annotated[int, Query(ge=1, description="slides to return (at most the setting max_k)")]
Method = Annotated[str, Query(description="'tiles': best tile scores; 'attention': WSC-attention-weighted")]
Kind = Annotated[str, Query(description="slide-vector kind: mean, medoid or wsc")]
SameCase = Annotated[bool, Query(description="keep other slides of the same case")]
HeatText = Annotated[str | None, Query(description="text query for the heatmap")]
HeatTile = Annotated[int | None, Query(description="tile id whose vector is the heatmap query")]
HeatImage = Annotated[str | None, Query(description="image reference from an earlier upload")]
SIMILAR_K = 6


def _heatmap_args(q: str | None, tile: int | None, image: str | None) -> dict:
    return {"text": q or None, "tile_id": tile, "image": image or None}


def _cells_with_colours(heatmap: dict) -> dict:
    """The heatmap's cells with the fill colour the page draws them in (same scale as the PNG)."""
    span = heatmap["max"] - heatmap["min"]
    cells = []
    for cell in heatmap["cells"]:
        value = (cell["score"] - heatmap["min"]) / span if span > 0 else 1.0
        r, g, b = (int(c) for c in colourise([value])[0])
        cells.append({**cell, "fill": f"rgb({r},{g},{b})"})
    return {**heatmap, "cells": cells}


@router.get("/slides", response_class=HTMLResponse, include_in_schema=False)
def slides_page(request: Request, engine: EngineDep, q: str = "", method: Method = "tiles", k: SlideK = 12
                ) -> HTMLResponse:  # fmt: skip
    result = slides_links(engine.slides.search_text(q, k, method)) if q.strip() else None
    context = {"page": "slides", "q": q, "method": method, "k": k, "result": result,
               "kinds": engine.slides.kinds()}  # fmt: skip
    return render(request, "slides.html", context)


@router.get("/api/slides/search", tags=["slides"])
def api_slides_search(engine: EngineDep, q: str, method: Method = "tiles", k: SlideK = 12) -> dict:
    """Text -> slide: slides ranked by the mean of their best tile scores, or by WSC-attention-weighted scores."""
    return slides_links(engine.slides.search_text(q, k, method))


@router.get("/slides/{slide}", response_class=HTMLResponse, include_in_schema=False)
def slide_page(request: Request, engine: EngineDep, slide: str, q: HeatText = None, tile: HeatTile = None,
               image: HeatImage = None, same_case: SameCase = False) -> HTMLResponse:  # fmt: skip
    info = slide_links(engine.slides.slide(slide))
    heatmap = error = None
    query = _heatmap_args(q, tile, image)
    if any(v is not None for v in query.values()):
        try:
            heatmap = _cells_with_colours(heatmap_links(engine.slides.heatmap(info["id"], **query)))
        except HistosearchError as exc:
            error = exc.message
    similar = {}
    for kind in info["kinds"]:
        try:
            similar[kind] = slides_links(engine.slides.similar(info["id"], kind, SIMILAR_K, same_case))
        except HistosearchError as exc:
            similar[kind] = {"error": exc.message, "results": []}
    context = {"page": "slides", "slide": info, "heatmap": heatmap, "heatmap_error": error, "q": q or "",
               "tile": tile, "similar": similar, "same_case": same_case, "stops": COLOUR_STOPS}  # fmt: skip
    return render(request, "slide.html", context)


@router.post("/slides/{slide}/heatmap/image", include_in_schema=False)
def slide_heatmap_upload(engine: EngineDep, slide: str, image: UploadedImage) -> RedirectResponse:
    ref = engine.image_ref(image)
    return RedirectResponse(slide_url(slide, image=ref), status_code=303)


@router.get("/api/slides/{slide}", tags=["slides"])
def api_slide(engine: EngineDep, slide: str, q: HeatText = None, tile: HeatTile = None, image: HeatImage = None,
              same_case: SameCase = False) -> dict:  # fmt: skip
    """A slide: its tiles on the grid, the slide-vector kinds, similar slides by each kind, and the heatmap
    of a query when one is given."""
    info = slide_links(engine.slides.slide(slide))
    query = _heatmap_args(q, tile, image)
    if any(v is not None for v in query.values()):
        info["heatmap"] = heatmap_links(engine.slides.heatmap(info["id"], **query))
    info["similar"] = {
        kind: slides_links(engine.slides.similar(info["id"], kind, SIMILAR_K, same_case)) for kind in info["kinds"]
    }
    return info


@router.get("/api/slides/{slide}/similar", tags=["slides"])
def api_similar_slides(engine: EngineDep, slide: str, kind: Kind = "mean", k: SlideK = 10,
                       same_case: SameCase = False) -> dict:  # fmt: skip
    """Slides nearest to this one by one slide-vector kind; other slides of its case are left out by default."""
    return slides_links(engine.slides.similar(slide, kind, k, same_case))


@router.get("/api/slides/{slide}/heatmap", tags=["slides"])
def api_heatmap(engine: EngineDep, slide: str, q: HeatText = None, tile: HeatTile = None,
                image: HeatImage = None) -> dict:  # fmt: skip
    """The query's cosine similarity to every tile of the slide, with each tile's grid cell."""
    return heatmap_links(engine.slides.heatmap(slide, **_heatmap_args(q, tile, image)))


@router.get("/slides/{slide}/heatmap.png", tags=["slides"], response_class=Response, responses=IMAGE_RESPONSES)
def heatmap_png(engine: EngineDep, slide: str, q: HeatText = None, tile: HeatTile = None,
                image: HeatImage = None) -> Response:  # fmt: skip
    """The heatmap as a PNG, one pixel per tile-grid cell (cols x rows), on the slide's min..max colour
    scale; cells without a tile are transparent."""
    heatmap = engine.slides.heatmap(slide, **_heatmap_args(q, tile, image))
    return Response(SlideSearch.heatmap_png(heatmap), media_type="image/png")


@router.get("/slides/{slide}/thumbnail.jpg", tags=["slides"], response_class=Response, responses=IMAGE_RESPONSES)
async def slide_thumbnail(engine: EngineDep, slide: str) -> Response:
    """The slide at low resolution: its lowest pyramid level, or a mosaic of its tiles."""
    data, content_type = await run_in_threadpool(engine.slides.thumbnail, slide)
    return Response(data, media_type=content_type, headers={"Cache-Control": "private, max-age=300"})
