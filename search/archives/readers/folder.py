"""A folder tree of tile images, and of whole-slide files that are tiled in place.

The walk is sorted by name at each level and skips hidden names (``.git``, ``.DS_Store``,
``._*`` resource forks). A symbolic link to a file inside the folder is read; a link pointing out
of the folder, and a link to a folder (walked at its own path instead), are recorded as Skipped.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from search.core.errors import BadInput

from .base import IMAGE_EXTENSIONS, Reader, Skipped, TileEntry, byte_limit, read_stream, unsafe_member_reason
from .slide import (
    SLIDE_EXTENSIONS,
    TIFF_EXTENSIONS,
    is_slide_tiff,
    parse_locator,
    read_slide_tile,
    slide_tiles,
)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class FolderReader(Reader):
    kind = "folder"

    def scan(self) -> Iterator[TileEntry | Skipped]:
        if not self.root.is_dir():
            raise BadInput(f"{self.root}: not a folder")
        real_root = os.path.realpath(self.root)
        yield from self._walk(self.root, "", real_root)

    def _walk(self, folder: Path, prefix: str, real_root: str) -> Iterator[TileEntry | Skipped]:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield Skipped(prefix.rstrip("/") or ".", f"cannot list this folder ({exc.strerror})")
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            if entry.is_symlink():
                try:
                    real = os.path.realpath(entry.path, strict=True)
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        # Recorded here: following it would raise out of the walk and lose every later entry.
                        yield Skipped(rel, "symbolic link loop: not followed")
                        continue
                    real = os.path.realpath(entry.path)
                if not _inside(real, real_root):
                    yield Skipped(rel, f"symbolic link to {real}, outside the input folder: not followed")
                    continue
                if os.path.isdir(real):
                    # Its target is inside the tree, so it is walked at its own path (and links cannot loop).
                    yield Skipped(rel, "symbolic link to a folder of the input: walked at its own path")
                    continue
            try:
                is_dir = entry.is_dir()
            except OSError as exc:
                yield Skipped(rel, f"cannot read ({exc.strerror})")
                continue
            if is_dir:
                yield from self._walk(Path(entry.path), rel + "/", real_root)
                continue
            ext = os.path.splitext(entry.name)[1].lower()
            if ext not in IMAGE_EXTENSIONS and ext not in SLIDE_EXTENSIONS:
                continue
            try:
                st = entry.stat()
            except OSError as exc:
                yield Skipped(rel, f"cannot read ({exc.strerror})")
                continue
            yield from self._file(Path(entry.path), rel, st)

    def _file(self, path: Path, rel: str, st: os.stat_result) -> Iterator[TileEntry | Skipped]:
        ext = path.suffix.lower()
        if not stat.S_ISREG(st.st_mode):
            yield Skipped(rel, "not a regular file")
            return
        if ext in SLIDE_EXTENSIONS or (ext in TIFF_EXTENSIONS and is_slide_tiff(path, self.settings.max_image_pixels)):
            yield from slide_tiles(path, rel, self.settings)
            return
        if st.st_size > byte_limit(self.settings):
            yield Skipped(rel, f"{st.st_size} bytes is too large for a tile (setting max_image_pixels)")
            return
        yield TileEntry(locator=rel, path=rel, fingerprint=f"{st.st_size}:{st.st_mtime_ns}")

    def read(self, locator: str) -> bytes | Image.Image:
        tile = parse_locator(locator)
        if tile is not None:
            return read_slide_tile(self, self._resolve(tile.slide), tile)
        path = self._resolve(locator)
        try:
            # O_NONBLOCK: a FIFO swapped in since the scan must not hang the worker.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise BadInput(f"{locator}: not a regular file")
                return read_stream(f, st.st_size, locator, self.settings)
        except OSError as exc:
            raise BadInput(f"{locator}: cannot read ({exc.strerror})") from None

    def _resolve(self, rel: str) -> Path:
        """The file ``rel`` names, refused when it would lead out of the folder."""
        reason = unsafe_member_reason(rel)
        real_root = os.path.realpath(self.root)
        path = self.root / rel
        if reason is not None or not _inside(os.path.realpath(path), real_root):
            raise BadInput(f"{rel}: {reason or 'leads outside the input folder'}")
        return path
