"""Builders of test inputs in a tmp folder: tile trees, zip/tar/WebDataset archives, a small
pyramidal slide, and hostile archives. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import io
import json
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

TILE_FORMATS = ("jpg", "png", "tif", "webp")
_PIL_FORMAT = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "tif": "TIFF", "tiff": "TIFF", "webp": "WEBP"}

# H&E-like colours for the slide's tissue: saturated pink/purple on white glass.
TISSUE_RGB = (200, 90, 160)


def make_image(size: int = 64, seed: int = 0) -> Image.Image:
    """An RGB tile: a seed-dependent colour gradient plus noise, distinct for each seed."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 216, size=3)
    ramp = np.linspace(-30, 30, size)[None, :, None]
    noise = rng.normal(0, 12, size=(size, size, 3))
    pixels = np.clip(base[None, None, :] + ramp + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    """``image`` encoded as ``fmt`` (a file extension: jpg, png, tif, webp)."""
    buf = io.BytesIO()
    image.save(buf, _PIL_FORMAT[fmt.lower()])
    return buf.getvalue()


def make_tiles(dir: Path, n: int, size: int = 64, seed: int = 0) -> list[Path]:
    """``n`` tiles in ``dir/case{i%2}/slide{i%3}/tile_{i:03d}.{ext}``, formats cycling jpg/png/tif/webp."""
    paths = []
    for i in range(n):
        ext = TILE_FORMATS[i % len(TILE_FORMATS)]
        path = Path(dir) / f"case{i % 2}" / f"slide{i % 3}" / f"tile_{i:03d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(make_image(size, seed * 100_003 + i), ext))
        paths.append(path)
    return paths


def files_under(root: Path) -> dict[str, Path]:
    """Every file below ``root`` by its relative posix path: the ``files`` argument of make_zip/make_tar."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _content(data: bytes | Path) -> bytes:
    return data.read_bytes() if isinstance(data, Path) else data


def make_zip(path: Path, files: Mapping[str, bytes | Path]) -> Path:
    """A zip of ``files`` (member name -> bytes or a file to copy)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, _content(data))
    return Path(path)


def _tar_info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, mtime: int = 1_700_000_000) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime, info.mode = size, kind, mtime, 0o644
    return info


def make_tar(path: Path, files: Mapping[str, bytes | Path], gz: bool = False) -> Path:
    """A tar (gzip-compressed when ``gz``) of ``files`` (member name -> bytes or a file to copy)."""
    with tarfile.open(path, "w:gz" if gz else "w") as archive:
        for name, data in files.items():
            content = _content(data)
            archive.addfile(_tar_info(name, len(content)), io.BytesIO(content))
    return Path(path)


def wds_sidecar(i: int) -> dict:
    """The JSON sidecar make_wds_shard writes for sample ``i``."""
    return {"label": f"class{i % 3}", "case_id": f"case{i % 2}", "score": i / 10}


def make_wds_shard(path: Path, n: int, size: int = 64, seed: int = 0, gz: bool = False) -> list[str]:
    """A WebDataset shard: ``sample{i:04d}.jpg`` + ``.json`` (wds_sidecar) + ``.cls``; returns the keys."""
    files: dict[str, bytes] = {}
    keys = []
    for i in range(n):
        key = f"sample{i:04d}"
        keys.append(key)
        files[f"{key}.cls"] = str(i % 3).encode()
        files[f"{key}.jpg"] = image_bytes(make_image(size, seed * 100_003 + i), "jpg")
        files[f"{key}.json"] = json.dumps(wds_sidecar(i)).encode()
    make_tar(path, files, gz=gz)
    return keys


