"""A local HTTP server that stands in for the Hugging Face Hub (or any file host) in tests.

It serves in-memory files on 127.0.0.1 on a free port from a thread, and behaves like the Hub where
our download code depends on it: bearer-token gating (401 without a valid token, 403 for an account
that has not accepted the terms), ``X-Error-Code`` headers, HEAD, ``ETag``/``X-Repo-Commit`` headers,
redirects that carry ``X-Linked-Etag``/``X-Linked-Size``, and byte ranges. It can also drop the
connection part-way through a body, or ignore ranges, to exercise resumption. Every request is
recorded so tests can count what was fetched.

    with HttpStandIn({"/a/b.bin": b"..."}, tokens={"hf_ok"}) as hub:
        httpx.get(hub.url + "/a/b.bin", headers={"Authorization": "Bearer hf_ok"})
        assert hub.count("GET", "/a/b.bin") == 1
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

REPO_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: httpx.Headers  # case-insensitive, as HTTP header names are


class HttpStandIn:
    """Serve ``files`` (URL path -> bytes) on 127.0.0.1; a context manager that starts and stops the server.

    tokens: bearer tokens that may read files; None serves everyone.
    gated_tokens: valid tokens whose account lacks access (403 ``GatedRepo``); other unknown tokens get 401.
    redirects: URL path -> target URL path, answered with 302 like the Hub's ``/resolve/`` answers.
    cut_after: close the connection after this many body bytes of the next ``cut_times`` GETs.
    ignore_range: answer range requests with the whole file (200), as some proxies do.
    """

    def __init__(
        self,
        files: Mapping[str, bytes],
        *,
        tokens: Collection[str] | None = None,
        gated_tokens: Collection[str] = (),
        redirects: Mapping[str, str] | None = None,
        cut_after: int | None = None,
        cut_times: int = 1,
        ignore_range: bool = False,
    ) -> None:
        self.files = dict(files)
        self.tokens = None if tokens is None else set(tokens)
        self.gated_tokens = set(gated_tokens)
        self.redirects = dict(redirects or {})
        self.cut_after = cut_after
        self.cuts_left = cut_times if cut_after is not None else 0
        self.ignore_range = ignore_range
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("HttpStandIn is not running: use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def count(self, method: str | None = None, path: str | None = None) -> int:
        return sum(
            1 for r in self.requests if (method is None or r.method == method) and (path is None or r.path == path)
        )

    def __enter__(self) -> HttpStandIn:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        # A short poll interval: shutdown() waits for one, and tests start many servers.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="http-stand-in", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _take_cut(self) -> int | None:
        with self._lock:
            if self.cuts_left <= 0:
                return None
            self.cuts_left -= 1
            return self.cut_after


def _etag(body: bytes) -> str:
    return f'"{hashlib.sha256(body).hexdigest()}"'


def _handler_for(stand_in: HttpStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep pytest output clean

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def _answer(self, *, send_body: bool) -> None:
            path = self.path.split("?", 1)[0]
            with stand_in._lock:
                stand_in.requests.append(Request(self.command, path, httpx.Headers(self.headers.items())))
            if not self._authorised():
                return
            if path in stand_in.redirects:
                target = stand_in.redirects[path]
                extra = {"Location": target, "X-Repo-Commit": REPO_COMMIT}
                if target in stand_in.files:
                    extra["X-Linked-Etag"] = _etag(stand_in.files[target])
                    extra["X-Linked-Size"] = str(len(stand_in.files[target]))
                self._empty(302, extra)
                return
            if path not in stand_in.files:
                self._empty(404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
                return
            body = stand_in.files[path]
            status, start, end = 200, 0, len(body)
            range_header = self.headers.get("Range")
            if range_header and not stand_in.ignore_range:
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
                if match is None or int(match.group(1)) >= len(body):
                    self._empty(416, {"Content-Range": f"bytes */{len(body)}"})
                    return
                start = int(match.group(1))
                end = min(len(body), int(match.group(2)) + 1) if match.group(2) else len(body)
                status = 206
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", _etag(body))
            self.send_header("X-Repo-Commit", REPO_COMMIT)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
            cut = stand_in._take_cut() if send_body else None
            if cut is not None:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if send_body:
                self.wfile.write(body[start:end] if cut is None else body[start : min(end, start + cut)])
                self.wfile.flush()

        def _authorised(self) -> bool:
            if stand_in.tokens is None:
                return True
            auth = self.headers.get("Authorization", "")
            token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
            if token in stand_in.tokens:
                return True
            if token is None:
                self._empty(
                    401,
                    {
                        "X-Error-Code": "GatedRepo",
                        "X-Error-Message": "Access to this repo is restricted: you must be authenticated.",
                    },
                )
            elif token in stand_in.gated_tokens:
                self._empty(
                    403,
                    {
                        "X-Error-Code": "GatedRepo",
                        "X-Error-Message": "Access to this repo is restricted and you are not in the authorized list.",
                    },
                )
            else:
                self._empty(401, {"X-Error-Message": "Invalid credentials in Authorization header"})
            return False

        def _empty(self, status: int, headers: Mapping[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler
