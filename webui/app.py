"""The web UI and JSON API: ``create_app(settings)`` builds it (``server.serve`` runs it with uvicorn).

Pages are rendered on the server (text search works with JavaScript off); every page has a JSON
twin under ``/api`` that returns the same engine dict with links added (``urls.py``). Errors have one
shape (``errors.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from search.core.settings import Settings
from search.engine.engine import Engine

from .errors import add_error_handlers
from .middleware import BodyLimit, SecurityHeaders, TokenAuth
from .pages import make_templates
from .routes import cases, describe, evaluation, images, login, query_log, search, slides, status, tiles

# Room for the multipart framing and form fields around an upload of max_upload_bytes.
FORM_OVERHEAD_BYTES = 64 * 1024


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The FastAPI app over ``engine`` (built from ``settings`` when not given)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.engine.close()

    app = FastAPI(
        title="histosearch",
        summary="Search pathology tiles by text, image or example tile with CONCH embeddings.",
        version="0.1.0",
        # The bundled Swagger/ReDoc pages load from a CDN; the schema stays at /openapi.json.
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine if engine is not None else Engine(settings)
    app.state.templates = make_templates()

    for module in (search, cases, slides, tiles, status, evaluation, images, login, describe, query_log):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    add_error_handlers(app)

    # Outermost first: security headers on every answer, then the token check, then the body limit,
    # so an unauthenticated client cannot make the server buffer an upload.
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + FORM_OVERHEAD_BYTES)
    if settings.auth_token:
        app.add_middleware(TokenAuth, token=settings.auth_token)
    app.add_middleware(SecurityHeaders)
    return app
