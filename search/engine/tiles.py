"""Tile images: re-read from their archives through a pool of open readers, rendered for a browser.

Tile ids are never reused and a changed tile gets a new id, so an id and ``RENDER_VERSION`` name one
image forever: the web layer builds its ETags from both.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

from PIL import Image

from search.archives.decode import decode_image
from search.archives.readers import Reader, open_reader
from search.core.errors import BadInput, NotFound
from search.core.settings import Settings
from search.storage.store import Store

from .cache import LRU

# Bump when the rendering of tiles or thumbnails changes, so browsers fetch the new versions.
RENDER_VERSION = 1
THUMBNAIL_PX = 192
# Rendered tiles kept in memory; a thumbnail is ~10 kB, a full tile ~100 kB.
IMAGE_CACHE_BYTES = 64 * 1024 * 1024
# Formats a browser shows as they are; anything else (TIFF, whole-slide regions) is re-encoded.
_WEB_FORMATS = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


def get_tile(store: Store, tile_id: int) -> dict:
    """The stored tile, or NotFound."""
    found = store.get_tiles([tile_id])
    if not found:
        raise NotFound(f"no tile with id {tile_id}")
    return found[0]


class TileImages:
    """Tile images by id, with one open reader per archive (each used by one thread at a time)."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._images = LRU(IMAGE_CACHE_BYTES)
        self._readers: dict[str, tuple[Reader, threading.Lock]] = {}
        self._readers_lock = threading.Lock()

    def tile_bytes(self, tile_id: int, thumbnail: bool = False) -> tuple[bytes, str]:
        """(image bytes, content type) of a tile, re-read from its archive; thumbnails are 192 px JPEGs."""
        key = (tile_id, thumbnail)
        cached = self._images.get(key)
        if cached is not None:
            return cached
        tile = get_tile(self.store, tile_id)
        where = f"{tile['source']['uri']}: {tile['path']}"
        reader, lock = self._reader(tile["source"]["uri"])
        try:
            with lock:
                data = reader.read(tile["locator"])
            image = decode_image(data, where, self.settings.max_image_pixels)
        except BadInput as exc:
            raise NotFound(
                f"tile {tile_id} is indexed but its image cannot be read: {exc.message}; if the archive moved, "
                "run `histosearch index` on its new location"
            ) from None
        if thumbnail:
            small = image.convert("RGB")
            small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
            out = (_encode(small, "JPEG", quality=85), "image/jpeg")
        elif isinstance(data, bytes) and image.format in _WEB_FORMATS:
            out = (data, _WEB_FORMATS[image.format])
        else:
            out = (_encode(image.convert("RGB"), "JPEG", quality=92), "image/jpeg")
        self._images.put(key, out, size=len(out[0]))
        return out

    def close(self) -> None:
        """Close the open archive readers."""
        with self._readers_lock:
            for reader, _ in self._readers.values():
                reader.close()
            self._readers.clear()

    def _reader(self, uri: str) -> tuple[Reader, threading.Lock]:
        with self._readers_lock:
            entry = self._readers.get(uri)
            if entry is None:
                entry = (open_reader(Path(uri), self.settings), threading.Lock())
                self._readers[uri] = entry
            return entry


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()
