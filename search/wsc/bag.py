"""One WSC input bag per slide: 224 x 224 RGB crops at a fixed um/px, float in [0, 1], capped by seeded sampling.

WSC takes tiles without mean/std normalisation. The scale is the ``wsc_mpp`` setting (0.5 um/px assumed: the
WSC paper's methods section could not be read when this was written, so the training scale is not confirmed).
An indexed tile of ``tile_size`` px at ``tile_mpp`` covers ``tile_size * tile_mpp`` um; it is resized to
``wsc_mpp`` and cut into whole 224 px crops (a tile smaller than one crop is resized up to one crop). Slides
with more crops than ``max_tiles`` keep a seeded random sample, so the same slide gives the same vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CROP = 224


@dataclass(frozen=True)
class BagParams:
    mpp: float = 0.5
    max_tiles: int = 512
    seed: int = 0

    def describe(self) -> str:
        return f"mpp={self.mpp:g},max={self.max_tiles},seed={self.seed}"


def crops_per_side(tile_px: int, tile_mpp: float | None, mpp: float) -> int:
    scaled = tile_px * (tile_mpp / mpp) if tile_mpp else tile_px
    return max(1, int(scaled // CROP))


def sample_crops(counts: Sequence[int], params: BagParams) -> list[tuple[int, int]]:
    """(tile index, crop index) pairs of the bag: all crops, or a seeded sample of ``max_tiles`` in order."""
    pairs = [(tile, crop) for tile, n in enumerate(counts) for crop in range(n * n)]
    if len(pairs) <= params.max_tiles:
        return pairs
    keep = np.random.default_rng(params.seed).choice(len(pairs), size=params.max_tiles, replace=False)
    return [pairs[i] for i in sorted(keep)]


def crop(image: Image.Image, per_side: int, index: int) -> np.ndarray:
    """Crop ``index`` (row-major) of ``image`` resized to ``per_side`` whole crops a side: (224, 224, 3) uint8."""
    side = per_side * CROP
    if image.size != (side, side):
        image = image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    row, col = divmod(index, per_side)
    box = (col * CROP, row * CROP, (col + 1) * CROP, (row + 1) * CROP)
    return np.asarray(image.convert("RGB").crop(box), dtype=np.uint8)


def bag_from_tiles(tiles: Sequence[Image.Image], tile_mpp: Sequence[float | None], params: BagParams
                   ) -> tuple[torch.Tensor, np.ndarray]:  # fmt: skip
    """The bag tensor (n, 3, 224, 224) in [0, 1] and, per crop, the index of the tile it came from."""
    if not tiles:
        raise ValueError("a slide without tiles has no bag")
    per_side = [crops_per_side(max(t.size), m, params.mpp) for t, m in zip(tiles, tile_mpp, strict=True)]
    plan = sample_crops(per_side, params)
    arrays = np.stack([crop(tiles[t], per_side[t], c) for t, c in plan])
    bag = torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255.0)
    return bag.contiguous(), np.array([t for t, _ in plan], dtype=np.int64)


def attention_per_tile(crop_attention: torch.Tensor, source: np.ndarray, n_tiles: int) -> np.ndarray:
    """Crop attention summed back onto the tiles the crops came from (tiles left out of the bag get 0)."""
    out = np.zeros(n_tiles, dtype=np.float32)
    np.add.at(out, source, crop_attention.numpy().astype(np.float32))
    return out
