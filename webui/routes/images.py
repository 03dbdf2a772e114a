"""Tile images by id only (never a path from the client), cached by the browser for good."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from search.engine.tiles import RENDER_VERSION

from ..deps import EngineDep, SettingsDep

router = APIRouter()


async def _image(request: Request, engine: EngineDep, settings: SettingsDep, tile_id: int, thumbnail: bool) -> Response:
    # Tile ids are never reused and a changed tile gets a new id, so an id names one image forever.
    etag = f'"{"thumb" if thumbnail else "tile"}-{tile_id}-v{RENDER_VERSION}"'
    scope = "private" if settings.auth_token else "public"
    headers = {"ETag": etag, "Cache-Control": f"{scope}, max-age=31536000, immutable"}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    data, content_type = await run_in_threadpool(engine.tile_bytes, tile_id, thumbnail)
    return Response(data, media_type=content_type, headers=headers)


@router.get("/images/tiles/{tile_id}.jpg", tags=["images"])
async def tile_image(request: Request, engine: EngineDep, settings: SettingsDep, tile_id: int) -> Response:
    """The tile at full size (JPEG, or the archive's own PNG/WebP bytes; see Content-Type)."""
    return await _image(request, engine, settings, tile_id, thumbnail=False)


@router.get("/images/thumbs/{tile_id}.jpg", tags=["images"])
async def thumbnail_image(request: Request, engine: EngineDep, settings: SettingsDep, tile_id: int) -> Response:
    """A JPEG thumbnail at most 192 px on a side."""
    return await _image(request, engine, settings, tile_id, thumbnail=True)
