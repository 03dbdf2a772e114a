"""The query log an admin reads (page and JSON twin). With an access token set (setting ``auth_token``),
only its holders reach it. The uploaded images it names are served by ``/images/uploads/{ref}.jpg``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

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
