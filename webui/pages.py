"""Page rendering: the Jinja templates, their filters and URL helpers, and the context every page gets."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from . import urls

TEMPLATES = Path(__file__).parent / "templates"
K_CHOICES = (12, 24, 48, 96)
DEFAULT_K = 24


def make_templates() -> Jinja2Templates:
    """The page templates, with the ``when`` filter and the tile and evaluation URL builders as globals."""
    templates = Jinja2Templates(directory=TEMPLATES)
    templates.env.trim_blocks = templates.env.lstrip_blocks = True
    templates.env.filters["when"] = when
    templates.env.globals.update(tile_url=urls.tile_url, thumbnail_url=urls.thumbnail_url, image_url=urls.image_url)
    templates.env.globals.update(eval_run_url=urls.eval_run_url)
    templates.env.globals.update(slide_url=urls.slide_url)
    return templates


def render(request: Request, template: str, context: dict, status_code: int = 200) -> HTMLResponse:
    """A page from ``template``; the context never carries the settings (they hold the auth token)."""
    settings = request.app.state.settings
    base = {
        "auth_enabled": settings.auth_token is not None,
        "max_query_chars": settings.max_query_chars,
        "page": "",
    }
    if isinstance(context.get("k"), int):
        base["k_choices"] = sorted({*(c for c in K_CHOICES if c <= settings.max_k), context["k"]})
    return request.app.state.templates.TemplateResponse(request, template, {**base, **context}, status_code=status_code)


def when(iso: str | None) -> str:
    """An ISO timestamp from the store as '2025-01-31 14:05 UTC' for people."""
    if not iso:
        return ""
    moment = datetime.fromisoformat(iso).astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M UTC")
