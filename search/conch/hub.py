"""Getting the CONCH weights and tokenizer: download them, resume and verify, and find them on disk.

The weights are gated on Hugging Face, so the download sends the user's token and turns the Hub's
refusals into instructions. It is streamed with httpx rather than ``huggingface_hub.hf_hub_download``:
that works against a Hub-like server, but (2.4) it deletes the partial file when a download fails,
so an interrupted 1.8 GB download would start again from zero; here it resumes with a Range request.

The tokenizer is CC-BY-NC-ND material of the CONCH authors: it is never shipped, only found where
the user put it or downloaded from a pinned commit and checked against its sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

import httpx
from filelock import FileLock
from filelock import Timeout as LockTimeout
from tqdm import tqdm

from search.core.errors import DownloadError, ModelUnavailable
from search.core.settings import Settings

CHECKPOINT_FILENAME = "pytorch_model.bin"
# The reference package's name for the file first, then the Hugging Face convention.
TOKENIZER_FILENAMES = ("conch_byte_level_bpe_uncased.json", "tokenizer.json")

_TIMEOUT = httpx.Timeout(60.0, connect=15.0)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-\d+|\*)/(\d+)")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB checkpoints need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_checkpoint(settings: Settings, *, progress: bool = True) -> Path:
    """Download the CONCH checkpoint into the cache (resuming a partial download) and return its path."""
    dest = _checkpoint_cache_path(settings)
    if dest.is_file():  # before taking the lock, so a read-only shared cache works
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(dest.with_name(dest.name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except LockTimeout:
        raise DownloadError(
            f"another process is downloading {dest} (it holds {lock.lock_file}): wait for it to finish"
        ) from None
    try:
        if not dest.is_file():  # the process that held the lock may have finished it
            _download_checkpoint(settings, dest, progress=progress)
    finally:
        lock.release()
    return dest


def resolve_checkpoint(settings: Settings) -> Path:
    """The checkpoint to load: ``settings.checkpoint`` if set, else the one ``fetch_checkpoint`` downloaded."""
    if settings.checkpoint is not None:
        path = settings.checkpoint.expanduser()
        if not path.is_file():
            reason = "not a file" if path.exists() else "no such file"
            raise ModelUnavailable(
                f"checkpoint {path}: {reason}; pass --checkpoint with the path of a CONCH pytorch_model.bin "
                "or .safetensors, or leave it unset to use the one `histosearch model fetch` downloads"
            )
        return path
    cached = _checkpoint_cache_path(settings)
    if cached.is_file():
        return cached
    raise ModelUnavailable(
        "no CONCH checkpoint: run `histosearch model fetch` with HF_TOKEN set, or pass --checkpoint PATH "
        f"(pytorch_model.bin or .safetensors); looked for {cached}"
    )


def resolve_tokenizer(settings: Settings, checkpoint: Path | None = None, *, download: bool = True) -> Path:
    """The CONCH tokenizer file, the first found of: ``settings.tokenizer``, one beside ``checkpoint`` (if
    given), the installed reference ``conch`` package, the cache; else downloaded and checked against
    ``settings.tokenizer_sha256`` (unless ``download`` is false)."""
    if settings.tokenizer is not None:
        path = settings.tokenizer.expanduser()
        if not path.is_file():
            reason = "not a file" if path.exists() else "no such file"
            raise ModelUnavailable(
                f"tokenizer {path}: {reason}; pass --tokenizer with the path of "
                f"{TOKENIZER_FILENAMES[0]}, or leave it unset to find or download it"
            )
        return path
    candidates = [checkpoint.parent / name for name in TOKENIZER_FILENAMES] if checkpoint else []
    candidates += _installed_conch_tokenizers()
    candidates.append(_tokenizer_cache_path(settings))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if not download:
        raise ModelUnavailable(
            f"no CONCH tokenizer: run `histosearch model fetch` to download it into {settings.cache_dir}, "
            f"put {TOKENIZER_FILENAMES[0]} beside the checkpoint, or pass --tokenizer PATH "
            f"(the file is at {settings.tokenizer_url})"
        )
    return _download_tokenizer(settings)


def _checkpoint_cache_path(settings: Settings) -> Path:
    return settings.cache_dir.expanduser() / settings.hf_repo.replace("/", "--") / CHECKPOINT_FILENAME


def _tokenizer_cache_path(settings: Settings) -> Path:
    # Named by digest, so pinning another tokenizer never picks up the old file.
    return settings.cache_dir.expanduser() / "tokenizer" / f"{settings.tokenizer_sha256.lower()}.json"


def _installed_conch_tokenizers() -> list[Path]:
    # find_spec locates the reference package without importing it (its import pulls in torch and timm).
    try:
        spec = importlib.util.find_spec("conch")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [
        Path(location) / "open_clip_custom" / "tokenizers" / TOKENIZER_FILENAMES[0]
        for location in spec.submodule_search_locations
    ]


def _download_checkpoint(settings: Settings, dest: Path, *, progress: bool) -> None:
    endpoint = settings.hf_endpoint.rstrip("/")
    url = f"{endpoint}/{settings.hf_repo}/resolve/main/{CHECKPOINT_FILENAME}"
    part = dest.with_name(dest.name + ".part")
    token = settings.hf_token or None
    # identity: sizes and ranges must count the file's bytes, not those of a compressed stream.
    headers = {"Accept-Encoding": "identity"}
    if token:
        # httpx drops it on redirects to another host, as the Hub's signed CDN URLs require.
        headers["Authorization"] = f"Bearer {token}"

    with httpx.Client(headers=headers, follow_redirects=True, timeout=_TIMEOUT) as client:
        offset = part.stat().st_size if part.is_file() else 0
        try:
            with client.stream("GET", url, headers={"Range": f"bytes={offset}-"} if offset else {}) as response:
                if response.status_code == 416 and offset:
                    # Nothing left to send: either the last run stopped just before the rename, or
                    # the partial file is longer than the remote one and so cannot be a prefix of it.
                    total = _content_range(response)[1]
                    if total != offset:
                        part.unlink()
                        raise DownloadError(
                            f"{url} cannot resume {part} ({offset} bytes; the file has {total}): removed "
                            "it, run `histosearch model fetch` again"
                        )
                elif response.status_code not in (200, 206):
                    raise _refusal(response, url, settings, token)
                else:
                    total = _receive(response, part, offset, url, progress=progress)
                expected_sha = _linked_sha256(response)
        except httpx.TransportError as exc:
            raise _transport_failure(exc, url, part) from exc

    size = part.stat().st_size
    if total is not None and size != total:
        part.unlink()
        raise DownloadError(
            f"{url}: received {size} bytes but the server announced {total}; removed the partial file, "
            "run `histosearch model fetch` again"
        )
    if expected_sha is not None:
        actual = sha256_file(part)
        if actual != expected_sha:
            part.unlink()
            raise DownloadError(
                f"{url}: downloaded file has sha256 {actual}, the Hub announced {expected_sha} (the file may "
                "have changed since a partial download); removed it, run `histosearch model fetch` again"
            )
    os.replace(part, dest)


def _receive(response: httpx.Response, part: Path, offset: int, url: str, *, progress: bool) -> int | None:
    """Stream the body into ``part`` (appending after ``offset`` on a 206) and return the file's full size."""
    if response.status_code == 206:
        start, total = _content_range(response)
        if start != offset:
            raise DownloadError(
                f"{url} answered a request for bytes from {offset} with bytes from {start}; "
                f"delete {part} and run `histosearch model fetch` again"
            )
    else:
        # A server that ignores Range sends the whole file: start over rather than append it.
        offset = 0
        length = response.headers.get("Content-Length")
        total = int(length) if length is not None else _int_header(response, "X-Linked-Size")
    with (
        open(part, "ab" if offset else "wb") as f,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            disable=not progress,
        ) as bar,
    ):
        # No chunk_size: httpx would hold back a partial chunk on a dropped connection, losing it.
        for chunk in response.iter_bytes():
            f.write(chunk)
            bar.update(len(chunk))
    return total


