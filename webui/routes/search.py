"""Tile search: by text, by uploaded image, and "more like this tile"; pages, their JSON twins and CSV export.

Every search takes the result options of ``search.engine.options`` as query parameters (calibration
threshold, spread, exclude this case, scale, rotation averaging, composed texts), so a page URL is a
permalink to exactly what it shows.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from search.core.errors import BadQuery, HistosearchError
from search.engine.engine import Engine

from ..deps import EngineDep, FiltersDep, FormFiltersDep, FormOptionsDep, OptionsDep, TileId, UploadedImage
from ..export import csv_response
from ..pages import DEFAULT_K, query_context, render
from ..urls import clean_url, filter_params, option_params, page_urls, ranked_links, url_with

router = APIRouter()

K = Annotated[int, Query(ge=1, description="results per page (at most the setting max_k)")]
Offset = Annotated[int, Query(ge=0, description="rank of the first result, from 0")]
Format = Annotated[Literal["json", "csv"], Query(description="json (default) or csv: this page of results")]
DESCRIBE_TERMS = 5


def _answer(result: dict, format: str, name: str) -> dict | Response:
    return csv_response(ranked_links(result), f"{name}.csv") if format == "csv" else ranked_links(result)


def _describe(engine: Engine, ref: str, tta: bool | None) -> dict:
    """What an uploaded image looks like in words (image -> text), or why that is not available."""
    try:
        return engine.describe(image=ref, k=DESCRIBE_TERMS, tta=tta)
    except HistosearchError as exc:
        return {"results": [], "error": exc.message}


def _page(request: Request, engine: EngineDep, filters: FiltersDep, q: str, k: int, context: dict) -> HTMLResponse:
    page = query_context(request, "search", filters, q, k)
    page.update(
        tta_default=engine.queries.tta_default(load=False),
        settings_view={
            "min_confidence": engine.settings.min_confidence,
            "max_per_slide": engine.settings.max_per_slide,
        },
        **context,
    )
    result = page["result"]
    if result is not None:
        page["prev_url"], page["next_url"] = page_urls(request, result)
        # The page's own parameters, so the export holds exactly the results shown.
        same = request.url.include_query_params(k=result["k"], offset=result["offset"])
        page["export_json"] = f"{page['api_path']}?{same.query}"
        page["export_csv"] = f"{page['api_path']}?{same.include_query_params(format='csv').query}"
        page["result"] = ranked_links(result)
    return render(request, "search.html", page)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def search_page(
    request: Request,
    engine: EngineDep,
    filters: FiltersDep,
    options: OptionsDep,
    q: str = "",
    image: str = "",
    k: K = DEFAULT_K,
    offset: Offset = 0,
) -> Response:
    if (clean := clean_url(request)) is not None:
        return RedirectResponse(clean, status_code=303)
    context: dict = {"image": image, "options": options, "result": None}
    carry = {**filter_params(filters), **option_params(options)}
    if q.strip():
        context["result"] = engine.search_text(q, k, offset, filters, options)
        context.update(mode="text", api_path="/api/search", cases_url=url_with("/cases", q=q, **carry))
    elif image:
        context["result"] = engine.search_image(image, k, offset, filters, options)
        context.update(mode="image", api_path="/api/search", cases_url=url_with("/cases", image=image, **carry))
        context["query_image"] = context["result"]["query"]
        context["describe"] = _describe(engine, image, options.tta)
    return _page(request, engine, filters, q, k, context)


@router.post("/search/image", include_in_schema=False)
def search_image_form(
    engine: EngineDep,
    image: UploadedImage,
    filters: FormFiltersDep,
    options: FormOptionsDep,
    k: Annotated[int, Form(ge=1)] = DEFAULT_K,
) -> RedirectResponse:
    # Post/redirect/get: the results page is a plain GET that can be reloaded, paged and shared.
    ref = engine.image_ref(image, options.tta)
    params = {**filter_params(filters), **option_params(options)}
    return RedirectResponse(url_with("/", image=ref, k=k, **params), status_code=303)


@router.get("/similar/{tile_id}", response_class=HTMLResponse, include_in_schema=False)
def similar_page(
    request: Request,
    engine: EngineDep,
    filters: FiltersDep,
    options: OptionsDep,
    tile_id: TileId,
    k: K = DEFAULT_K,
    offset: Offset = 0,
) -> Response:
    if (clean := clean_url(request)) is not None:
        return RedirectResponse(clean, status_code=303)
    carry = {**filter_params(filters), **option_params(options)}
    context = {
        "options": options,
        "mode": "similar",
        "result": engine.similar(tile_id, k, offset, filters, options),
        "query_tile": engine.tile(tile_id),
        "api_path": f"/api/similar/{tile_id}",
        "cases_url": url_with("/cases", tile=tile_id, **carry),
    }
    return _page(request, engine, filters, "", k, context)


@router.get("/api/search", tags=["search"], response_model=None)
def api_search(
    engine: EngineDep,
    filters: FiltersDep,
    options: OptionsDep,
    q: Annotated[str | None, Query(description="a morphology description")] = None,
    image: Annotated[str | None, Query(description="the image reference an image query returned")] = None,
    k: K = DEFAULT_K,
    offset: Offset = 0,
    format: Format = "json",
) -> dict | Response:
    """Tiles ranked by similarity to a text (``q``) or to an image uploaded before (``image``).

    Filters: ``source``, ``slide``, ``case`` and ``meta.<key>=<value>``. Options: ``min_confidence``,
    ``max_per_slide``, ``same_scale``, ``magnification``, ``tta``, ``plus``/``minus`` (repeatable) and
    ``weight``. ``format=csv`` exports the page."""
    if q is not None:
        return _answer(engine.search_text(q, k, offset, filters, options), format, "search")
    if image:
        return _answer(engine.search_image(image, k, offset, filters, options), format, "search")
    raise BadQuery("give q=<morphology description> or image=<reference from POST /api/search/image>")


@router.post("/api/search/image", tags=["search"], response_model=None)
def api_search_image(
    engine: EngineDep,
    image: UploadedImage,
    filters: FormFiltersDep,
    options: FormOptionsDep,
    k: Annotated[int, Form(ge=1)] = DEFAULT_K,
    offset: Annotated[int, Form(ge=0)] = 0,
) -> dict:
    """Tiles ranked by similarity to an uploaded image (multipart field ``image``; options as form fields)."""
    return ranked_links(engine.search_image(image, k, offset, filters, options))


@router.get("/api/similar/{tile_id}", tags=["search"], response_model=None)
def api_similar(
    engine: EngineDep,
    filters: FiltersDep,
    options: OptionsDep,
    tile_id: TileId,
    k: K = DEFAULT_K,
    offset: Offset = 0,
    format: Format = "json",
) -> dict | Response:
    """Tiles like an indexed tile, from its stored embedding; the tile itself is left out, and with
    ``exclude_case=1`` every tile of its case."""
    return _answer(engine.similar(tile_id, k, offset, filters, options), format, f"similar-{tile_id}")
