"""Settings that fail at start, naming the setting: access token, allowed host names, upload limits."""

from __future__ import annotations

import os

import pytest

from search.cli import main
from search.core.errors import ConfigError
from search.core.settings import LOOPBACK_HOSTS, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("HISTOSEARCH_") and key != "HISTOSEARCH_CONCH_REFERENCE":
            monkeypatch.delenv(key)
    monkeypatch.setenv("HISTOSEARCH_DATA_DIR", str(tmp_path / "data"))


@pytest.mark.parametrize("token", ["", "   ", "short", "x" * 15, " " * 8 + "x" * 10])
def test_empty_or_short_token_is_a_config_error(monkeypatch, token):
    monkeypatch.setenv("HISTOSEARCH_AUTH_TOKEN", token)
    with pytest.raises(ConfigError, match=r"auth_token: .*at least 16 characters"):
        load_settings()


def test_a_long_token_or_none_is_accepted(monkeypatch):
    assert load_settings().auth_token is None
    monkeypatch.setenv("HISTOSEARCH_AUTH_TOKEN", "0123456789abcdef")
    assert load_settings().auth_token == "0123456789abcdef"


def test_serve_with_an_empty_token_stops_at_start(monkeypatch, capsys):
    monkeypatch.setenv("HISTOSEARCH_AUTH_TOKEN", "")
    assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("histosearch: error: bad settings: auth_token:") and "Traceback" not in err
    assert main(["serve", "--port", "0", "--auth-token", "abc"]) == 2
    assert "auth_token" in capsys.readouterr().err


def test_allowed_hosts_default_to_loopback_names():
    assert load_settings().allowed_hosts == list(LOOPBACK_HOSTS)


def test_allowed_hosts_from_a_comma_separated_variable(monkeypatch):
    monkeypatch.setenv("HISTOSEARCH_ALLOWED_HOSTS", "Search.Lab.example, *.lab.example ,[::1]")
    assert load_settings().allowed_hosts == ["search.lab.example", "*.lab.example", "[::1]"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "at least one host"),
        ("https://search.lab.example", "without scheme, port or path"),
        ("search.lab.example:8000", "without scheme, port or path"),
        ("search.*.example", "wildcard"),
        ("*lab.example", "wildcard"),
    ],
)
def test_bad_allowed_hosts_are_config_errors(monkeypatch, value, reason):
    monkeypatch.setenv("HISTOSEARCH_ALLOWED_HOSTS", value)
    with pytest.raises(ConfigError, match=f"allowed_hosts: .*{reason}"):
        load_settings()


@pytest.mark.parametrize("name", ["max_upload_pixels", "max_upload_decodes", "session_max_age_s"])
def test_upload_and_session_limits_must_be_positive(monkeypatch, name):
    monkeypatch.setenv(f"HISTOSEARCH_{name.upper()}", "0")
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_card_fields_from_a_comma_separated_variable(monkeypatch):
    assert load_settings().card_fields == []
    monkeypatch.setenv("HISTOSEARCH_CARD_FIELDS", "organ, tumour_infiltrating_lymphocytes")
    assert load_settings().card_fields == ["organ", "tumour_infiltrating_lymphocytes"]
