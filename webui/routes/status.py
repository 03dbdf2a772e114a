"""Status: model, device, live index, jobs and recent errors; page and JSON twin."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from ..deps import EngineDep
from ..pages import render
from ..privacy import for_client

router = APIRouter()


@router.get("/status", response_class=HTMLResponse, include_in_schema=False)
def status_page(request: Request, engine: EngineDep) -> HTMLResponse:
    return render(request, "status.html", {"page": "status", "status": for_client(request, engine.status())})


@router.get("/api/status", tags=["status"])
def api_status(request: Request, engine: EngineDep) -> dict:
    """Counts, model, device, the live index, the last and the running job (with the files it refused),
    recent file errors. Server paths are cut to their last part unless the client sent the access token."""
    return for_client(request, engine.status())
