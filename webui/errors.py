"""Error rendering: one JSON shape ``{"error": {"code", "message", "status"}}`` under ``/api``, an HTML
error page elsewhere, for our own errors, bad parameters, unknown routes and unexpected failures."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from search.core.errors import HistosearchError

_HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}

log = logging.getLogger("histosearch.webui")


def render_error(request: Request, status: int, code: str, message: str) -> Response:
    """The error as JSON for an ``/api`` path, else as the HTML error page."""
    body = {"error": {"code": code, "message": message, "status": status}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if request.url.path == "/api" or request.url.path.startswith("/api/"):
        return JSONResponse(body, status_code=status, headers=headers)
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
        return render_error(request, exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), message)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return render_error(request, 500, "internal", "internal error: the server log has the details")