def make_slide(
    path: Path,
    size: int = 2048,
    mpp: float | None = 0.25,
    tissue: tuple[int, int, int, int] = (512, 768, 1280, 1280),
    levels: int = 3,
    tile: int = 256,
    seed: int = 0,
) -> Path:
    """A pyramidal tiled TIFF OpenSlide reads as generic-tiff: white glass with one tissue rectangle.

    ``tissue`` is (x0, y0, x1, y1) in level-0 pixels; each level halves the previous one; ``mpp``
    goes into the resolution tags (pixels per centimetre), which OpenSlide reports as mpp.
    """
    rng = np.random.default_rng(seed)
    pixels = np.full((size, size, 3), 250, dtype=np.uint8)
    x0, y0, x1, y1 = tissue
    texture = rng.normal(0, 10, size=(y1 - y0, x1 - x0, 3))
    pixels[y0:y1, x0:x1] = np.clip(np.array(TISSUE_RGB) + texture, 0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path) as writer:
        for level in range(levels):
            step = 2**level
            options = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * step)
                options = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            writer.write(
                pixels[::step, ::step],
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                subfiletype=0 if level == 0 else 1,
                **options,
            )
    return Path(path)


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid few-kB PNG of a ``width`` x ``height`` black 1-bit image: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def make_hostile_zip(path: Path) -> dict[str, str]:
    """A zip with one good tile and refused members; returns {member path: expected reason fragment}."""
    good = image_bytes(make_image(32, 1), "png")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("good.png", good)
        archive.writestr("../evil.png", good)
        archive.writestr("/abs.png", good)
        archive.writestr("sub/../../up.png", good)
        link = zipfile.ZipInfo("link.png")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
        fifo = zipfile.ZipInfo("fifo.png")
        fifo.create_system = 3
        fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
        archive.writestr(fifo, b"")
    return {
        "../evil.png": "'..'",
        "/abs.png": "absolute",
        "sub/../../up.png": "'..'",
        "link.png": "symbolic link",
        "fifo.png": "not a regular file",
    }


def make_hostile_tar(path: Path, gz: bool = False) -> dict[str, str]:
    """A tar with one good tile and refused members; returns {member path: expected reason fragment}."""
    good = image_bytes(make_image(32, 1), "png")
    with tarfile.open(path, "w:gz" if gz else "w") as archive:
        for name in ("good.png", "../evil.png", "/abs.png"):
            archive.addfile(_tar_info(name, len(good)), io.BytesIO(good))
        symlink = _tar_info("link.png", kind=tarfile.SYMTYPE)
        symlink.linkname = "/etc/passwd"
        archive.addfile(symlink)
        hardlink = _tar_info("hard.png", kind=tarfile.LNKTYPE)
        hardlink.linkname = "good.png"
        archive.addfile(hardlink)
        archive.addfile(_tar_info("fifo.png", kind=tarfile.FIFOTYPE))
        archive.addfile(_tar_info("dev.png", kind=tarfile.CHRTYPE))
    return {
        "../evil.png": "'..'",
        "/abs.png": "absolute",
        "link.png": "symbolic link",
        "hard.png": "hard link",
        "fifo.png": "not a regular file",
        "dev.png": "not a regular file",
    }


LABEL_RGB = (0, 255, 0)
MACRO_RGB = (255, 0, 0)


def make_svs_with_label(
    path: Path, size: int = 2048, tissue: tuple[int, int, int, int] = (512, 768, 1280, 1280)
) -> Path:
    """An Aperio SVS OpenSlide reads as ``aperio``, 0.25 um/px, with a thumbnail and the two images that
    carry patient data on real slides: a pure green ``label`` and a pure red ``macro``."""
    pixels = np.full((size, size, 3), 250, dtype=np.uint8)
    x0, y0, x1, y1 = tissue
    pixels[y0:y1, x0:x1] = TISSUE_RGB
    head = "Aperio Image Library v12.0.0\r\n"
    options = {"photometric": "rgb", "compression": "zlib", "metadata": None}
    with tifffile.TiffWriter(path) as writer:
        writer.write(
            pixels, tile=(256, 256), description=f"{head}{size}x{size} (256x256)|AppMag = 40|MPP = 0.25", **options
        )
        writer.write(pixels[::16, ::16], description=f"{head}{size}x{size} -> thumbnail|MPP = 0.25", **options)
        for level in (1, 2):
            step = 2**level
            writer.write(
                pixels[::step, ::step], tile=(256, 256), description=f"{head}level {level}|MPP = 0.25", **options
            )
        writer.write(
            np.full((300, 400, 3), LABEL_RGB, np.uint8), subfiletype=1, description=f"{head}label 400x300", **options
        )
        writer.write(
            np.full((300, 800, 3), MACRO_RGB, np.uint8), subfiletype=9, description=f"{head}macro 800x300", **options
        )
    return Path(path)
