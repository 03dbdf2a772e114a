"""The query log an admin reads (page and JSON twin), and the uploaded query images it and the result
pages refer to. With an access token set (setting ``auth_token``), only its holders reach either."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse

from search.core.errors import NotFound

from ..deps import EngineDep
from ..pages import render

router = APIRouter()

Limit = Annotated[int, Query(ge=1, le=1000, description="entries per page")]
Offset = Annotated[int, Query(ge=0, description="entries to skip, newest first")]


@router.get("/query-log", response_class=HTMLResponse, include_in_schema=False)
def query_log_page(request: Request, engine: EngineDep, limit: Limit = 100, offset: Offset = 0) -> HTMLResponse:
    return render(request, "query_log.html", {"page": "query-log", "log": engine.query_log(limit, offset)})


@router.get("/api/query-log", tags=["admin"])
def api_query_log(engine: EngineDep, limit: Limit = 100, offset: Offset = 0) -> dict:
    """The newest queries first: text or image hash, filters, options, model, build, time, result count."""
    return engine.query_log(limit, offset)


@router.get("/images/uploads/{ref}.png", include_in_schema=False)
def upload_image(engine: EngineDep, ref: str) -> FileResponse:
    path = engine.queries.uploads.path(ref)
    if path is None or not path.is_file():
        raise NotFound(f"no uploaded image {ref!r} is kept (uploads are dropped oldest first): upload it again")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})
