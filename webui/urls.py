"""Every URL the web UI hands out, built from the ids and data the engine returns.

The JSON API serves the engine's answers with these links added; templates call the same functions
(registered as Jinja globals in ``pages.py``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from fastapi import Request

from search.engine.filters import Filters
from search.engine.options import SearchOptions

VERSION_CHARS = 16


def tile_url(tile_id: int) -> str:
    """The tile's page."""
    return f"/tiles/{tile_id}"


def _version(content_hash: str | None) -> str:
    # The content in the URL: a browser keeps an image for a year, and a rebuilt index may give an id
    # to other pixels. Without it the image is revalidated on each view.
    return f"?v={quote(content_hash[:VERSION_CHARS], safe='')}" if content_hash else ""


def thumbnail_url(tile_id: int, content_hash: str | None = None) -> str:
    """The tile's 192 px JPEG thumbnail."""
    return f"/images/thumbs/{tile_id}.jpg{_version(content_hash)}"


def image_url(tile_id: int, content_hash: str | None = None) -> str:
    """The tile's image at full size."""
    return f"/images/tiles/{tile_id}.jpg{_version(content_hash)}"


def upload_url(ref: str) -> str:
    """A small JPEG of the image uploaded under ``ref``."""
    return f"/images/uploads/{ref}.jpg"


def with_tile_links(item: dict) -> dict:
    """A hit or neighbour (anything with ``tile_id``) with its thumbnail and page links."""
    tile_id, content_hash = item["tile_id"], item.get("content_hash")
    return {**item, "thumbnail_url": thumbnail_url(tile_id, content_hash), "url": tile_url(tile_id)}


def ranked_links(result: dict) -> dict:
    """A ranked result (search, similar) with links on every hit."""
    return {**result, "results": [with_tile_links(hit) for hit in result["results"]]}


def cases_links(result: dict) -> dict:
    """A cases result with links on the tiles of every case and of every slide."""
    cases = [
        {
            **case,
            "tiles": [with_tile_links(t) for t in case["tiles"]],
            "slides": [{**s, "tiles": [with_tile_links(t) for t in s["tiles"]]} for s in case["slides"]],
        }
        for case in result["results"]
    ]
    return {**result, "results": cases}


def tile_links(tile: dict) -> dict:
    """A tile's details with its own links, its full-size image and links on its neighbours."""
    return {
        **with_tile_links(tile),
        "image_url": image_url(tile["tile_id"], tile.get("content_hash")),
        "neighbours": [with_tile_links(n) for n in tile["neighbours"]],
    }


def eval_run_url(run_id: int, metric: str | None = None) -> str:
    """An evaluation run's page, optionally with the per-class bars of ``metric``."""
    return url_with(f"/eval/{run_id}", metric=metric)


def eval_run_links(run: dict) -> dict:
    """An evaluation run with its page and JSON links."""
    return {**run, "url": eval_run_url(run["id"]), "json_url": f"/api/eval/runs/{run['id']}"}


def filter_params(filters: Filters) -> dict[str, str]:
    """The query parameters that reproduce ``filters``."""
    params = {name: getattr(filters, name) for name in ("source", "slide", "case") if getattr(filters, name)}
    params.update({f"meta.{key}": value for key, value in filters.meta.items()})
    return params


def option_params(options: SearchOptions) -> dict[str, Any]:
    """The query parameters that reproduce ``options`` (``plus``/``minus`` as lists)."""
    params: dict[str, Any] = {}
    for name in ("min_confidence", "max_per_slide", "magnification"):
        if getattr(options, name) is not None:
            params[name] = getattr(options, name)
    for name in ("exclude_case", "same_scale"):
        if getattr(options, name):
            params[name] = 1
    if options.tta is not None:
        params["tta"] = int(options.tta)
    if options.plus or options.minus:
        params.update(plus=list(options.plus), minus=list(options.minus), weight=options.weight)
    return params


def url_with(path: str, **params: Any) -> str:
    """``path`` with the given query parameters (a list value repeats its name); None and empty values are
    left out."""
    kept = {key: value for key, value in params.items() if value is not None and value != ""}
    query = urlencode(kept, doseq=True)
    return f"{path}?{query}" if query else path


