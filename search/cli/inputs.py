"""What commands read from their arguments: image files and folders, through the safe decoder, and KEY=VALUE
metadata."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from search.core.errors import BadInput
from search.core.settings import Settings

if TYPE_CHECKING:
    from PIL import Image


def image_files(paths: list[Path]) -> list[Path]:
    """The image files given: each file as it is, each folder's images (recursively, sorted)."""
    from search.archives.readers.base import IMAGE_EXTENSIONS

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise BadInput(f"{path}: no such file or folder")
    return files


def read_image(path: Path, settings: Settings) -> Image.Image:
    """An image given on the command line, through the safe decoder: size and pixel limits before decoding."""
    from search.archives.decode import decode_image
    from search.archives.readers.base import byte_limit

    try:
        size = path.stat().st_size
        if size > byte_limit(settings):
            raise BadInput(f"{path}: {size} bytes is larger than any image within max_image_pixels")
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_image(data, str(path), settings.max_image_pixels)


def meta_of(items: list[str] | None) -> dict[str, str]:
    """The ``--meta KEY=VALUE`` options as a dict."""
    meta = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInput(f"--meta {item!r}: expected KEY=VALUE")
        meta[key] = value
    return meta
