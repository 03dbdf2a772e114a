"""search.conch.hub against local stand-in servers: downloads, resumption, refusals, tokenizer resolution."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from search.conch.hub import fetch_checkpoint, resolve_checkpoint, resolve_tokenizer, sha256_file
from search.core.errors import DownloadError, ModelUnavailable
from search.core.settings import Settings
from tests.http_stand_in import HttpStandIn

REPO = "MahmoodLab/CONCH"
RESOLVE = f"/{REPO}/resolve/main/pytorch_model.bin"
TOKEN = "hf_valid"
WEIGHTS = os.urandom(300_000)
FAKE_TOKENIZER = b'{"version": "1.0", "model": {"type": "BPE", "vocab": {"<pad>": 0}}}'
FAKE_TOKENIZER_SHA = hashlib.sha256(FAKE_TOKENIZER).hexdigest()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("HISTOSEARCH_") or name == "HF_TOKEN":
            monkeypatch.delenv(name)


@pytest.fixture
def make_settings(tmp_path: Path):
    # Endpoints default to a closed local port: nothing in these tests may reach the internet.
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "cache_dir": tmp_path / "cache",
            "hf_endpoint": _closed_port_url(),
            "tokenizer_url": _closed_port_url() + "/tokenizer.json",
            "tokenizer_sha256": FAKE_TOKENIZER_SHA,
        }
        values.update(overrides)
        return Settings(**values)

    return make


def _cached(settings: Settings) -> Path:
    return settings.cache_dir / "MahmoodLab--CONCH" / "pytorch_model.bin"


def _part(settings: Settings) -> Path:
    return _cached(settings).with_name("pytorch_model.bin.part")


# --- fetch_checkpoint -------------------------------------------------------------------------------


def test_fetch_downloads_with_token(make_settings) -> None:
    with HttpStandIn({RESOLVE: WEIGHTS}, tokens={TOKEN}) as hub:
        settings = make_settings(hf_endpoint=hub.url, hf_token=TOKEN)
        path = fetch_checkpoint(settings, progress=False)
    assert path == _cached(settings)
    assert path.read_bytes() == WEIGHTS
    assert not _part(settings).exists()
    assert hub.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_fetch_reads_token_from_hf_token_env(make_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HttpStandIn({RESOLVE: WEIGHTS}, tokens={TOKEN}) as hub:
        path = fetch_checkpoint(make_settings(hf_endpoint=hub.url), progress=False)
    assert path.read_bytes() == WEIGHTS


def test_fetch_follows_hub_redirect(make_settings) -> None:
    blob = "/cdn/blobs/abc"
    with HttpStandIn({blob: WEIGHTS}, tokens={TOKEN}, redirects={RESOLVE: blob}) as hub:
        path = fetch_checkpoint(make_settings(hf_endpoint=hub.url, hf_token=TOKEN), progress=False)
    assert path.read_bytes() == WEIGHTS
    assert [r.path for r in hub.requests] == [RESOLVE, blob]


def test_token_is_not_sent_to_another_host(make_settings) -> None:
    # The Hub redirects to signed CDN URLs, which must not receive the user's token.
    with HttpStandIn({"/blob": WEIGHTS}) as cdn:
        with HttpStandIn({}, tokens={TOKEN}, redirects={RESOLVE: cdn.url + "/blob"}) as hub:
            path = fetch_checkpoint(make_settings(hf_endpoint=hub.url, hf_token=TOKEN), progress=False)
        assert hub.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert path.read_bytes() == WEIGHTS
    assert "Authorization" not in cdn.requests[0].headers


def test_second_fetch_does_not_download_again(make_settings) -> None:
    with HttpStandIn({RESOLVE: WEIGHTS}, tokens={TOKEN}) as hub:
        settings = make_settings(hf_endpoint=hub.url, hf_token=TOKEN)
        first = fetch_checkpoint(settings, progress=False)
        second = fetch_checkpoint(settings, progress=False)
    assert first == second
    assert hub.count() == 1


def test_fetch_resumes_truncated_part_with_range(make_settings) -> None:
    with HttpStandIn({RESOLVE: WEIGHTS}, tokens={TOKEN}) as hub:
        settings = make_settings(hf_endpoint=hub.url, hf_token=TOKEN)
        _part(settings).parent.mkdir(parents=True)
        _part(settings).write_bytes(WEIGHTS[:123_456])
        path = fetch_checkpoint(settings, progress=False)
    assert path.read_bytes() == WEIGHTS
    assert [r.headers.get("Range") for r in hub.requests] == ["bytes=123456-"]


def test_interrupted_download_keeps_part_then_resumes(make_settings) -> None:
    with HttpStandIn({RESOLVE: WEIGHTS}, tokens={TOKEN}, cut_after=100_000) as hub:
        settings = make_settings(hf_endpoint=hub.url, hf_token=TOKEN)
        with pytest.raises(DownloadError, match="again to resume") as info:
            fetch_checkpoint(settings, progress=False)
        assert str(_part(settings)) in str(info.value)
        assert _part(settings).read_bytes() == WEIGHTS[:100_000]
        assert not _cached(settings).exists()
        path = fetch_checkpoint(settings, progress=False)
    assert path.read_bytes() == WEIGHTS
    assert hub.requests[-1].headers.get("Range") == "bytes=100000-"


def test_server_ignoring_range_restarts_from_zero(make_settings) -> None:
    with HttpStandIn({RESOLVE: WEIGHTS}, tokens={TOKEN}, ignore_range=True) as hub:
        settings = make_settings(hf_endpoint=hub.url, hf_token=TOKEN)
        _part(settings).parent.mkdir(parents=True)
        _part(settings).write_bytes(WEIGHTS[:5000])
        path = fetch_checkpoint(settings, progress=False)
    assert path.read_bytes() == WEIGHTS


def test_complete_part_is_finished_without_body(make_settings) -> None:
    with HttpStandIn({RESOLVE: WEIGHTS}, tokens={TOKEN}) as hub:
        settings = make_settings(hf_endpoint=hub.url, hf_token=TOKEN)
        _part(settings).parent.mkdir(parents=True)
        _part(settings).write_bytes(WEIGHTS)
        path = fetch_checkpoint(settings, progress=False)
    assert path.read_bytes() == WEIGHTS


def test_part_longer_than_remote_is_removed(make_settings) -> None:
    with HttpStandIn({RESOLVE: WEIGHTS}, tokens={TOKEN}) as hub:
        settings = make_settings(hf_endpoint=hub.url, hf_token=TOKEN)
        _part(settings).parent.mkdir(parents=True)
        _part(settings).write_bytes(WEIGHTS + b"extra")
        with pytest.raises(DownloadError, match="cannot resume"):
            fetch_checkpoint(settings, progress=False)
        assert not _part(settings).exists()
        assert fetch_checkpoint(settings, progress=False).read_bytes() == WEIGHTS


def test_resumed_file_with_wrong_digest_is_removed(make_settings) -> None:
    # A partial file from an older version of the remote file: the Hub's sha256 ETag catches it.
    with HttpStandIn({RESOLVE: WEIGHTS}, tokens={TOKEN}) as hub:
        settings = make_settings(hf_endpoint=hub.url, hf_token=TOKEN)
        _part(settings).parent.mkdir(parents=True)
        _part(settings).write_bytes(b"\0" * 1000)
        with pytest.raises(DownloadError, match=hashlib.sha256(WEIGHTS).hexdigest()):
            fetch_checkpoint(settings, progress=False)
    assert not _part(settings).exists()
    assert not _cached(settings).exists()


def test_401_without_token_says_set_hf_token(make_settings) -> None:
    with HttpStandIn({RESOLVE: WEIGHTS}, tokens={TOKEN}) as hub:
        settings = make_settings(hf_endpoint=hub.url)
        with pytest.raises(DownloadError) as info:
            fetch_checkpoint(settings, progress=False)
    message = str(info.value)
    assert "set HF_TOKEN" in message
    assert f"{hub.url}/{REPO}" in message
    assert "histosearch model fetch" in message
    assert "Authorization" not in hub.requests[0].headers
    assert not _part(settings).exists() and not _cached(settings).exists()


def test_401_with_bad_token_says_invalid(make_settings) -> None:
    with (
        HttpStandIn({RESOLVE: WEIGHTS}, tokens={TOKEN}) as hub,
        pytest.raises(DownloadError, match="invalid or expired"),
    ):
        fetch_checkpoint(make_settings(hf_endpoint=hub.url, hf_token="hf_typo"), progress=False)


def test_403_gated_says_accept_terms(make_settings) -> None:
    with HttpStandIn({RESOLVE: WEIGHTS}, tokens={TOKEN}, gated_tokens={"hf_no_access"}) as hub:
        settings = make_settings(hf_endpoint=hub.url, hf_token="hf_no_access")
        with pytest.raises(DownloadError) as info:
            fetch_checkpoint(settings, progress=False)
    message = str(info.value)
    assert "403" in message and "gated" in message
    assert f"accept the CONCH terms at {hub.url}/{REPO}" in message
    assert "not in the authorized list" in message  # the server's own explanation is passed on


def test_404_says_not_found(make_settings) -> None:
    with HttpStandIn({"/elsewhere.bin": WEIGHTS}) as hub:
        settings = make_settings(hf_endpoint=hub.url, hf_token=TOKEN)
        with pytest.raises(DownloadError, match=r"not found \(404\).*--checkpoint"):
            fetch_checkpoint(settings, progress=False)
    assert not _part(settings).exists()


def test_network_failure_names_url_and_checkpoint_option(make_settings) -> None:
    settings = make_settings(hf_token=TOKEN)
    with pytest.raises(DownloadError) as info:
        fetch_checkpoint(settings, progress=False)
    message = str(info.value)
    assert f"{settings.hf_endpoint}{RESOLVE}" in message
    assert "--checkpoint PATH" in message


def test_concurrent_fetch_is_refused(make_settings) -> None:
    settings = make_settings(hf_token=TOKEN)
    lock_path = _cached(settings).with_name("pytorch_model.bin.lock")
    lock_path.parent.mkdir(parents=True)
    with FileLock(lock_path), pytest.raises(DownloadError, match="another process is downloading"):
        fetch_checkpoint(settings, progress=False)


def test_progress_bar_shows_bytes(make_settings, capsys: pytest.CaptureFixture[str]) -> None:
    with HttpStandIn({RESOLVE: WEIGHTS}, tokens={TOKEN}) as hub:
        fetch_checkpoint(make_settings(hf_endpoint=hub.url, hf_token=TOKEN), progress=True)
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "293k/293k" in err and "B/s" in err


# --- resolve_checkpoint -----------------------------------------------------------------------------


def test_resolve_checkpoint_prefers_explicit_path(make_settings, tmp_path: Path) -> None:
    explicit = tmp_path / "mine.safetensors"
    explicit.write_bytes(b"x")
    settings = make_settings(checkpoint=explicit)
    _cached(settings).parent.mkdir(parents=True)
    _cached(settings).write_bytes(b"y")
    assert resolve_checkpoint(settings) == explicit


def test_resolve_checkpoint_missing_explicit_path_is_named(make_settings, tmp_path: Path) -> None:
    missing = tmp_path / "nope.bin"
    with pytest.raises(ModelUnavailable, match=f"checkpoint {missing}: no such file"):
        resolve_checkpoint(make_settings(checkpoint=missing))


def test_resolve_checkpoint_uses_download(make_settings) -> None:
    settings = make_settings()
    _cached(settings).parent.mkdir(parents=True)
    _cached(settings).write_bytes(b"y")
    assert resolve_checkpoint(settings) == _cached(settings)


def test_resolve_checkpoint_says_how_to_get_one(make_settings) -> None:
    with pytest.raises(ModelUnavailable) as info:
        resolve_checkpoint(make_settings())
    assert str(info.value).startswith(
        "no CONCH checkpoint: run `histosearch model fetch` with HF_TOKEN set, or pass --checkpoint PATH "
        "(pytorch_model.bin or .safetensors)"
    )


# --- resolve_tokenizer ------------------------------------------------------------------------------


def _fake_conch_package(root: Path, *, with_tokenizer: bool) -> Path:
    package = root / "conch"
    folder = package / "open_clip_custom" / "tokenizers"
    folder.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('resolution must not import conch')\n")
    tokenizer = folder / "conch_byte_level_bpe_uncased.json"
    if with_tokenizer:
        tokenizer.write_bytes(FAKE_TOKENIZER)
    return tokenizer


@pytest.fixture(autouse=True)
def _no_installed_conch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Shadow a real `conch` install, if any, with one that has no tokenizer.
    monkeypatch.delitem(sys.modules, "conch", raising=False)
    _fake_conch_package(tmp_path / "shadow", with_tokenizer=False)
    monkeypatch.syspath_prepend(str(tmp_path / "shadow"))


def test_tokenizer_resolution_order(make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = tmp_path / "weights" / "pytorch_model.bin"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"w")
    explicit = tmp_path / "explicit.json"
    beside = checkpoint.parent / "conch_byte_level_bpe_uncased.json"
    beside_hf = checkpoint.parent / "tokenizer.json"
    installed = _fake_conch_package(tmp_path / "site", with_tokenizer=True)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    cached = tmp_path / "cache" / "tokenizer" / f"{FAKE_TOKENIZER_SHA}.json"
    cached.parent.mkdir(parents=True)
    for path in (explicit, beside, beside_hf, cached):
        path.write_bytes(FAKE_TOKENIZER)

    assert resolve_tokenizer(make_settings(tokenizer=explicit), checkpoint) == explicit
    settings = make_settings()
    for expected in (beside, beside_hf, installed, cached):
        assert resolve_tokenizer(settings, checkpoint, download=False) == expected
        expected.unlink()
    with pytest.raises(ModelUnavailable, match="no CONCH tokenizer"):
        resolve_tokenizer(settings, checkpoint, download=False)


def test_explicit_tokenizer_missing_is_named(make_settings, tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    (tmp_path / "cache" / "tokenizer").mkdir(parents=True)
    (tmp_path / "cache" / "tokenizer" / f"{FAKE_TOKENIZER_SHA}.json").write_bytes(FAKE_TOKENIZER)
    with pytest.raises(ModelUnavailable, match=f"tokenizer {missing}: no such file"):
        resolve_tokenizer(make_settings(tokenizer=missing))


def test_tokenizer_download_checks_digest_and_caches(make_settings) -> None:
    with HttpStandIn({"/pinned/tok.json": FAKE_TOKENIZER}) as server:
        settings = make_settings(tokenizer_url=server.url + "/pinned/tok.json")
        path = resolve_tokenizer(settings)
        again = resolve_tokenizer(settings)
    assert path == again == settings.cache_dir / "tokenizer" / f"{FAKE_TOKENIZER_SHA}.json"
    assert path.read_bytes() == FAKE_TOKENIZER
    assert server.count("GET", "/pinned/tok.json") == 1
    assert "Authorization" not in server.requests[0].headers


def test_tokenizer_with_wrong_digest_is_refused_and_not_cached(make_settings) -> None:
    tampered = FAKE_TOKENIZER.replace(b"<pad>", b"<pod>")
    with HttpStandIn({"/tok.json": tampered}) as server:
        settings = make_settings(tokenizer_url=server.url + "/tok.json")
        with pytest.raises(DownloadError) as info:
            resolve_tokenizer(settings)
    assert FAKE_TOKENIZER_SHA in str(info.value)
    assert hashlib.sha256(tampered).hexdigest() in str(info.value)
    assert not settings.cache_dir.exists() or not any(p.is_file() for p in settings.cache_dir.rglob("*"))


def test_tokenizer_download_http_error_names_url(make_settings) -> None:
    with HttpStandIn({}) as server:
        url = server.url + "/gone.json"
        with pytest.raises(DownloadError, match=f"{url} answered 404.*--tokenizer PATH"):
            resolve_tokenizer(make_settings(tokenizer_url=url))


def test_tokenizer_network_failure_names_url(make_settings) -> None:
    settings = make_settings()
    with pytest.raises(DownloadError, match=f"could not download the CONCH tokenizer from {settings.tokenizer_url}"):
        resolve_tokenizer(settings)


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