def clean_url(request: Request) -> str | None:
    """The request's URL without its empty query parameters, or None when it has none."""
    params = list(request.query_params.multi_items())
    if all(value != "" for _, value in params):
        return None
    query = urlencode([(key, value) for key, value in params if value != ""])
    return request.url.path + (f"?{query}" if query else "")


def filter_chips(request: Request, filters: Filters, labels: dict[str, str] | None = None) -> list[dict]:
    """The filters in force, each with the URL of this page without it (a removable chip)."""
    params = _query_params(request)
    params.pop("offset", None)  # another filter, another ranking: back to the first page
    chips = []
    for name, value in filter_params(filters).items():
        label = (labels or {}).get(value, value) if name == "source" else value
        rest = {key: item for key, item in params.items() if key != name}
        chips.append(
            {"name": name.removeprefix("meta."), "value": label, "remove_url": url_with(request.url.path, **rest)}
        )
    return chips


def page_urls(request: Request, result: dict) -> tuple[str | None, str | None]:
    """Previous and next page links of a ranked result, keeping every other query parameter."""
    k, offset = result["k"], result["offset"]
    params = _query_params(request)
    prev_url = next_url = None
    if offset > 0:
        prev_url = url_with(request.url.path, **{**params, "offset": max(0, offset - k)})
    if len(result["results"]) == k and offset + k < result["total"]:
        next_url = url_with(request.url.path, **{**params, "offset": offset + k})
    return prev_url, next_url


def slide_url(slide: int | str, **params: Any) -> str:
    """The slide's page (thumbnail, heatmap of a query, similar slides); ``slide`` is its id or key."""
    return url_with(f"/slides/{quote(str(slide), safe='')}", **params)


def slide_thumbnail_url(slide_id: int) -> str:
    return f"/slides/{slide_id}/thumbnail.jpg"


def slide_heatmap_png_url(slide_id: int, **query: Any) -> str:
    """The heatmap as a PNG of one pixel per tile-grid cell."""
    return url_with(f"/slides/{slide_id}/heatmap.png", **query)


def heatmap_query(names: dict) -> dict[str, Any]:
    """The query parameters that name a heatmap query (``{"text": ...}`` -> ``q``, ``tile_id`` -> ``tile``)."""
    return {"q": names.get("text"), "tile": names.get("tile_id"), "image": names.get("image")}


def with_slide_links(item: dict) -> dict:
    """A slide result (anything with ``id``) with its page and thumbnail links, and links on its best tiles."""
    out = {**item, "url": slide_url(item["id"]), "thumbnail_url": slide_thumbnail_url(item["id"])}
    if "best_tiles" in item:
        out["best_tiles"] = [with_tile_links(t) for t in item["best_tiles"]]
    return out


def slides_links(result: dict) -> dict:
    """A slide ranking (similar slides, text -> slide) with links on every slide."""
    return {**result, "results": [with_slide_links(r) for r in result["results"]]}


def slide_links(slide: dict) -> dict:
    """A slide's details with its links and links on its tiles."""
    return {**with_slide_links(slide), "tiles": [with_tile_links(t) for t in slide["tiles"]]}


def heatmap_links(heatmap: dict) -> dict:
    """A heatmap with its PNG link and a tile link on every cell."""
    png = slide_heatmap_png_url(heatmap["slide_id"], **heatmap_query(heatmap["query"]))
    return {**heatmap, "png_url": png, "cells": [with_tile_links(c) for c in heatmap["cells"]]}


def with_filter(request: Request, name: str, value: str) -> str:
    """This page with one more filter (``name=value``), from its first result."""
    params = {key: item for key, item in _query_params(request).items() if key != "offset"}
    return url_with(request.url.path, **{**params, name: value})


def _query_params(request: Request) -> dict[str, Any]:
    """The request's query parameters for ``url_with``: a repeated name (``plus``, ``minus``) as a list."""
    params = {key: request.query_params.getlist(key) for key in request.query_params}
    return {key: values[0] if len(values) == 1 else values for key, values in params.items()}


def back_here(request: Request) -> str:
    """This page's path and query, quoted for a ``back=`` parameter (the tile page's way back)."""
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return quote(here, safe="")


def safe_next(target: str) -> str:
    """Only a path on this server: a login or back link must not bounce the user to another site."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
