"""Every URL the web UI hands out, built from the ids and data the engine returns.

The JSON API serves the engine's answers with these links added; templates call the same functions
(registered as Jinja globals in ``pages.py``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import Request

from search.engine.filters import Filters


def tile_url(tile_id: int) -> str:
    """The tile's page."""
    return f"/tiles/{tile_id}"


def thumbnail_url(tile_id: int) -> str:
    """The tile's 192 px JPEG thumbnail."""
    return f"/images/thumbs/{tile_id}.jpg"


def image_url(tile_id: int) -> str:
    """The tile's image at full size."""
    return f"/images/tiles/{tile_id}.jpg"


def with_tile_links(item: dict) -> dict:
    """A hit or neighbour (anything with ``tile_id``) with its thumbnail and page links."""
    return {**item, "thumbnail_url": thumbnail_url(item["tile_id"]), "url": tile_url(item["tile_id"])}


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
        "image_url": image_url(tile["tile_id"]),
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


def url_with(path: str, **params: Any) -> str:
    """``path`` with the given query parameters; None values are left out."""
    query = urlencode({key: value for key, value in params.items() if value is not None})
    return f"{path}?{query}" if query else path


def page_urls(request: Request, result: dict) -> tuple[str | None, str | None]:
    """Previous and next page links of a ranked result, keeping every other query parameter."""
    k, offset = result["k"], result["offset"]
    params = dict(request.query_params)
    prev_url = next_url = None
    if offset > 0:
        prev_url = url_with(request.url.path, **{**params, "offset": max(0, offset - k)})
    if len(result["results"]) == k and offset + k < result["total"]:
        next_url = url_with(request.url.path, **{**params, "offset": offset + k})
    return prev_url, next_url
