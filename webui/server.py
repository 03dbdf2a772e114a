"""``serve(settings)``: run the web UI with uvicorn, loading the model while the server starts."""

from __future__ import annotations

import ipaddress
import logging
import sys
import threading

from search.core.settings import LOOPBACK_HOSTS, Settings

from .app import create_app

log = logging.getLogger("histosearch.webui")


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
    if settings.host in ("0.0.0.0", "::") and set(settings.allowed_hosts) <= set(LOOPBACK_HOSTS):
        print(
            f"histosearch: note: serving on {settings.host}, but only the host names {', '.join(LOOPBACK_HOSTS)} "
            "are answered; list the names people use in HISTOSEARCH_ALLOWED_HOSTS",
            file=sys.stderr,
        )
    app = create_app(settings)

    def warm_up() -> None:
        for problem in app.state.engine.warm_up():
            log.warning("%s", problem)

    # The model takes seconds to load: do it while the server starts, not in the first user's query. Joined,
    # never left running: a daemon thread still inside torch at interpreter exit is killed mid-C++ and aborts
    # the process ("terminate called without an active exception").
    warming = threading.Thread(target=warm_up, name="histosearch-warm-up")
    warming.start()
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, server_header=False)
    finally:
        warming.join()
