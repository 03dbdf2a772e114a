"""The web UI and JSON API: ``create_app(settings)`` builds it, ``serve(settings)`` runs it with uvicorn.

Pages are rendered on the server (text search works with JavaScript off); every page has a JSON
twin under ``/api`` that returns the same engine dict. Errors have one shape: JSON
``{"error": {"code", "message", "status"}}`` under ``/api`` and an HTML page elsewhere.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from search.core.errors import HistosearchError, PayloadTooLarge, Unauthorized
from search.core.settings import Settings
from search.engine.engine import Engine

from .routes import cases, images, login, search, status, tiles

HERE = Path(__file__).parent
# Room for the multipart framing and form fields around an upload of max_upload_bytes.
FORM_OVERHEAD_BYTES = 64 * 1024
# Nothing is loaded from anywhere but this server; inline scripts and styles are refused too.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}

log = logging.getLogger("histosearch.webui")


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
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.trim_blocks = templates.env.lstrip_blocks = True
    templates.env.filters["when"] = _when
    app.state.templates = templates

    for module in (search, cases, tiles, status, images, login):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def render_error(request: Request, status: int, code: str, message: str) -> Response:
        body = {"error": {"code": code, "message": message, "status": status}}
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if request.url.path == "/api" or request.url.path.startswith("/api/"):
            return JSONResponse(body, status_code=status, headers=headers)
        context = {"error": body["error"], "page": "", "auth_enabled": settings.auth_token is not None}
        return app.state.templates.TemplateResponse(request, "error.html", context, status_code=status, headers=headers)

    @app.exception_handler(HistosearchError)
    async def _histosearch_error(request: Request, exc: HistosearchError) -> Response:
        return render_error(request, exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in exc.errors())
        return render_error(request, 422, "validation", f"bad request parameters: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = f"no page or API route at {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return render_error(request, exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), message)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return render_error(request, 500, "internal", "internal error: the server log has the details")

    # Outermost first: security headers on every answer, then the token check, then the body limit,
    # so an unauthenticated client cannot make the server buffer an upload.
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + FORM_OVERHEAD_BYTES, render_error=render_error)
    if settings.auth_token:
        app.add_middleware(TokenAuth, token=settings.auth_token, render_error=render_error)
    app.add_middleware(SecurityHeaders)
    return app


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                headers += [
                    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class TokenAuth:
    """With ``auth_token`` set, every route but the login form needs it: a Bearer header or the login cookie."""

    def __init__(self, app: ASGIApp, token: str, render_error) -> None:
        self.app = app
        self.token = token.encode()
        self.session = login.session_value(token).encode()
        self.render_error = render_error

    def _allowed(self, request: Request) -> bool:
        authorization = request.headers.get("authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self.token):
            return True
        cookie = request.cookies.get(login.SESSION_COOKIE, "")
        return hmac.compare_digest(cookie.encode(), self.session)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/login" or scope["path"].startswith("/static/"):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if self._allowed(request):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if request.method == "GET" and not (path == "/api" or path.startswith(("/api/", "/images/"))):
            target = path + (f"?{request.url.query}" if request.url.query else "")
            response: Response = RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        else:
            message = (
                "this server needs its access token: send the header 'Authorization: Bearer <token>', "
                "or log in at /login"
            )
            response = self.render_error(request, 401, Unauthorized.code, message)
        await response(scope, receive, send)


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413 before any route parses them."""

    def __init__(self, app: ASGIApp, limit: int, render_error) -> None:
        self.app = app
        self.limit = limit
        self.render_error = render_error

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLarge(
            f"request body over {self.limit} bytes: uploads are limited to the setting max_upload_bytes"
        )
        response = self.render_error(Request(scope), error.status, error.code, error.message)
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await self._refuse(scope, receive, send)
            return
        # A body without a (truthful) length is read here up to the limit, then replayed to the route.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _when(iso: str | None) -> str:
    """An ISO timestamp from the store as '2025-01-31 14:05 UTC' for people."""
    if not iso:
        return ""
    moment = datetime.fromisoformat(iso).astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: Settings) -> None:
    """Run the web UI with uvicorn on ``settings.host:settings.port`` (127.0.0.1 unless told otherwise)."""
    import uvicorn

    if not _is_loopback(settings.host) and not settings.auth_token:
        print(
            f"histosearch: warning: serving on {settings.host} without an access token: anyone who can reach "
            "this port can search the archive; set HISTOSEARCH_AUTH_TOKEN",
            file=sys.stderr,
        )
    app = create_app(settings)

    def warm_up() -> None:
        for problem in app.state.engine.warm_up():
            log.warning("%s", problem)

    # The model takes seconds to load: do it while the server starts, not in the first user's query.
    threading.Thread(target=warm_up, name="histosearch-warm-up", daemon=True).start()
    uvicorn.run(app, host=settings.host, port=settings.port, server_header=False)
