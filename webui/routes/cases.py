"""Find similar cases: the nearest tiles grouped by case and slide; page and JSON twin."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from search.core.errors import BadQuery

from ..deps import EngineDep, FiltersDep, FormFiltersDep, FormOptionsDep, OptionsDep, TileQuery, UploadedImage
from ..pages import query_context, render
from ..urls import cases_links, clean_url, filter_params, option_params, url_with

router = APIRouter()

DEFAULT_CASES = 20
CasesK = Annotated[int, Query(ge=1, description="cases to return")]
TopTiles = Annotated[int, Query(ge=1, description="nearest tiles grouped into cases")]
PerCase = Annotated[int, Query(ge=1, description="best tiles per case averaged into its score")]


@router.get("/cases", response_class=HTMLResponse, include_in_schema=False)
def cases_page(
    request: Request,
    engine: EngineDep,
    filters: FiltersDep,
    options: OptionsDep,
    q: str = "",
    image: str = "",
    tile: TileQuery = None,
    k: CasesK = DEFAULT_CASES,
    top_tiles: TopTiles = 200,
    per_case: PerCase = 3,
) -> Response:
    if (clean := clean_url(request)) is not None:
        return RedirectResponse(clean, status_code=303)
    context = query_context(request, "cases", filters, q, k)
    options = {"top_tiles": top_tiles, "per_case": per_case, "k": k, "filters": filters, "options": options}
    if q.strip():
        context.update(mode="text", result=engine.cases(text=q, **options))
    elif image:
        context.update(mode="image", result=engine.cases(image=image, **options))
        context["query_image"] = context["result"]["query"]
    elif tile is not None:
        context.update(mode="similar", result=engine.cases(tile_id=tile, **options), query_tile=engine.tile(tile))
    if context["result"] is not None:
        context["result"] = cases_links(context["result"])
    return render(request, "cases.html", context)


@router.post("/cases/image", include_in_schema=False)
def cases_image_form(
    engine: EngineDep,
    image: UploadedImage,
    filters: FormFiltersDep,
    options: FormOptionsDep,
    k: Annotated[int, Form(ge=1)] = DEFAULT_CASES,
) -> RedirectResponse:
    ref = engine.image_ref(image, options.tta)
    params = {**filter_params(filters), **option_params(options)}
    return RedirectResponse(url_with("/cases", image=ref, k=k, **params), status_code=303)


@router.get("/api/cases", tags=["cases"])
def api_cases(
    engine: EngineDep,
    filters: FiltersDep,
    options: OptionsDep,
    q: Annotated[str | None, Query(description="a morphology description")] = None,
    image: Annotated[str | None, Query(description="the image reference an image query returned")] = None,
    tile: TileQuery = None,
    k: CasesK = DEFAULT_CASES,
    top_tiles: TopTiles = 200,
    per_case: PerCase = 3,
) -> dict:
    """Cases ranked by the mean score of their best tiles among the nearest ``top_tiles`` (one of q, image, tile)."""
    if sum(x is not None for x in (q, image, tile)) != 1:
        raise BadQuery("give exactly one of q=<text>, image=<reference> or tile=<tile id>")
    result = engine.cases(
        text=q,
        image=image,
        tile_id=tile,
        top_tiles=top_tiles,
        per_case=per_case,
        k=k,
        filters=filters,
        options=options,
    )
    return cases_links(result)


@router.post("/api/cases/image", tags=["cases"])
def api_cases_image(
    engine: EngineDep,
    image: UploadedImage,
    filters: FormFiltersDep,
    options: FormOptionsDep,
    k: Annotated[int, Form(ge=1)] = DEFAULT_CASES,
    top_tiles: Annotated[int, Form(ge=1)] = 200,
    per_case: Annotated[int, Form(ge=1)] = 3,
) -> dict:
    """Cases like an uploaded patch (multipart field ``image``)."""
    result = engine.cases(image=image, top_tiles=top_tiles, per_case=per_case, k=k, filters=filters, options=options)
    return cases_links(result)
