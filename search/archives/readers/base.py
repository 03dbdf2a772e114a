"""What every archive reader yields and how it keeps its open handles.

A reader lists tiles cheaply (``scan``) and re-reads one tile's pixels on demand (``read``). The
pipeline calls ``read`` from worker processes, so a reader pickles without its open handles and
reopens them lazily, once per process: a forked child never touches the parent's file objects,
whose offsets the two processes would otherwise share.
"""

from __future__ import annotations

import contextlib
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, ClassVar

from PIL import Image

from search.core.errors import BadInput
from search.core.settings import Settings

from ..decode import check_declared_pixels

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"})
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
NESTED_ARCHIVE = "archives inside archives are not read: extract it and index it on its own"

# Enough of a file for the header of any tile image but a TIFF whose directory comes last.
HEADER_BYTES = 64 * 1024
# Whole-slide readers keep a few slides open; more would hold one pixel cache each.
_MAX_OPEN_HANDLES = 8


@dataclass(frozen=True)
class SlideInfo:
    """A whole slide's level-0 size in pixels and scale (None when its metadata has none)."""

    width: int
    height: int
    mpp: float | None


@dataclass(frozen=True)
class TileEntry:
    """One tile as listed by ``Reader.scan``; WSI fields stay None for plain image files."""

    locator: str
    path: str
    fingerprint: str
    level: int | None = None
    x: int | None = None
    y: int | None = None
    size: int | None = None
    mpp: float | None = None
    slide_path: str | None = None
    # The whole slide the tile was cut from (one shared object per slide).
    slide_info: SlideInfo | None = None
    # Sidecar metadata (WebDataset ``key.json``/``key.cls``...), values as strings.
    meta: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Skipped:
    """An entry the reader refused or could not list; the indexer records it and goes on."""

    path: str
    reason: str


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def is_junk_name(name: str) -> bool:
    """macOS resource forks and Finder files carry image names but no image."""
    parts = name.replace("\\", "/").split("/")
    return "__MACOSX" in parts or parts[-1].startswith("._") or parts[-1] == ".DS_Store"


def unsafe_member_reason(name: str) -> str | None:
    """Why an archive member name must not be trusted as a relative path, or None when it is fine."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return "absolute member path refused"
    if ".." in norm.split("/"):
        return "member path with '..' refused"
    if "\x00" in name:
        return "member path with a NUL byte refused"
    return None


def member_path(name: str) -> str:
    """The relative path an archive member stands for: forward slashes, no leading './'."""
    norm = name.replace("\\", "/")
    while norm.startswith("./"):
        norm = norm[2:]
    return norm


def byte_limit(settings: Settings) -> int:
    """Largest tile file read into memory: an uncompressed RGBA image at the pixel limit, plus headers."""
    return settings.max_image_pixels * 4 + (1 << 20)


def read_stream(stream: IO[bytes], size: int, where: str, settings: Settings) -> bytes:
    """The bytes of a tile file of declared ``size``, read from ``stream`` front to back (no seek: a
    tar.gz seeks backwards only by decompressing again), refused as soon as the size or the image
    header says it cannot be a tile, and never more than ``byte_limit`` bytes."""
    limit = byte_limit(settings)
    if size > limit:
        raise BadInput(f"{where}: {size} bytes is too large for a tile (setting max_image_pixels)")
    head = stream.read(HEADER_BYTES)
    if len(head) == HEADER_BYTES:
        check_declared_pixels(head, where, settings.max_image_pixels)
    data = head + stream.read(limit + 1 - len(head))
    if len(data) > limit:
        raise BadInput(f"{where}: too large for a tile (setting max_image_pixels)")
    return data


class Reader(ABC):
    """Lists the tiles of one input (folder, archive, slide) and reads them back one at a time."""

    kind: ClassVar[str]

    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = Path(root)
        self.settings = settings
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self._pid = os.getpid()
        self._lock = threading.RLock()

    @abstractmethod
    def scan(self) -> Iterator[TileEntry | Skipped]:
        """Every image tile, in a deterministic order, with the entries refused along the way."""

    @abstractmethod
    def read(self, locator: str) -> bytes | Image.Image:
        """Bytes of a file member (decoded later by ``search.archives.decode``) or an RGB image for WSI tiles."""

    def close(self) -> None:
        with self._lock:
            self._own_process()
            while self._handles:
                _, handle = self._handles.popitem()
                handle.close()

    def _own_process(self) -> None:
        if self._pid != os.getpid():
            # Forked: the parent's handles (and possibly a held lock) are not ours to use or close.
            self._handles = OrderedDict()
            self._lock = threading.RLock()
            self._pid = os.getpid()

    def _handle(self, key: str, opener: Callable[[], Any]) -> Any:
        """This process's open handle for ``key``, opened on first use; least recently used closes first."""
        self._own_process()
        with self._lock:
            handle = self._handles.get(key)
            if handle is not None:
                self._handles.move_to_end(key)
                return handle
            handle = opener()
            self._handles[key] = handle
            while len(self._handles) > _MAX_OPEN_HANDLES:
                _, old = self._handles.popitem(last=False)
                old.close()
            return handle

    def _drop_handle(self, key: str) -> None:
        """Close a handle after an error: OpenSlide and gzip streams are unusable once they fail."""
        with self._lock:
            handle = self._handles.pop(key, None)
        if handle is not None:
            # Already failed: closing is best effort.
            with contextlib.suppress(Exception):
                handle.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._pid = os.getpid()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"