def _content_range(response: httpx.Response) -> tuple[int | None, int | None]:
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if match is None:
        return None, None
    return (int(match.group(1)) if match.group(1) else None), int(match.group(2))


def _int_header(response: httpx.Response, name: str) -> int | None:
    for r in (*response.history, response):
        value = r.headers.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return None


def _linked_sha256(response: httpx.Response) -> str | None:
    """The file's sha256 as the Hub states it: X-Linked-Etag on its redirect, or the ETag of an LFS file."""
    values = [r.headers.get("X-Linked-Etag") for r in (*response.history, response)]
    values.append(response.headers.get("ETag"))
    for value in values:
        if value:
            tag = value.removeprefix("W/").strip('"').lower()
            if _SHA256.fullmatch(tag):
                return tag
    return None


def _refusal(response: httpx.Response, url: str, settings: Settings, token: str | None) -> DownloadError:
    status = response.status_code
    page = f"{settings.hf_endpoint.rstrip('/')}/{settings.hf_repo}"
    code = response.headers.get("X-Error-Code", "")
    detail = response.headers.get("X-Error-Message")
    said = f" (the server said: {detail})" if detail else ""
    if code == "RepoNotFound":
        return DownloadError(
            f"{url}: {status}, repository {settings.hf_repo} not found{said}; check hf_repo "
            f"(HISTOSEARCH_HF_REPO) and hf_endpoint ({settings.hf_endpoint})"
            + ("" if token else ", and set HF_TOKEN if the repository is private or gated")
        )
    if status == 401 and not token:
        return DownloadError(
            f"{url} needs a token (401){said}: set HF_TOKEN (a Hugging Face token whose account accepted "
            f"the CONCH terms at {page}) and run `histosearch model fetch`"
        )
    if status == 401:
        return DownloadError(
            f"{url} rejected the token in HF_TOKEN (401){said}: it is invalid or expired; create a read token "
            f"at {settings.hf_endpoint.rstrip('/')}/settings/tokens and run `histosearch model fetch` again"
        )
    if status == 403:
        return DownloadError(
            f"{url}: access denied (403){said}. {settings.hf_repo} is gated: log in to the account of HF_TOKEN, "
            f"accept the CONCH terms at {page} and wait for access to be granted (a fine-grained token also "
            "needs read access to public gated repositories), then run `histosearch model fetch` again"
        )
    if status == 404:
        return DownloadError(
            f"{url}: not found (404){said}; {settings.hf_repo} has no {CHECKPOINT_FILENAME}: check hf_repo "
            f"and hf_endpoint, or download the checkpoint yourself and pass --checkpoint PATH"
        )
    return DownloadError(
        f"{url} answered {status} {response.reason_phrase}{said}: try again later, or download "
        f"{CHECKPOINT_FILENAME} yourself and pass --checkpoint PATH"
    )


