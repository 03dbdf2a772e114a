"""Safe decoding of untrusted tile images (archive members, uploads).

The pixel count is checked from the header before any pixel is decoded, so a small file that
claims a huge image (a decompression bomb) is refused without allocating it. Only the tile formats
(JPEG, PNG, TIFF, WebP) are opened: no other Pillow plugin ever parses an untrusted file.

Uploads (one query patch each, from anyone who can reach the server) get their own, far lower
pixel limit and a bound on how many decode at once, so the memory an upload may cost is known
before its first pixel is decoded: at most ``max_pixels`` x 4 bytes (Pillow's widest mode) per
decode slot. A large JPEG photo is decoded reduced (JPEG draft mode, 1/2 to 1/8 scale) to the
smallest size that still covers the model's input, so it stays within the limit.
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image, UnidentifiedImageError

from search.core.errors import BadInput, ServerBusy

_FORMATS = ("JPEG", "PNG", "TIFF", "WEBP")
# The widest pixel Pillow decodes to (RGBA, I, F): what one decoded pixel may cost in memory.
MAX_BYTES_PER_PIXEL = 4

# Pillow warns on stderr past its own pixel ceiling; the pixel count is checked here (setting
# max_image_pixels) and an image refused for it is reported once, as a file error, not as a warning.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_image(data: bytes | Image.Image, where: str, max_pixels: int) -> Image.Image:
    """Decode ``data`` fully and return it in its own mode; BadInput(f"{where}: reason") when unusable.

    A PIL image (a whole-slide tile) is only checked against ``max_pixels``. Conversion to RGB
    is left to the model's preprocessing, which does it after resize and crop.
    """
    if isinstance(data, Image.Image):
        _check_pixels(data, where, max_pixels)
        return data
    if not data:
        raise BadInput(f"{where}: empty file")
    return _load(_open(io.BytesIO(data), where, max_pixels), where)


class UploadDecoder:
    """Decodes uploaded query patches under ``max_pixels``, at most ``concurrency`` at a time.

    JPEGs are decoded at the smallest 1/1, 1/2, 1/4 or 1/8 scale whose shorter side is still at
    least ``min_side`` (the model resizes to its input size anyway); the pixel limit applies to the
    size that will be decoded. A decode waits up to ``wait_s`` for a free slot, then the upload is
    refused as ServerBusy rather than queued without end.
    """

    def __init__(self, max_pixels: int, concurrency: int, min_side: int = 448, wait_s: float = 30.0) -> None:
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.wait_s = wait_s
        self._slots = threading.BoundedSemaphore(concurrency)

    @property
    def max_bytes(self) -> int:
        """The most memory one decode may take for its pixels."""
        return self.max_pixels * MAX_BYTES_PER_PIXEL

    @contextmanager
    def slot(self) -> Iterator[None]:
        """One of the decode slots, or ServerBusy after ``wait_s``."""
        if not self._slots.acquire(timeout=self.wait_s):
            raise ServerBusy("the server is decoding other uploads: try again in a few seconds")
        try:
            yield
        finally:
            self._slots.release()

    def __call__(self, data: bytes, where: str) -> Image.Image:
        if not data:
            raise BadInput(f"{where}: empty file")
        image = _header(io.BytesIO(data), where)
        if image.format == "JPEG":
            width, height = image.size
            if min(width, height) >= 2 * self.min_side:
                image.draft(None, (self.min_side, self.min_side))
        _check_pixels(image, where, self.max_pixels, "max_upload_pixels")
        with self.slot():
            return _load(image, where)


def check_declared_pixels(head: bytes, where: str, max_pixels: int) -> None:
    """Refuse, from the first bytes of a file, an image whose header declares too many pixels, before the
    rest is read: a large member is never held in memory only to be refused. A header that ``head``
    does not hold whole (a TIFF directory at the end, say) is left to the full decode."""
    try:
        image = Image.open(io.BytesIO(head), formats=_FORMATS)
    except Image.DecompressionBombError as exc:
        raise BadInput(_bomb(where, exc)) from None
    except Exception:  # noqa: BLE001 - cut short at len(head), any plugin can fail; decode_image says why
        return
    _check_pixels(image, where, max_pixels)


def _open(stream: io.BytesIO, where: str, max_pixels: int) -> Image.Image:
    """The image ``stream`` holds, opened from its header only (no pixel decoded) and checked for size."""
    image = _header(stream, where)
    _check_pixels(image, where, max_pixels)
    return image


def _header(stream: io.BytesIO, where: str) -> Image.Image:
    """The image ``stream`` holds, with its header parsed and no pixel decoded."""
    try:
        return Image.open(stream, formats=_FORMATS)
    except UnidentifiedImageError:
        raise BadInput(f"{where}: not a JPEG, PNG, TIFF or WebP image (corrupt or unsupported format)") from None
    except Image.DecompressionBombError as exc:
        raise BadInput(_bomb(where, exc)) from None
    except Exception as exc:  # noqa: BLE001 - a hostile header can fail in any plugin; all mean unusable
        raise BadInput(f"{where}: unreadable image header ({exc})") from None


def _load(image: Image.Image, where: str) -> Image.Image:
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data surfaces as many exception types
        raise BadInput(f"{where}: corrupt or truncated image ({exc})") from None
    return image


def _bomb(where: str, exc: Exception) -> str:
    # Pillow's own ceiling (2 x Image.MAX_IMAGE_PIXELS) struck before ours could.
    return f"{where}: too many pixels, refused as a decompression bomb ({exc})"


def _check_pixels(image: Image.Image, where: str, max_pixels: int, setting: str = "max_image_pixels") -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadInput(f"{where}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise BadInput(
            f"{where}: {width}x{height} is too many pixels (limit {max_pixels}, "
            f"setting {setting}): refused as a possible decompression bomb"
        )


def content_hash(data: bytes | Image.Image) -> str:
    """sha256 hex of the file bytes, or of the size and RGB pixels of an image (WSI tiles)."""
    if isinstance(data, Image.Image):
        rgb = data if data.mode == "RGB" else data.convert("RGB")
        digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
        digest.update(rgb.tobytes())
        return digest.hexdigest()
    return hashlib.sha256(data).hexdigest()
