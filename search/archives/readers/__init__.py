"""Archive readers: one per input kind, chosen by ``open_reader``."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

from openslide import OpenSlide, OpenSlideError

from search.core.errors import BadInput
from search.core.settings import Settings

from .base import IMAGE_EXTENSIONS, Reader, Skipped, TileEntry
from .folder import FolderReader
from .slide import SLIDE_EXTENSIONS, TIFF_EXTENSIONS, SlideReader, is_slide_tiff
from .tar import TarReader
from .zip import ZipReader

__all__ = [
    "FolderReader",
    "Reader",
    "Skipped",
    "SlideReader",
    "TarReader",
    "TileEntry",
    "ZipReader",
    "open_reader",
]

ACCEPTED = (
    "a folder of tiles or slides, a .zip, a .tar/.tar.gz/.tgz (WebDataset shards too), or a whole-slide "
    f"file OpenSlide reads ({' '.join(sorted(SLIDE_EXTENSIONS))}, or a pyramidal .tif/.tiff)"
)


def open_reader(path: Path, settings: Settings) -> Reader:
    """The reader for ``path``; BadInput naming the file and the accepted kinds when there is none."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or folder")
    if path.is_dir():
        return FolderReader(path, settings)
    name = path.name.lower()
    if name.endswith(".zip"):
        if not zipfile.is_zipfile(path):
            raise BadInput(f"{path.name}: not a zip archive (corrupt or truncated?)")
        return ZipReader(path, settings)
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        try:
            readable = tarfile.is_tarfile(path)
        except (OSError, EOFError):
            readable = False
        if not readable:
            raise BadInput(f"{path.name}: not a tar archive (corrupt or truncated?)")
        return TarReader(path, settings)
    ext = path.suffix.lower()
    if ext in SLIDE_EXTENSIONS:
        try:
            known = OpenSlide.detect_format(str(path)) is not None
        except (OpenSlideError, OSError):
            known = False
        if not known:
            raise BadInput(f"{path.name}: OpenSlide does not recognise this slide (corrupt or unsupported)")
        return SlideReader(path, settings)
    if ext in TIFF_EXTENSIONS and is_slide_tiff(path, settings.max_image_pixels):
        return SlideReader(path, settings)
    if ext in IMAGE_EXTENSIONS:
        raise BadInput(f"{path.name}: a single tile image is not an input; put it in a folder. Accepted: {ACCEPTED}")
    raise BadInput(f"{path.name}: not an input histosearch reads. Accepted: {ACCEPTED}")
