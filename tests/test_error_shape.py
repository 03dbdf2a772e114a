"""One error shape: ``{"error": {"code", "message", "status"}}`` under /api, an HTML page elsewhere."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from search.core.errors import HistosearchError
from search.engine.engine import Engine
from tests.index_fixture import build_index
from webui.app import create_app


@pytest.fixture
def client(tiny_settings, tiny_encoder, tmp_path):
    indexed = build_index(tiny_settings, tiny_encoder, tmp_path / "tiles")
    settings = indexed.settings.model_copy(update={"max_upload_bytes": 1000})
    return TestClient(create_app(settings, Engine(settings, store=indexed.store, encoder=tiny_encoder)))


def assert_error_shape(response, status: int, code: str) -> dict:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"]
    assert sorted(body["error"]) == ["code", "message", "status"]
    assert body["error"]["status"] == status and body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "code"),
    [
        ("get", "/api/search", {"params": {"q": "x" * 501}}, 400, "bad_query"),
        ("get", "/api/search", {"params": {"q": "gland", "k": "many"}}, 422, "validation"),
        ("get", "/api/tiles/999999", {}, 404, "not_found"),
        ("get", "/api/no/such/route", {}, 404, "not_found"),
        ("post", "/api/status", {}, 405, "method_not_allowed"),
        ("post", "/api/search/image", {"files": {"image": ("a.png", b"x" * 2000, "image/png")}}, 413, "too_large"),
        ("post", "/api/search/image", {"files": {"image": ("a.txt", b"text", "text/plain")}}, 422, "bad_input"),
    ],
)
def test_api_errors_have_one_shape(client, method, url, kwargs, status, code):
    assert_error_shape(getattr(client, method)(url, **kwargs), status, code)


def test_error_messages_say_what_to_do(client):
    error = assert_error_shape(client.get("/api/search", params={"q": "gland", "k": 10_000}), 400, "bad_query")
    assert "max_k" in error["message"]


def test_index_unavailable_is_503(tiny_settings, tiny_encoder):
    client = TestClient(create_app(tiny_settings, Engine(tiny_settings, encoder=tiny_encoder)))
    error = assert_error_shape(client.get("/api/search", params={"q": "gland"}), 503, "index_unavailable")
    assert "histosearch index" in error["message"]


def test_unauthorized_is_401(tiny_settings, tiny_encoder):
    settings = tiny_settings.model_copy(update={"auth_token": "t0ken" * 4})
    client = TestClient(create_app(settings, Engine(settings, encoder=tiny_encoder)))
    assert_error_shape(client.get("/api/status"), 401, "unauthorized")


def test_unexpected_errors_keep_the_shape(client, monkeypatch):
    def broken() -> dict:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(client.app.state.engine, "status", broken)
    quiet = TestClient(client.app, raise_server_exceptions=False)
    error = assert_error_shape(quiet.get("/api/status"), 500, "internal")
    assert "disk on fire" not in error["message"]  # internals stay in the server log


def _all_errors(cls: type[HistosearchError]) -> list[type[HistosearchError]]:
    return [cls] + [sub for direct in cls.__subclasses__() for sub in _all_errors(direct)]


def test_every_histosearch_error_renders_with_its_own_status(client, monkeypatch):
    for cls in _all_errors(HistosearchError):

        def raising(cls=cls) -> dict:
            raise cls("what to do next")

        monkeypatch.setattr(client.app.state.engine, "status", raising)
        error = assert_error_shape(client.get("/api/status"), cls.status, cls.code)
        assert error["message"] == "what to do next"


def test_pages_get_an_html_error_page(client):
    response = client.get("/tiles/999999")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
    assert "no tile with id 999999" in response.text
    missing = client.get("/no/such/page")
    assert missing.status_code == 404 and "<html" in missing.text
