"""The error hierarchy: each error carries the HTTP status the web API answers with.

Messages say what to do next; the CLI prints them as they are and the API returns them in
one JSON shape (``{"error": {"code", "message", "status"}}``).
"""

from __future__ import annotations


class HistosearchError(Exception):
    status: int = 500
    code: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


class ConfigError(HistosearchError):
    """Bad settings or a bad model configuration: fails at start."""

    code = "config"


class CheckpointError(HistosearchError):
    """A checkpoint that cannot be loaded as CONCH (missing/unexpected tensors, pickles, shapes)."""

    code = "checkpoint"


class ModelUnavailable(HistosearchError):
    """No weights or tokenizer: the message says how to get them."""

    status = 503
    code = "model_unavailable"


class BadQuery(HistosearchError):
    status = 400
    code = "bad_query"


class BadInput(HistosearchError):
    """An input file (upload, tile, archive member) that cannot be used."""

    status = 422
    code = "bad_input"


class PayloadTooLarge(BadInput):
    status = 413
    code = "too_large"


class Unauthorized(HistosearchError):
    status = 401
    code = "unauthorized"


class Forbidden(HistosearchError):
    """Refused whoever asks, e.g. a form posted from another site's page."""

    status = 403
    code = "forbidden"


class NotFound(HistosearchError):
    status = 404
    code = "not_found"


class IndexUnavailable(HistosearchError):
    status = 503
    code = "index_unavailable"


class ServerBusy(HistosearchError):
    """Every slot for a bounded piece of work (decoding uploads) is taken: retry shortly."""

    status = 503
    code = "busy"


class IndexBusy(HistosearchError):
    """Another indexer holds the index lock."""

    status = 409
    code = "index_busy"


class DownloadError(HistosearchError):
    status = 502
    code = "download"


class BuildRejected(HistosearchError):
    """A new index build failed its checks (recall below the floor) and was not published."""

    code = "build_rejected"
