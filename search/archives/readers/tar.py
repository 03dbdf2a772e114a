"""Tar and tar.gz archives of tiles, WebDataset shards included; never extracted to disk.

WebDataset groups members by key, the member path up to the first dot of its file name
(``shard/000123.jpg``, ``shard/000123.json``, ``shard/000123.cls``). Every image member is a
tile; the small text members of the same key become its ``meta``: a JSON object's fields one by
one, any other text under its extension (``{"cls": "3"}``). A plain tar is the same thing with no
sidecars.

Reads seek in the archive, which a tar.gz can only do forwards cheaply (backwards restarts the
decompression): a worker reading its tiles in scan order decompresses the archive once.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from search.core.errors import BadInput

from .base import (
    NESTED_ARCHIVE,
    Reader,
    Skipped,
    TileEntry,
    byte_limit,
    is_archive_name,
    is_image_name,
    is_junk_name,
    member_path,
    read_stream,
    unsafe_member_reason,
)
from .slide import SLIDE_EXTENSIONS

_SIDECAR_MAX_BYTES = 64 * 1024
_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def sample_key(path: str) -> tuple[str, str]:
    """WebDataset (key, extension): ``a/b.seg.png`` -> (``a/b``, ``seg.png``)."""
    folder, _, name = path.rpartition("/")
    stem, _, ext = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _refusal(info: tarfile.TarInfo) -> str | None:
    reason = unsafe_member_reason(info.name)
    if reason is not None:
        return reason
    if info.issym():
        return "symbolic link member refused"
    if info.islnk():
        return "hard link member refused"
    if not info.isreg():
        return "not a regular file"
    return None


def _sidecar_fields(ext: str, data: bytes) -> dict[str, str]:
    """The metadata a sidecar carries; ValueError when it is not UTF-8 text (or not JSON for .json)."""
    text = data.decode("utf-8")
    if ext.lower() != "json":
        return {ext: text.strip()}
    value = json.loads(text)
    if not isinstance(value, dict):
        return {"json": json.dumps(value, ensure_ascii=False)}
    return {
        str(k): v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, sort_keys=True)
        for k, v in value.items()
        if v is not None
    }


class _IndexedTar:
    """A tar opened for random reads; its member table fills lazily, only as far as a read needs."""

    def __init__(self, path: Path) -> None:
        self.archive = tarfile.open(path, "r:*")  # noqa: SIM115 - kept open across reads, closed by close()
        self._members: dict[str, tarfile.TarInfo] = {}
        self._complete = False

    def find(self, name: str) -> tarfile.TarInfo | None:
        info = self._members.get(name)
        while info is None and not self._complete:
            member = self.archive.next()
            if member is None:
                self._complete = True
                break
            # The first of duplicate names wins, as in the scan.
            self._members.setdefault(member.name, member)
            if member.name == name:
                info = member
        return info

    def close(self) -> None:
        self.archive.close()


class TarReader(Reader):
    kind = "tar"

    def _open(self) -> _IndexedTar:
        try:
            return _IndexedTar(self.root)
        except _ERRORS as exc:
            raise BadInput(f"{self.root.name}: not a readable tar archive ({exc})") from None

    def scan(self) -> Iterator[TileEntry | Skipped]:
        limit = byte_limit(self.settings)
        archive_size = self.root.stat().st_size
        images: list[tarfile.TarInfo] = []
        skipped: list[Skipped] = []
        sidecars: dict[str, dict[str, str]] = {}
        seen: set[str] = set()
        last = None
        opened = self._open()
        try:
            # Only an uncompressed tar tells from its size whether a member's data is all there.
            plain = isinstance(opened.archive.fileobj, io.BufferedReader)
            for info in opened.archive:
                name, path = info.name, member_path(info.name)
                last = name
                if info.isdir() or is_junk_name(name):
                    continue
                reason = _refusal(info)
                if is_image_name(name):
                    if name in seen:
                        skipped.append(Skipped(path, "duplicate member name: only the first copy is read"))
                    elif reason is not None:
                        skipped.append(Skipped(path, reason))
                    elif info.size > limit:
                        skipped.append(Skipped(path, f"{info.size} bytes is too large for a tile"))
                    elif plain and info.offset_data + info.size > archive_size:
                        skipped.append(Skipped(path, "member data cut short: the archive is truncated"))
                    else:
                        images.append(info)
                    seen.add(name)
                elif PurePosixPath(name).suffix.lower() in SLIDE_EXTENSIONS:
                    skipped.append(Skipped(path, "whole-slide file inside an archive: extract it to a folder"))
                elif is_archive_name(name):
                    skipped.append(Skipped(path, NESTED_ARCHIVE))
                elif reason is None and info.size <= _SIDECAR_MAX_BYTES:
                    key, ext = sample_key(path)
                    data = opened.archive.extractfile(info).read()
                    try:
                        sidecars.setdefault(key, {}).update(_sidecar_fields(ext, data))
                    except ValueError:
                        skipped.append(Skipped(path, "sidecar is not UTF-8 text (or not valid JSON): ignored"))
        except _ERRORS as exc:
            where = f"after member {last!r}" if last else "at its start"
            skipped.append(Skipped(self.root.name, f"archive unreadable {where} ({exc}): later members lost"))
        finally:
            opened.close()
        found: list[TileEntry | Skipped] = [
            TileEntry(
                locator=info.name,
                path=member_path(info.name),
                fingerprint=f"{info.size}:{info.mtime}",
                meta=dict(sidecars.get(sample_key(member_path(info.name))[0], {})),
            )
            for info in images
        ]
        found.extend(skipped)
        found.sort(key=lambda e: (e.path, isinstance(e, TileEntry)))
        yield from found

    def read(self, locator: str) -> bytes:
        where = f"{self.root.name}:{locator}"
        self._own_process()
        # One file position per archive: reads in threads of one process take turns.
        with self._lock:
            opened = self._handle("tar", self._open)
            try:
                info = opened.find(locator)
                if info is None:
                    raise BadInput(f"{where}: no such member")
                reason = _refusal(info) or ("too large for a tile" if info.size > byte_limit(self.settings) else None)
                if reason is not None:
                    raise BadInput(f"{where}: {reason}")
                data = read_stream(opened.archive.extractfile(info), info.size, where, self.settings)
            except _ERRORS as exc:
                self._drop_handle("tar")
                raise BadInput(f"{where}: corrupt or truncated archive ({exc})") from None
        if len(data) != info.size:
            raise BadInput(f"{where}: member data cut short: the archive is truncated")
        return data
