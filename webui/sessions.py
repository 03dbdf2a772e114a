"""Login sessions: signed, expiring cookie values that a logout ends.

A login starts a session with a random id; the cookie holds that id signed with a key derived from the
access token (itsdangerous), and its signature carries the time it was issued, so a cookie older than
``session_max_age_s`` is refused however it was kept. The server also remembers the sessions it started
and forgets one on logout, so a copied cookie stops working there and then. They live in memory: a
restart ends every session (people log in again), and a changed token invalidates every cookie.

The cookie's name is tied to the instance (data folder and port): cookies ignore ports, so two servers
on one host would otherwise overwrite, and read, each other's session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable

from itsdangerous import BadData, TimestampSigner, URLSafeTimedSerializer

from search.core.settings import Settings

SALT = "histosearch-session"
# Logins are made with the token only, so this bounds memory against a token holder's script, not the world.
MAX_SESSIONS = 10_000


def session_cookie_name(settings: Settings) -> str:
    """``histosearch_session_<10 hex>``, the same for one data folder and port, different otherwise."""
    instance = f"{settings.data_dir.resolve()}:{settings.port}"
    return "histosearch_session_" + hashlib.sha256(instance.encode()).hexdigest()[:10]


class SessionKeeper:
    """Starts, checks and ends the sessions of one server; ``clock`` is seconds since the epoch."""

    def __init__(self, token: str, max_age_s: int, clock: Callable[[], float] = time.time) -> None:
        self.max_age_s = max_age_s
        self.clock = clock
        keeper = self

        class _Signer(TimestampSigner):
            def get_timestamp(self) -> int:
                return int(keeper.clock())

        secret = hmac.new(token.encode(), b"histosearch session signing key", hashlib.sha256).digest()
        self._serializer = URLSafeTimedSerializer(secret, salt=SALT, signer=_Signer)
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def start(self) -> str:
        """A new session; returns the cookie value."""
        sid = secrets.token_urlsafe(24)
        now = self.clock()
        with self._lock:
            self._forget_expired(now)
            if len(self._started) >= MAX_SESSIONS:
                del self._started[min(self._started, key=self._started.__getitem__)]
            self._started[sid] = now
        return self._serializer.dumps(sid)

    def valid(self, cookie: str) -> bool:
        sid = self._sid(cookie)
        if sid is None:
            return False
        with self._lock:
            started = self._started.get(sid)
        return started is not None and self.clock() - started <= self.max_age_s

    def end(self, cookie: str) -> None:
        sid = self._sid(cookie)
        if sid is not None:
            with self._lock:
                self._started.pop(sid, None)

    def _sid(self, cookie: str) -> str | None:
        try:
            sid = self._serializer.loads(cookie, max_age=self.max_age_s)
        except BadData:
            return None
        return sid if isinstance(sid, str) else None

    def _forget_expired(self, now: float) -> None:
        for sid in [sid for sid, started in self._started.items() if now - started > self.max_age_s]:
            del self._started[sid]
