"""Zip archives of tiles, read member by member and never extracted to disk."""

from __future__ import annotations

import stat
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import PurePosixPath

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

_UNIX = 3  # ZipInfo.create_system of archives whose external_attr carries a Unix st_mode


def _refusal(info: zipfile.ZipInfo, limit: int) -> str | None:
    reason = unsafe_member_reason(info.filename)
    if reason is not None:
        return reason
    mode = info.external_attr >> 16
    if info.create_system == _UNIX and stat.S_IFMT(mode):
        if stat.S_ISLNK(mode):
            return "symbolic link member refused"
        if not stat.S_ISREG(mode):
            return "not a regular file"
    if info.flag_bits & 0x1:
        return "encrypted member: decrypt the archive first"
    if info.file_size > limit:
        return f"{info.file_size} bytes is too large for a tile (setting max_image_pixels)"
    return None


class ZipReader(Reader):
    kind = "zip"

    def _open(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.root)
        except (zipfile.BadZipFile, OSError) as exc:
            raise BadInput(f"{self.root.name}: not a readable zip archive ({exc})") from None

    def scan(self) -> Iterator[TileEntry | Skipped]:
        limit = byte_limit(self.settings)
        with self._open() as archive:
            infos = archive.infolist()
        # Reads go through ZipFile.getinfo, which sees the last of duplicate names.
        last = {info.filename: i for i, info in enumerate(infos)}
        found: list[TileEntry | Skipped] = []
        for i, info in enumerate(infos):
            name = info.filename
            path = member_path(name)
            if info.is_dir() or is_junk_name(name):
                continue
            if not is_image_name(name):
                if PurePosixPath(path).suffix.lower() in SLIDE_EXTENSIONS:
                    found.append(Skipped(path, "whole-slide file inside an archive: extract it to a folder"))
                elif is_archive_name(name):
                    found.append(Skipped(path, NESTED_ARCHIVE))
                continue
            if last[name] != i:
                found.append(Skipped(path, "duplicate member name: only the last copy is read"))
                continue
            reason = _refusal(info, limit)
            if reason is not None:
                found.append(Skipped(path, reason))
                continue
            found.append(TileEntry(locator=name, path=path, fingerprint=f"{info.CRC:08x}:{info.file_size}"))
        found.sort(key=lambda e: (e.path, isinstance(e, TileEntry)))
        yield from found

    def read(self, locator: str) -> bytes:
        archive = self._handle("zip", self._open)
        try:
            info = archive.getinfo(locator)
        except KeyError:
            raise BadInput(f"{self.root.name}:{locator}: no such member") from None
        reason = _refusal(info, byte_limit(self.settings))
        if reason is not None:
            raise BadInput(f"{self.root.name}:{locator}: {reason}")
        try:
            with archive.open(info) as member:
                return read_stream(member, info.file_size, f"{self.root.name}:{locator}", self.settings)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError) as exc:
            raise BadInput(f"{self.root.name}:{locator}: corrupt member ({exc})") from None
