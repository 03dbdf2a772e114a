"""Status: model, device, live index, jobs and recent errors; page and JSON twin."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from ..deps import EngineDep
from ..pages import render

router = APIRouter()


@router.get("/status", response_class=HTMLResponse, include_in_schema=False)
def status_page(request: Request, engine: EngineDep) -> HTMLResponse:
    return render(request, "status.html", {"page": "status", "status": engine.status()})


@router.get("/api/status", tags=["status"])
def api_status(engine: EngineDep) -> dict:
    """Counts, model, device, the live index, the last and the running job, recent file errors."""
    return engine.status()
