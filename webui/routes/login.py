"""The login form: the one page open without the access token when ``auth_token`` is set.

Logging in starts a session (``sessions.py``): a signed, expiring cookie that logging out ends.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ..deps import SettingsDep
from ..pages import render
from ..sessions import session_cookie_name
from ..urls import safe_next

router = APIRouter(include_in_schema=False)


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
    response.set_cookie(
        session_cookie_name(settings),
        request.app.state.sessions.start(),
        max_age=settings.session_max_age_s,
        httponly=True,
        samesite="lax",
        # Over HTTPS (uvicorn reads X-Forwarded-Proto from a local proxy) the cookie never travels in clear.
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
def logout(request: Request, settings: SettingsDep) -> Response:
    name = session_cookie_name(settings)
    sessions = request.app.state.sessions
    if sessions is not None and name in request.cookies:
        sessions.end(request.cookies[name])
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(name, httponly=True, samesite="lax", secure=request.url.scheme == "https")
    return response
