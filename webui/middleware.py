"""The ASGI middlewares around every request: security headers, the access token, the Origin check, the
body limit. (Host names are checked by Starlette's TrustedHostMiddleware, set up in ``app.py``.)"""

from __future__ import annotations

import hmac
from urllib.parse import quote, urlsplit

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from search.core.errors import Forbidden, PayloadTooLarge, Unauthorized

from .errors import SECURITY_HEADERS, render_error
from .privacy import auth_of
from .sessions import SessionKeeper

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class SecurityHeaders:
    """The headers of ``errors.SECURITY_HEADERS`` on every answer that does not carry them already."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.headers = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in self.headers if name not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class TokenAuth:
    """With ``auth_token`` set, every route but the login form needs it: a Bearer header or a login session.

    The way the request authenticated is left in ``request.state.auth`` for the Origin check and the
    admin views (server paths on /status).
    """

    def __init__(self, app: ASGIApp, token: str, sessions: SessionKeeper, cookie_name: str) -> None:
        self.app = app
        self.token = token.encode()
        self.sessions = sessions
        self.cookie_name = cookie_name

    def _auth(self, request: Request) -> str | None:
        authorization = request.headers.get("authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self.token):
            return "bearer"
        cookie = request.cookies.get(self.cookie_name)
        if cookie and self.sessions.valid(cookie):
            return "cookie"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        auth = self._auth(request)
        scope.setdefault("state", {})["auth"] = auth
        path = scope["path"]
        if auth is not None or path == "/login" or path.startswith("/static/"):
            await self.app(scope, receive, send)
            return
        if request.method == "GET" and not (path == "/api" or path.startswith(("/api/", "/images/"))):
            target = path + (f"?{request.url.query}" if request.url.query else "")
            response: Response = RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        else:
            message = (
                "this server needs its access token: send the header 'Authorization: Bearer <token>', "
                "or log in at /login"
            )
            response = render_error(request, 401, Unauthorized.code, message)
        await response(scope, receive, send)


class OriginCheck:
    """Refuses a POST (or any unsafe method) sent by a page of another site: cross-site request forgery.

    A browser names the page's origin in ``Origin`` (or at least ``Referer``) on every POST; when one is
    sent it must be this server's host. A request that authenticated with the login cookie must send one,
    since SameSite=Lax alone leaves older browsers and same-site subdomains open. Bearer clients (scripts,
    curl) are not browsers and send neither.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        problem = self._problem(request)
        if problem is None:
            await self.app(scope, receive, send)
            return
        error = Forbidden(f"{problem}: a form of this server can be sent only from its own pages")
        await render_error(request, error.status, error.code, error.message)(scope, receive, send)

    @staticmethod
    def _problem(request: Request) -> str | None:
        host = request.headers.get("host", "").lower()
        origin = request.headers.get("origin")
        referer = request.headers.get("referer")
        if origin is not None:
            if origin == "null" or urlsplit(origin).netloc.lower() != host:
                return f"cross-site request (Origin {origin!r} is not {host!r})"
            return None
        if referer:
            if urlsplit(referer).netloc.lower() != host:
                return "cross-site request (its Referer is another site)"
            return None
        if auth_of(request) == "cookie":
            return "request with the login cookie but without an Origin or Referer header"
        return None


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413 before any route parses them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLarge(
            f"request body over {self.limit} bytes: uploads are limited to the setting max_upload_bytes"
        )
        response = render_error(Request(scope), error.status, error.code, error.message)
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
