"""Who sees the server's own paths: a client that proved it holds the access token (the admin view).

Everyone else gets each absolute path cut to its last part (``…/tiles.zip``), on /status, its JSON twin
and in 5xx messages such as "no CONCH checkpoint at /home/...". A server without a token has no admin:
its paths are for the CLI (`histosearch status`) on the machine itself.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request

# An absolute POSIX path of two or more parts; not one inside a URL or a relative path ("a/b/c.png").
_ABSOLUTE = re.compile(r"(?<![\w.:/~-])/(?:[^/\s'\"`<>]+/)+(?=[^/\s'\"`<>])")


def auth_of(request: Request) -> str | None:
    """How the request proved it holds the token: "bearer", "cookie", or None (no token set, or not proved)."""
    return request.scope.get("state", {}).get("auth")


def is_admin(request: Request) -> bool:
    return auth_of(request) is not None


def redact_paths(value: Any) -> Any:
    """``value`` (a string, or dicts and lists of them) with every absolute path cut to its last part."""
    if isinstance(value, str):
        return _ABSOLUTE.sub("…/", value)
    if isinstance(value, dict):
        return {key: redact_paths(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_paths(item) for item in value]
    return value


def for_client(request: Request, value: Any) -> Any:
    """``value`` as this client may see it: whole for the admin, paths cut for everyone else."""
    return value if is_admin(request) else redact_paths(value)


def source_label(uri: str) -> str:
    """An archive as shown to everyone: its file or folder name, never where it lies on the server."""
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri
