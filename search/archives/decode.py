"""Safe decoding of untrusted tile images (archive members, uploads).

The pixel count is checked from the header before any pixel is decoded, so a small file that
claims a huge image (a decompression bomb) is refused without allocating it. Only the tile formats
(JPEG, PNG, TIFF, WebP) are opened: no other Pillow plugin ever parses an untrusted file.
"""

from __future__ import annotations

import hashlib
import io
import warnings

from PIL import Image, UnidentifiedImageError

from search.core.errors import BadInput

_FORMATS = ("JPEG", "PNG", "TIFF", "WEBP")

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
    image = _open(io.BytesIO(data), where, max_pixels)
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data surfaces as many exception types
        raise BadInput(f"{where}: corrupt or truncated image ({exc})") from None
    return image


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
    try:
        image = Image.open(stream, formats=_FORMATS)
    except UnidentifiedImageError:
        raise BadInput(f"{where}: not a JPEG, PNG, TIFF or WebP image (corrupt or unsupported format)") from None
    except Image.DecompressionBombError as exc:
        raise BadInput(_bomb(where, exc)) from None
    except Exception as exc:  # noqa: BLE001 - a hostile header can fail in any plugin; all mean unusable
        raise BadInput(f"{where}: unreadable image header ({exc})") from None
    _check_pixels(image, where, max_pixels)
    return image


def _bomb(where: str, exc: Exception) -> str:
    # Pillow's own ceiling (2 x Image.MAX_IMAGE_PIXELS) struck before ours could.
    return f"{where}: too many pixels, refused as a decompression bomb ({exc})"


def _check_pixels(image: Image.Image, where: str, max_pixels: int) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadInput(f"{where}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise BadInput(
            f"{where}: {width}x{height} is too many pixels (limit {max_pixels}, "
            "setting max_image_pixels): refused as a possible decompression bomb"
        )


def content_hash(data: bytes | Image.Image) -> str:
    """sha256 hex of the file bytes, or of the size and RGB pixels of an image (WSI tiles)."""
    if isinstance(data, Image.Image):
        rgb = data if data.mode == "RGB" else data.convert("RGB")
        digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
        digest.update(rgb.tobytes())
        return digest.hexdigest()
    return hashlib.sha256(data).hexdigest()
