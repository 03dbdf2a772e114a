"""Error rendering: one JSON shape ``{"error": {"code", "message", "status"}}`` under ``/api``, an HTML
error page elsewhere, for our own errors, bad parameters, unknown routes and unexpected failures."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from search.core.errors import HistosearchError

from .pages import QUERY_PAGES, render_query_page
from .privacy import for_client

_HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}

# Nothing is loaded from anywhere but this server; inline scripts and styles are refused too.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# On every answer (middleware.SecurityHeaders), and set here on 500s, which Starlette answers outside
# every middleware.
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}

log = logging.getLogger("histosearch.webui")


class ErrorDetail(BaseModel):
    code: str
    message: str
    status: int


class ErrorBody(BaseModel):
    """Every error of the API: ``{"error": {"code", "message", "status"}}``."""

    error: ErrorDetail


# What an image route answers with 200 (its errors are ERROR_RESPONSES like every route's).
IMAGE_RESPONSES: dict = {200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}}}

ERROR_RESPONSES: dict = {
    "4XX": {"model": ErrorBody, "description": "the request cannot be answered; the message says what to do"},
    "5XX": {"model": ErrorBody, "description": "the server cannot answer (no index, no model, busy, internal)"},
}


def render_error(
    request: Request, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    """The error as JSON for an ``/api``, ``/images`` or other image path; on a query page (search, cases)
    the page itself with the error inline and the query kept; else the HTML error page. Server paths in
    5xx messages (a missing checkpoint) are shown whole only to the admin (``privacy.py``)."""
    if status >= 500:
        message = for_client(request, message)
    body = {"error": {"code": code, "message": message, "status": status}}
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 500:
        headers.update(SECURITY_HEADERS)
    # The API and the image routes (documented in the same schema) answer JSON; pages answer HTML.
    path = request.url.path
    if path == "/api" or path.startswith(("/api/", "/images/")) or path.endswith((".jpg", ".png")):
        return JSONResponse(body, status_code=status, headers=headers)
    if request.url.path in QUERY_PAGES and status in (400, 404, 413, 422, 503):
        return render_query_page(request, QUERY_PAGES[request.url.path], body["error"])
    state = request.app.state
    context = {"error": body["error"], "page": "", "auth_enabled": state.settings.auth_token is not None}
    return state.templates.TemplateResponse(request, "error.html", context, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Route every error the app can meet through ``render_error``."""

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
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        # A 405 names the methods the route allows (Allow), as HTTP asks.
        return render_error(request, exc.status_code, code, message, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return render_error(request, 500, "internal", "internal error: the server log has the details")
