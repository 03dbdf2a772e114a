"""Tile search: by text, by uploaded image, and "more like this tile"; pages and their JSON twins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from search.core.errors import BadQuery

from ..deps import EngineDep, FiltersDep, FormFiltersDep, TileId, UploadedImage
from ..pages import DEFAULT_K, query_context, render
from ..urls import clean_url, filter_params, page_urls, ranked_links, url_with

router = APIRouter()

K = Annotated[int, Query(ge=1, description="results per page (at most the setting max_k)")]
Offset = Annotated[int, Query(ge=0, description="rank of the first result, from 0")]


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def search_page(
    request: Request,
    engine: EngineDep,
    filters: FiltersDep,
    q: str = "",
    image: str = "",
    k: K = DEFAULT_K,
    offset: Offset = 0,
) -> Response:
    if (clean := clean_url(request)) is not None:
        return RedirectResponse(clean, status_code=303)
    context = query_context(request, "search", filters, q, k)
    result = None
    if q.strip():
        result = engine.search_text(q, k, offset, filters)
        context.update(mode="text", cases_url=url_with("/cases", q=q, **filter_params(filters)))
    elif image:
        result = engine.search_image(image, k, offset, filters)
        context.update(mode="image", query_image=result["query"])
        context["cases_url"] = url_with("/cases", image=image, **filter_params(filters))
    if result is not None:
        context["prev_url"], context["next_url"] = page_urls(request, result)
        result = ranked_links(result)
    context["result"] = result
    return render(request, "search.html", context)


@router.post("/search/image", include_in_schema=False)
def search_image_form(
    engine: EngineDep, image: UploadedImage, filters: FormFiltersDep, k: Annotated[int, Form(ge=1)] = DEFAULT_K
) -> RedirectResponse:
    # Post/redirect/get: the results page is a plain GET that can be reloaded and paged.
    ref = engine.image_ref(image)
    return RedirectResponse(url_with("/", image=ref, k=k, **filter_params(filters)), status_code=303)


@router.get("/similar/{tile_id}", response_class=HTMLResponse, include_in_schema=False)
def similar_page(
    request: Request, engine: EngineDep, filters: FiltersDep, tile_id: TileId, k: K = DEFAULT_K, offset: Offset = 0
) -> Response:
    if (clean := clean_url(request)) is not None:
        return RedirectResponse(clean, status_code=303)
    result = engine.similar(tile_id, k, offset, filters)
    context = query_context(request, "search", filters, "", k)
    context["prev_url"], context["next_url"] = page_urls(request, result)
    context.update(
        mode="similar",
        query_tile=engine.tile(tile_id),
        cases_url=url_with("/cases", tile=tile_id, **filter_params(filters)),
        result=ranked_links(result),
    )
    return render(request, "search.html", context)


@router.get("/api/search", tags=["search"], response_model=dict)
def api_search(
    engine: EngineDep,
    filters: FiltersDep,
    q: Annotated[str | None, Query(description="a morphology description")] = None,
    image: Annotated[str | None, Query(description="the image reference an image query returned")] = None,
    k: K = DEFAULT_K,
    offset: Offset = 0,
) -> JSONResponse:
    """Tiles ranked by similarity to a text (``q``) or to an image uploaded before (``image``).

    Filters: ``source``, ``slide``, ``case`` and ``meta.<key>=<value>`` query parameters."""
    # The engine's dict is plain JSON data already: serialised as it is, not walked by FastAPI's
    # response validation and jsonable_encoder (a few ms for a page of 24 results on a busy CPU).
    if q is not None:
        return JSONResponse(ranked_links(engine.search_text(q, k, offset, filters)))
    if image:
        return JSONResponse(ranked_links(engine.search_image(image, k, offset, filters)))
    raise BadQuery("give q=<morphology description> or image=<reference from POST /api/search/image>")


@router.post("/api/search/image", tags=["search"])
def api_search_image(
    engine: EngineDep,
    image: UploadedImage,
    filters: FormFiltersDep,
    k: Annotated[int, Form(ge=1)] = DEFAULT_K,
    offset: Annotated[int, Form(ge=0)] = 0,
) -> dict:
    """Tiles ranked by similarity to an uploaded image (multipart field ``image``)."""
    return ranked_links(engine.search_image(image, k, offset, filters))


@router.get("/api/similar/{tile_id}", tags=["search"])
def api_similar(engine: EngineDep, filters: FiltersDep, tile_id: TileId, k: K = DEFAULT_K, offset: Offset = 0) -> dict:
    """Tiles like an indexed tile, from its stored embedding; the tile itself is left out."""
    return ranked_links(engine.similar(tile_id, k, offset, filters))
