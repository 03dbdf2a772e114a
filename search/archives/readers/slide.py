"""Whole-slide images (OpenSlide): find the tissue, cut it into tiles at a fixed physical scale.

Tissue is found on a low-resolution rendering of the slide (1-8k px a side): Otsu's threshold
on HSV saturation, with near-white pixels dropped. The grid is cut at ``settings.target_mpp`` um/px
and ``settings.tile_size`` px from the coarsest level that is at least that fine; a region of
``tile_size * target_mpp / level_mpp`` level pixels is read and resized (bicubic) to ``tile_size``.
Tiles whose tissue fraction reaches ``settings.tissue_min_fraction`` are kept.

A slide without mpp metadata cannot be brought to ``target_mpp``: it is tiled from level 0 at
its native scale, ``tile_size`` pixels a tile, and its tiles record ``mpp=None``.

Tile locators read ``"{slide}@L{level}:{x},{y}:{size}"``: level-0 coordinates of the top-left
corner and the region size in pixels of that level.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import openslide
from openslide import OpenSlide, OpenSlideError
from PIL import Image

from search.core.errors import BadInput
from search.core.settings import Settings

from .base import Reader, Skipped, SlideInfo, TileEntry

# Extensions that only slides use; a .tif/.tiff is a slide only when it is pyramidal (is_slide_tiff).
SLIDE_EXTENSIONS = frozenset({".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"})
TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})

# The tissue mask is computed on a rendering of the slide about _MASK_PX_PER_TILE px a tile side,
# kept between _THUMB_MIN_SIDE and _THUMB_MAX_SIDE px on its longest side (unless the slide is smaller).
_MASK_PX_PER_TILE = 16
_THUMB_MIN_SIDE = 1024
_THUMB_MAX_SIDE = 8192
_CHUNK = 4096  # level pixels read at once while rendering the mask, to bound memory on flat slides
_MIN_SATURATION = 15  # Otsu on a blank slide splits noise: below this it is background anyway
_NEAR_WHITE = 220  # grey level above which a pixel is glass, whatever its saturation

_LOCATOR = re.compile(r"^(?P<slide>.+)@L(?P<level>\d+):(?P<x>\d+),(?P<y>\d+):(?P<size>\d+)$")


class TileLocator(NamedTuple):
    slide: str
    level: int
    x: int
    y: int
    size: int

    def __str__(self) -> str:
        return f"{self.slide}@L{self.level}:{self.x},{self.y}:{self.size}"


def parse_locator(locator: str) -> TileLocator | None:
    """The parts of a WSI tile locator, or None when ``locator`` names a plain file."""
    m = _LOCATOR.match(locator)
    if m is None:
        return None
    return TileLocator(m["slide"], int(m["level"]), int(m["x"]), int(m["y"]), int(m["size"]))


@dataclass(frozen=True)
class TilePlan:
    level: int  # the level regions are read from
    size: int  # region side in pixels of that level
    step: float  # region side in level-0 pixels: the grid pitch
    mpp: float | None  # um/px of the produced tile


def is_slide_tiff(path: Path, max_pixels: int) -> bool:
    """Whether a .tif/.tiff is a whole slide: OpenSlide reads it and it is pyramidal or too big to decode.

    A vendor TIFF (Aperio, Philips, Ventana...) always is; a generic tiled TIFF with one level is
    how some tools save a single tile.
    """
    try:
        fmt = OpenSlide.detect_format(str(path))
        if fmt is None:
            return False
        if fmt != "generic-tiff":
            return True
        with OpenSlide(str(path)) as slide:
            width, height = slide.dimensions
            return slide.level_count > 1 or width * height > max_pixels
    except (OpenSlideError, OSError):
        return False


def open_slide(path: Path) -> OpenSlide:
    try:
        return OpenSlide(str(path))
    except (OpenSlideError, OSError) as exc:
        raise BadInput(f"{path.name}: OpenSlide cannot read this slide ({exc})") from None


def slide_mpp(slide: OpenSlide) -> float | None:
    """Level-0 um/px from the slide's metadata, None when absent or unusable."""
    value = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
    try:
        mpp = float(value) if value is not None else None
    except ValueError:
        return None
    return mpp if mpp is not None and math.isfinite(mpp) and mpp > 0 else None


