"""Safe decoding of untrusted tile images (archive members, uploads).

The pixel count is checked from the header before any pixel is decoded, so a small file that
claims a huge image (a decompression bomb) is refused without allocating it. Only the tile formats
(JPEG, PNG, TIFF, WebP) are opened: no other Pillow plugin ever parses an untrusted file.
"""

from __future__ import annotations

import hashlib
import io

from PIL import Image, UnidentifiedImageError

from search.core.errors import BadInput

_FORMATS = ("JPEG", "PNG", "TIFF", "WEBP")


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
    try:
        image = Image.open(io.BytesIO(data), formats=_FORMATS)
    except UnidentifiedImageError:
        raise BadInput(f"{where}: not a JPEG, PNG, TIFF or WebP image (corrupt or unsupported format)") from None
    except Image.DecompressionBombError as exc:
        # Pillow's own ceiling (2 x Image.MAX_IMAGE_PIXELS) struck before ours could.
        raise BadInput(f"{where}: too many pixels, refused as a decompression bomb ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a hostile header can fail in any plugin; all mean unusable
        raise BadInput(f"{where}: unreadable image header ({exc})") from None
    _check_pixels(image, where, max_pixels)
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data surfaces as many exception types
        raise BadInput(f"{where}: corrupt or truncated image ({exc})") from None
    return image


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
