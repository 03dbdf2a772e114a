"""Tile images by id only (never a path from the client), and uploaded patches by their reference."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from search.engine.tiles import RENDER_VERSION

from ..deps import EngineDep, SettingsDep, TileId
from ..errors import IMAGE_RESPONSES
from ..urls import VERSION_CHARS

router = APIRouter()

Version = Annotated[str | None, Query(max_length=64, description="the content version the pages link with")]
UploadRef = Annotated[str, Path(pattern="^[0-9a-f]{20}$", description="an uploaded image's reference")]


async def _image(
    request: Request, engine: EngineDep, settings: SettingsDep, tile_id: int, thumbnail: bool, v: str | None
) -> Response:
    content_hash = await run_in_threadpool(engine.tile_hash, tile_id)
    version = content_hash[:VERSION_CHARS]
    etag = f'"{"thumb" if thumbnail else "tile"}-{tile_id}-{version}-r{RENDER_VERSION}"'
    scope = "private" if settings.auth_token else "public"
    # The pages link each image with its content in the URL (?v=): that URL names one image for good. A
    # bare id may name other pixels after a rebuild, so the browser asks again (cheap: 304 by ETag).
    cache = f"{scope}, max-age=31536000, immutable" if v == version else f"{scope}, no-cache"
    headers = {"ETag": etag, "Cache-Control": cache}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    data, content_type = await run_in_threadpool(engine.tile_bytes, tile_id, thumbnail)
    return Response(data, media_type=content_type, headers=headers)


@router.get("/images/tiles/{tile_id}.jpg", tags=["images"], response_class=Response, responses=IMAGE_RESPONSES)
async def tile_image(
    request: Request, engine: EngineDep, settings: SettingsDep, tile_id: TileId, v: Version = None
) -> Response:
    """The tile at full size (JPEG, or the archive's own PNG/WebP bytes; see Content-Type)."""
    return await _image(request, engine, settings, tile_id, thumbnail=False, v=v)


@router.get("/images/thumbs/{tile_id}.jpg", tags=["images"], response_class=Response, responses=IMAGE_RESPONSES)
async def thumbnail_image(
    request: Request, engine: EngineDep, settings: SettingsDep, tile_id: TileId, v: Version = None
) -> Response:
    """A JPEG thumbnail at most 192 px on a side."""
    return await _image(request, engine, settings, tile_id, thumbnail=True, v=v)


@router.get("/images/uploads/{ref}.jpg", tags=["images"], response_class=Response, responses=IMAGE_RESPONSES)
def upload_image(engine: EngineDep, settings: SettingsDep, ref: UploadRef) -> Response:
    """The patch uploaded under ``ref`` (the ``image`` an image query answered), as a small JPEG."""
    scope = "private" if settings.auth_token else "public"
    # The reference is the upload's content hash: it names one image for good.
    headers = {"Cache-Control": f"{scope}, max-age=31536000, immutable"}
    return Response(engine.upload_preview(ref)["jpeg"], media_type="image/jpeg", headers=headers)