def plan_tiles(slide: OpenSlide, tile_size: int, target_mpp: float) -> TilePlan:
    """Pick the level and region size that give ``tile_size`` tiles at ``target_mpp``."""
    mpp0 = slide_mpp(slide)
    if mpp0 is None:
        return TilePlan(level=0, size=tile_size, step=float(tile_size), mpp=None)
    level_mpps = [mpp0 * ds for ds in slide.level_downsamples]
    # A hair of tolerance: vendors round downsamples (4.0002), which must not skip the right level.
    fine_enough = [i for i, m in enumerate(level_mpps) if m <= target_mpp * 1.001]
    # Coarser than target at level 0 too: read level 0 and upsample so every tile has the same scale.
    level = max(fine_enough, key=lambda i: level_mpps[i]) if fine_enough else 0
    size = max(1, round(tile_size * target_mpp / level_mpps[level]))
    return TilePlan(
        level=level,
        size=size,
        step=size * slide.level_downsamples[level],
        mpp=size * level_mpps[level] / tile_size,
    )


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the level t maximising between-class variance (class 1 is > t)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(hist * levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean0 = sum0 / weight0
        mean1 = (sum0[-1] - sum0) / weight1
        between = weight0 * weight1 * (mean0 - mean1) ** 2
    return int(np.argmax(np.nan_to_num(between, nan=0.0, posinf=0.0)))


def tissue_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an RGB array: saturated (above Otsu's threshold) and not near-white."""
    high = rgb.max(axis=2).astype(np.uint16)
    low = rgb.min(axis=2)
    saturation = ((high - low) * 255 // np.maximum(high, 1)).astype(np.uint8)
    threshold = max(otsu_threshold(saturation), _MIN_SATURATION)
    return (saturation > threshold) & (rgb.mean(axis=2, dtype=np.float32) < _NEAR_WHITE)


def _on_white(region: Image.Image) -> Image.Image:
    """RGBA from OpenSlide (transparent outside the scanned area) flattened onto white glass."""
    flat = Image.new("RGB", region.size, (255, 255, 255))
    flat.paste(region, mask=region.getchannel("A"))
    return flat


def tissue_mask(slide: OpenSlide, step: float) -> tuple[np.ndarray, float, float]:
    """Tissue mask of the whole slide and its scale (mask px per level-0 px, in x and y)."""
    w0, h0 = slide.dimensions
    longest = max(w0, h0)
    downsample = max(1.0, longest / _THUMB_MAX_SIDE, min(step / _MASK_PX_PER_TILE, longest / _THUMB_MIN_SIDE))
    thumb_w, thumb_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
    level = slide.get_best_level_for_downsample(downsample)
    level_w, level_h = slide.level_dimensions[level]
    level_ds = slide.level_downsamples[level]
    fx, fy = thumb_w / level_w, thumb_h / level_h
    thumb = Image.new("RGB", (thumb_w, thumb_h), (255, 255, 255))
    for cy in range(0, level_h, _CHUNK):
        for cx in range(0, level_w, _CHUNK):
            cw, ch = min(_CHUNK, level_w - cx), min(_CHUNK, level_h - cy)
            box = (round(cx * fx), round(cy * fy), round((cx + cw) * fx), round((cy + ch) * fy))
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            region = slide.read_region((round(cx * level_ds), round(cy * level_ds)), level, (cw, ch))
            part = _on_white(region).resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.BOX)
            thumb.paste(part, box[:2])
    return tissue_from_rgb(np.asarray(thumb)), thumb_w / w0, thumb_h / h0


def _grid_edges(count: int, step: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    edges = np.round(np.arange(count + 1) * step * scale).astype(np.int64)
    start = edges[:-1]
    return start, np.maximum(edges[1:], start + 1)


def tissue_fractions(mask: np.ndarray, sx: float, sy: float, step: float, nx: int, ny: int) -> np.ndarray:
    """Tissue fraction of each grid cell (ny, nx); area past the slide's edge counts as glass."""
    height, width = mask.shape
    integral = np.zeros((height + 1, width + 1), dtype=np.int64)
    integral[1:, 1:] = mask.cumsum(axis=0).cumsum(axis=1)
    x_start, x_end = _grid_edges(nx, step, sx)
    y_start, y_end = _grid_edges(ny, step, sy)
    xa, xb = np.clip(x_start, 0, width), np.clip(x_end, 0, width)
    ya, yb = np.clip(y_start, 0, height), np.clip(y_end, 0, height)
    tissue = integral[np.ix_(yb, xb)] - integral[np.ix_(ya, xb)] - integral[np.ix_(yb, xa)] + integral[np.ix_(ya, xa)]
    area = np.outer(y_end - y_start, x_end - x_start)
    return tissue / area


def slide_tiles(path: Path, rel: str, settings: Settings) -> Iterator[TileEntry | Skipped]:
    """The tissue tiles of one slide file, row by row; one Skipped when the slide cannot be read."""
    try:
        slide = open_slide(path)
    except BadInput as exc:
        yield Skipped(rel, exc.message)
        return
    with slide:
        try:
            plan = plan_tiles(slide, settings.tile_size, settings.target_mpp)
            mask, sx, sy = tissue_mask(slide, plan.step)
        except OpenSlideError as exc:
            yield Skipped(rel, f"OpenSlide failed while finding tissue ({exc})")
            return
        w0, h0 = slide.dimensions
        info = SlideInfo(width=w0, height=h0, mpp=slide_mpp(slide))
    nx, ny = math.ceil(w0 / plan.step), math.ceil(h0 / plan.step)
    fractions = tissue_fractions(mask, sx, sy, plan.step, nx, ny)
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    for row, col in np.argwhere(fractions >= settings.tissue_min_fraction):
        x, y = round(int(col) * plan.step), round(int(row) * plan.step)
        locator = TileLocator(rel, plan.level, x, y, plan.size)
        yield TileEntry(
            locator=str(locator),
            path=rel,
            fingerprint=f"{stamp}:L{plan.level}:{x},{y}:{plan.size}",
            level=plan.level,
            x=x,
            y=y,
            size=plan.size,
            mpp=plan.mpp,
            slide_path=rel,
            slide_info=info,
        )


def read_slide_tile(reader: Reader, path: Path, locator: TileLocator) -> Image.Image:
    """One tile as a ``tile_size`` RGB image, through ``reader``'s per-process slide handles."""
    key = f"slide:{locator.slide}"
    slide = reader._handle(key, lambda: open_slide(path))
    if locator.level >= slide.level_count:
        raise BadInput(f"{locator}: the slide has no level {locator.level}")
    try:
        region = slide.read_region((locator.x, locator.y), locator.level, (locator.size, locator.size))
    except OpenSlideError as exc:
        # An OpenSlide handle is unusable after an error: reopen on the next read.
        reader._drop_handle(key)
        raise BadInput(f"{locator}: OpenSlide cannot read this tile ({exc})") from None
    tile = _on_white(region)
    size = reader.settings.tile_size
    if tile.size != (size, size):
        tile = tile.resize((size, size), Image.Resampling.BICUBIC)
    return tile


class SlideReader(Reader):
    """One whole-slide file given directly as the input."""

    kind = "slide"

    def scan(self) -> Iterator[TileEntry | Skipped]:
        yield from slide_tiles(self.root, self.root.name, self.settings)

    def read(self, locator: str) -> Image.Image:
        parsed = parse_locator(locator)
        if parsed is None or parsed.slide != self.root.name:
            raise BadInput(f"{self.root.name}: {locator!r} is not a tile of this slide")
        return read_slide_tile(self, self.root, parsed)
