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
from starlette.middleware.trustedhost import TrustedHostMiddleware

from search.archives.decode import UploadDecoder
from search.core.settings import Settings
from search.engine.engine import Engine

from .errors import ERROR_RESPONSES, add_error_handlers
from .middleware import BodyLimit, OriginCheck, SecurityHeaders, TokenAuth
from .pages import make_templates
from .routes import cases, describe, evaluation, facets, images, login, query_log, search, slides, status, tiles
from .sessions import SessionKeeper, session_cookie_name

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
        # Every error in one documented shape, so clients (and the schema fuzzer in the tests) can rely on it.
        responses=ERROR_RESPONSES,
    )
    app.state.settings = settings
    app.state.engine = engine if engine is not None else Engine(settings)
    app.state.templates = make_templates()
    app.state.upload_decoder = UploadDecoder(settings.max_upload_pixels, settings.max_upload_decodes)
    app.state.sessions = SessionKeeper(settings.auth_token, settings.session_max_age_s) if settings.auth_token else None

    for module in (search, cases, slides, tiles, facets, status, evaluation, images, login, describe, query_log):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    add_error_handlers(app)

    # Outermost first: security headers on every answer, then the Host check (a rebinding domain gets
    # nothing), the token check, the Origin check (needs to know how the request authenticated), and the
    # body limit last, so an unauthenticated or cross-site client cannot make the server buffer an upload.
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + FORM_OVERHEAD_BYTES)
    app.add_middleware(OriginCheck)
    if settings.auth_token:
        app.add_middleware(
            TokenAuth, token=settings.auth_token, sessions=app.state.sessions, cookie_name=session_cookie_name(settings)
        )
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(settings), www_redirect=False)
    app.add_middleware(SecurityHeaders)
    return app


def allowed_hosts(settings: Settings) -> list[str]:
    """The ``allowed_hosts`` setting, plus the address ``serve`` binds when that is one address (not 0.0.0.0)."""
    hosts = list(settings.allowed_hosts)
    bound = settings.host.strip("[]")
    if bound and bound not in ("0.0.0.0", "::"):
        name = f"[{bound}]" if ":" in bound else bound.lower()
        if name not in hosts:
            hosts.append(name)
    return hosts