def _transport_failure(exc: httpx.TransportError, url: str, part: Path) -> DownloadError:
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    kept = part.stat().st_size if part.is_file() else 0
    if kept:
        return DownloadError(
            f"download of {url} interrupted ({reason}); {kept} bytes are kept in {part}: "
            "run `histosearch model fetch` again to resume, or pass --checkpoint PATH"
        )
    return DownloadError(
        f"could not download {url} ({reason}); check the network and hf_endpoint, or download "
        f"{CHECKPOINT_FILENAME} yourself and pass --checkpoint PATH"
    )


def _download_tokenizer(settings: Settings) -> Path:
    url = settings.tokenizer_url
    expected = settings.tokenizer_sha256.lower()
    elsewhere = f"or download it yourself and pass --tokenizer PATH ({TOKENIZER_FILENAMES[0]})"
    try:
        response = httpx.get(url, follow_redirects=True, timeout=_TIMEOUT)
    except httpx.TransportError as exc:
        raise DownloadError(
            f"could not download the CONCH tokenizer from {url} ({type(exc).__name__}: {exc}); "
            f"check the network, {elsewhere}"
        ) from exc
    if response.status_code != 200:
        raise DownloadError(
            f"could not download the CONCH tokenizer: {url} answered {response.status_code} "
            f"{response.reason_phrase}; check tokenizer_url, {elsewhere}"
        )
    actual = hashlib.sha256(response.content).hexdigest()
    if actual != expected:
        raise DownloadError(
            f"the tokenizer from {url} has sha256 {actual}, expected {expected}: not kept. "
            f"Check tokenizer_url and tokenizer_sha256, {elsewhere}"
        )
    dest = _tokenizer_cache_path(settings)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    tmp.write_bytes(response.content)
    os.replace(tmp, dest)
    return dest
