"""The login form: the one page open without the access token when ``auth_token`` is set."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ..deps import SettingsDep
from ..pages import render

router = APIRouter(include_in_schema=False)

SESSION_COOKIE = "histosearch_session"


def session_value(token: str) -> str:
    """What the login cookie holds: derived from the token, so the token itself never sits in a cookie."""
    return hmac.new(token.encode(), b"histosearch web session", hashlib.sha256).hexdigest()


def safe_next(target: str) -> str:
    """Only a path on this server: a login link must not bounce the user to another site."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    return render(request, "login.html", {"page": "login", "next": safe_next(next)})


@router.post("/login")
def login(
    request: Request, settings: SettingsDep, token: Annotated[str, Form()], next: Annotated[str, Form()] = "/"
) -> Response:
    expected = settings.auth_token
    if expected is None:
        return RedirectResponse(safe_next(next), status_code=303)
    if not hmac.compare_digest(token.encode(), expected.encode()):
        context = {"page": "login", "next": safe_next(next), "message": "That token is not this server's token."}
        return render(request, "login.html", context, status_code=401)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, session_value(expected), httponly=True, samesite="lax")
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response
