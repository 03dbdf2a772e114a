"""The holes an attacker found against a running server, each closed: sessions, hosts, CSRF, ids, headers,
filter counts and server paths. In process (FastAPI TestClient) over a small real index."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from search.engine.engine import Engine
from tests.index_fixture import build_index
from webui.app import create_app
from webui.sessions import SessionKeeper, session_cookie_name

TOKEN = "0123456789abcdef-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options", "referrer-policy")


@pytest.fixture
def indexed(tiny_settings, tiny_encoder, tmp_path):
    return build_index(tiny_settings, tiny_encoder, tmp_path / "tiles")


def _client(indexed, encoder, base_url: str = "http://testserver", **overrides) -> TestClient:
    settings = indexed.settings.model_copy(update=overrides)
    app = create_app(settings, Engine(settings, store=indexed.store, encoder=encoder))
    return TestClient(app, base_url=base_url)


@pytest.fixture
def client(indexed, tiny_encoder) -> TestClient:
    return _client(indexed, tiny_encoder)


@pytest.fixture
def guarded(indexed, tiny_encoder) -> TestClient:
    return _client(indexed, tiny_encoder, auth_token=TOKEN)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "purple").save(buffer, "PNG")
    return buffer.getvalue()


def _status_with(client: TestClient, name: str, cookie: str) -> int:
    """The status of GET /api/status sent with only this cookie."""
    client.cookies.clear()
    client.cookies.set(name, cookie)
    try:
        return client.get("/api/status").status_code
    finally:
        client.cookies.clear()


def _login(client: TestClient) -> str:
    response = client.post("/login", data={"token": TOKEN, "next": "/"}, follow_redirects=False)
    assert response.status_code == 303
    name = session_cookie_name(client.app.state.settings)
    return response.cookies[name]


# --- sessions ---------------------------------------------------------------------------------------


def test_login_cookie_is_a_signed_session_not_a_fixed_value(guarded):
    name = session_cookie_name(guarded.app.state.settings)
    first = _login(guarded)
    guarded.cookies.clear()
    second = _login(guarded)
    assert first != second  # a fresh session per login, not a hash of the token
    assert TOKEN not in first
    guarded.cookies.clear()
    assert _status_with(guarded, name, first) == 200
    tampered = first[:-2] + ("AA" if not first.endswith("AA") else "BB")
    assert _status_with(guarded, name, tampered) == 401


def test_the_old_fixed_cookie_no_longer_opens_the_server(guarded):
    import hashlib
    import hmac

    old = hmac.new(TOKEN.encode(), b"histosearch web session", hashlib.sha256).hexdigest()
    for name in ("histosearch_session", session_cookie_name(guarded.app.state.settings)):
        assert _status_with(guarded, name, old) == 401


def test_login_cookie_flags(guarded, indexed, tiny_encoder):
    response = guarded.post("/login", data={"token": TOKEN, "next": "/"}, follow_redirects=False)
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    assert f"max-age={guarded.app.state.settings.session_max_age_s}" in cookie
    https = _client(indexed, tiny_encoder, base_url="https://testserver", auth_token=TOKEN)
    response = https.post("/login", data={"token": TOKEN, "next": "/"}, follow_redirects=False)
    assert "secure" in response.headers["set-cookie"].lower()


def test_cookie_name_is_tied_to_the_instance(tiny_settings, tmp_path):
    a = session_cookie_name(tiny_settings)
    assert a.startswith("histosearch_session_")
    assert session_cookie_name(tiny_settings.model_copy(update={"port": 8001})) != a
    assert session_cookie_name(tiny_settings.model_copy(update={"data_dir": tmp_path / "other"})) != a
    assert session_cookie_name(tiny_settings.model_copy()) == a


def test_logout_ends_the_session(guarded):
    name = session_cookie_name(guarded.app.state.settings)
    cookie = _login(guarded)
    assert guarded.get("/api/status").status_code == 200
    origin = {"Origin": "http://testserver"}
    out = guarded.post("/logout", headers=origin, follow_redirects=False)
    assert out.status_code == 303 and name in out.headers["set-cookie"]
    guarded.cookies.clear()
    # Someone who kept a copy of the cookie cannot use it after the logout.
    assert _status_with(guarded, name, cookie) == 401


def test_sessions_expire(guarded):
    settings = guarded.app.state.settings
    name = session_cookie_name(settings)
    keeper: SessionKeeper = guarded.app.state.sessions
    now = [1_000_000.0]
    keeper.clock = lambda: now[0]
    cookie = _login(guarded)
    guarded.cookies.clear()
    assert _status_with(guarded, name, cookie) == 200
    now[0] += settings.session_max_age_s + 1
    assert _status_with(guarded, name, cookie) == 401


# --- hosts (DNS rebinding) -------------------------------------------------------------------------------


def test_unknown_host_names_are_refused(indexed, tiny_encoder):
    client = _client(indexed, tiny_encoder, base_url="http://localhost:8000")
    assert client.get("/api/status").status_code == 200
    assert client.get("/api/status", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    assert client.get("/api/status", headers={"Host": "[::1]:8000"}).status_code == 200
    rebound = client.get("/api/status", headers={"Host": "attacker.example"})
    assert rebound.status_code == 400
    assert client.get("/", headers={"Host": "attacker.example:8000"}).status_code == 400


def test_allowed_hosts_setting_and_the_bound_address(indexed, tiny_encoder):
    named = _client(indexed, tiny_encoder, allowed_hosts=["search.lab.example"])
    assert named.get("/api/status", headers={"Host": "search.lab.example"}).status_code == 200
    assert named.get("/api/status", headers={"Host": "localhost"}).status_code == 400
    bound = _client(indexed, tiny_encoder, host="10.1.2.3")
    assert bound.get("/api/status", headers={"Host": "10.1.2.3:8000"}).status_code == 200
    assert bound.get("/api/status", headers={"Host": "10.1.2.4:8000"}).status_code == 400


# --- CSRF -----------------------------------------------------------------------------------------------


def test_cookie_authenticated_posts_need_this_origin(guarded):
    _login(guarded)
    files = {"image": ("q.png", _png(), "image/png")}
    evil = guarded.post("/api/search/image", files=files, headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "forbidden"
    assert "Origin" in evil.json()["error"]["message"]
    missing = guarded.post("/api/search/image", files=files)
    assert missing.status_code == 403
    same = guarded.post("/api/search/image", files=files, headers={"Origin": "http://testserver"})
    assert same.status_code == 200
    referer = guarded.post("/api/search/image", files=files, headers={"Referer": "http://testserver/?q=x"})
    assert referer.status_code == 200
    # The logout form cannot be posted from another site either.
    assert guarded.post("/logout", headers={"Origin": "https://evil.example"}).status_code == 403


def test_bearer_clients_need_no_origin(guarded):
    files = {"image": ("q.png", _png(), "image/png")}
    assert guarded.post("/api/search/image", files=files, headers=BEARER).status_code == 200


def test_cross_site_posts_are_refused_without_a_token_too(client):
    files = {"image": ("q.png", _png(), "image/png")}
    response = client.post("/api/search/image", files=files, headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert client.post("/api/search/image", files=files).status_code == 200  # curl sends no Origin


# --- ids, filters, headers on 500s ------------------------------------------------------------------------

ID_ROUTES = [
    "/api/tiles/{id}",
    "/api/tiles/{id}/describe",
    "/api/similar/{id}",
    "/api/cases?tile={id}",
    "/tiles/{id}",
    "/similar/{id}",
    "/cases?tile={id}",
    "/images/tiles/{id}.jpg",
    "/images/thumbs/{id}.jpg",
    "/api/eval/runs/{id}",
    "/eval/{id}",
]


def test_huge_ids_are_not_found_or_invalid_never_500(client):
    for route in ID_ROUTES:
        for tile_id in (2**63 - 1, 2**63, 2**64 + 5, -(2**63) - 1, 10**40):
            response = client.get(route.format(id=tile_id))
            assert response.status_code in (404, 422), (route, tile_id, response.text)


def test_meta_filter_count_is_bounded(client):
    params = {f"meta.key{i}": "v" for i in range(1500)}
    response = client.get("/api/search", params={"q": "gland", **params})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_query" and "meta" in response.json()["error"]["message"]


def test_security_headers_on_500s(client, monkeypatch):
    def broken() -> dict:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(client.app.state.engine, "status", broken)
    quiet = TestClient(client.app, raise_server_exceptions=False)
    for path in ("/api/status", "/status"):
        response = quiet.get(path)
        assert response.status_code == 500
        for header in SECURITY_HEADERS:
            assert header in response.headers, (path, header)


def test_security_headers_are_not_doubled(client):
    response = client.get("/api/status")
    assert response.headers.get_list("content-security-policy") == [response.headers["content-security-policy"]]


# --- server paths -------------------------------------------------------------------------------------------


def test_status_shows_no_server_paths_without_authentication(client, indexed):
    data_dir = str(indexed.settings.data_dir)
    folder = str(indexed.folder)
    for path in ("/api/status", "/status", "/"):
        text = client.get(path).text
        assert data_dir not in text and folder not in text, path


def test_an_authenticated_admin_sees_the_paths(guarded, indexed):
    status = guarded.get("/api/status", headers=BEARER)
    assert str(indexed.folder) in status.text


def test_model_missing_message_shows_no_paths(indexed, tmp_path):
    settings = indexed.settings.model_copy(update={"checkpoint": tmp_path / "secret" / "dir" / "missing.bin"})
    client = TestClient(create_app(settings, Engine(settings, store=indexed.store)))
    response = client.get("/api/search", params={"q": "gland"})
    assert response.status_code == 503
    assert str(tmp_path) not in response.text and "missing.bin" in response.text
