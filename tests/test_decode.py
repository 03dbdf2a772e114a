import hashlib
import io
import os
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image, ImageFile

from search.archives.decode import UploadDecoder, content_hash, decode_image
from search.core.errors import BadInput, ServerBusy
from tests.archives import TILE_FORMATS, bomb_png, image_bytes, make_image

LIMIT = 100_000_000


@pytest.mark.parametrize("fmt", TILE_FORMATS)
def test_decodes_each_tile_format(fmt):
    original = make_image(48, seed=3)
    image = decode_image(image_bytes(original, fmt), f"tile.{fmt}", LIMIT)
    assert image.size == (48, 48)
    assert image.mode == "RGB"
    if fmt in ("png", "tif"):  # lossless
        assert image.tobytes() == original.tobytes()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_keeps_the_image_mode(mode):
    # Conversion to RGB belongs to the model's preprocessing, after resize and crop.
    original = make_image(16).convert("RGBA" if mode == "RGBA" else "L")
    if mode == "P":
        original = make_image(16).convert("P")
    if mode == "I;16":
        original = Image.new("I;16", (16, 16), 1000)
    buf = io.BytesIO()
    original.save(buf, "PNG")
    assert decode_image(buf.getvalue(), "t.png", LIMIT).mode == mode


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"this is not an image at all" * 10, "not a JPEG, PNG, TIFF or WebP"),
        (image_bytes(make_image(16), "png").replace(b"IHDR", b"IHDX"), "not a JPEG, PNG, TIFF or WebP"),
    ],
)
def test_refuses_non_images(data, reason):
    with pytest.raises(BadInput, match=f"^cases/junk.png: .*{reason}"):
        decode_image(data, "cases/junk.png", LIMIT)


@pytest.mark.parametrize("fmt", TILE_FORMATS)
def test_refuses_truncated_files(fmt):
    data = image_bytes(make_image(64, seed=1), fmt)
    with pytest.raises(BadInput, match=rf"^a/cut\.{fmt}: "):
        decode_image(data[: len(data) // 2], f"a/cut.{fmt}", LIMIT)


@pytest.mark.parametrize("fmt", ["GIF", "BMP"])
def test_refuses_other_formats(fmt):
    buf = io.BytesIO()
    make_image(16).save(buf, fmt)
    with pytest.raises(BadInput, match="x.png: not a JPEG, PNG, TIFF or WebP"):
        decode_image(buf.getvalue(), "x.png", LIMIT)


def test_refuses_a_decompression_bomb():
    data = bomb_png()  # 20000 x 20000 pixels in ~50 kB
    assert len(data) < 100_000
    with pytest.raises(BadInput, match="^bomb.png: .*too many pixels"):
        decode_image(data, "bomb.png", LIMIT)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_count_is_checked_before_decoding():
    # 12000 x 12000 pixels of broken data: decoding first would fail on the data, not the size.
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 12_000, 12_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"not zlib data")
    with pytest.raises(BadInput, match=r"12000x12000 is too many pixels \(limit 100000000"):
        decode_image(data, "huge.png", LIMIT)
    with pytest.raises(BadInput, match="huge.png: corrupt or truncated"):
        decode_image(data, "huge.png", 12_000 * 12_000)


def test_pixel_limit_is_inclusive():
    data = image_bytes(make_image(64), "png")
    assert decode_image(data, "t.png", 64 * 64).size == (64, 64)
    with pytest.raises(BadInput, match="t.png: 64x64 is too many pixels"):
        decode_image(data, "t.png", 64 * 64 - 1)


def test_pil_images_pass_through_with_the_pixel_check():
    tile = make_image(32)
    assert decode_image(tile, "s.svs@L0:0,0:32", LIMIT) is tile
    with pytest.raises(BadInput, match="s.svs@L0:0,0:32: 32x32 is too many pixels"):
        decode_image(tile, "s.svs@L0:0,0:32", 100)


def test_content_hash_of_bytes_is_their_sha256():
    data = image_bytes(make_image(16), "png")
    assert content_hash(data) == hashlib.sha256(data).hexdigest()
    assert content_hash(data) != content_hash(data + b"\0")


def test_content_hash_of_images_covers_pixels_and_size():
    tile = make_image(16, seed=1)
    assert content_hash(tile) == content_hash(tile.copy())
    assert content_hash(tile.convert("RGBA")) == content_hash(tile)
    assert content_hash(tile) != content_hash(make_image(16, seed=2))
    raw = bytes(range(48))
    wide, tall = Image.frombytes("RGB", (8, 2), raw), Image.frombytes("RGB", (2, 8), raw)
    assert content_hash(wide) != content_hash(tall)


def test_pillows_bomb_warning_does_not_reach_stderr(tmp_path):
    """Pillow warns past its own ceiling (~89 M pixels); the refusal is ours to report, once."""
    (tmp_path / "big.png").write_bytes(bomb_png(10_000, 9_500))
    code = (
        "import sys; from search.archives.decode import decode_image; from search.core.errors import BadInput\n"
        "try:\n    decode_image(open(sys.argv[1], 'rb').read(), 'big.png', 1000)\n"
        "except BadInput as exc:\n    print(exc.message)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "big.png")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.startswith("big.png: 10000x9500 is too many pixels")
    assert done.stderr == ""


# Uploads: one query patch, a far lower pixel limit, a bounded number decoding at once.

UPLOAD_LIMIT = 4096 * 4096


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_upload_bomb_is_refused_before_any_pixel_is_decoded(monkeypatch):
    data = bomb_png(10_000, 10_000)  # a 1-bit PNG claiming exactly the archive limit of 100 Mpx
    assert len(data) < 16_000

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    decoder = UploadDecoder(max_pixels=UPLOAD_LIMIT, concurrency=1)
    with pytest.raises(BadInput, match=r"^upload b.png: 10000x10000 is too many pixels .*max_upload_pixels"):
        decoder(data, "upload b.png")


def test_upload_limit_is_known_before_decoding():
    decoder = UploadDecoder(max_pixels=UPLOAD_LIMIT, concurrency=2)
    assert decoder.max_bytes == UPLOAD_LIMIT * 4


def test_large_upload_jpeg_is_decoded_reduced():
    photo = Image.new("RGB", (2000, 1600), "purple")
    data = image_bytes(photo, "jpg")
    decoder = UploadDecoder(max_pixels=100_000, concurrency=1, min_side=200)
    image = decoder(data, "upload photo.jpg")
    assert image.size == (250, 200)  # 1/8 scale: the shorter side still covers min_side
    assert image.getpixel((100, 100))[0] > 100  # real pixels, not a blank draft
    # The same pixels as PNG cannot be decoded reduced: refused by the limit.
    with pytest.raises(BadInput, match="2000x1600 is too many pixels"):
        decoder(image_bytes(photo, "png"), "upload photo.png")


def test_small_upload_jpeg_is_decoded_at_full_size():
    data = image_bytes(make_image(300, seed=2), "jpg")
    image = UploadDecoder(max_pixels=UPLOAD_LIMIT, concurrency=1, min_side=200)(data, "upload p.jpg")
    assert image.size == (300, 300)


def test_uploads_wait_for_a_decode_slot_then_are_refused_as_busy():
    data = image_bytes(make_image(32), "png")
    decoder = UploadDecoder(max_pixels=UPLOAD_LIMIT, concurrency=1, wait_s=0.01)
    with decoder.slot(), pytest.raises(ServerBusy, match="decoding other uploads"):
        decoder(data, "upload a.png")
    assert decoder(data, "upload a.png").size == (32, 32)  # the slot is free again
