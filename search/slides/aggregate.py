"""Built-in slide vectors: one vector per slide from its CONCH tile vectors, always available.

``mean``: the mean of the L2-normalised tile vectors, normalised. ``medoid``: a robust variant for slides
with artefacts or mixed tissue: the mean of the half of the tiles nearest (cosine) to the slide's medoid
tile, normalised. The medoid is the tile with the largest summed cosine similarity to all tiles,
``argmax_i x_i . sum_j x_j``, found in O(n d) without the n x n matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

MEDOID_FRACTION = 0.5


def _unit_rows(tiles: np.ndarray) -> np.ndarray:
    tiles = np.asarray(tiles, dtype=np.float32)
    if tiles.ndim != 2 or tiles.shape[0] == 0:
        raise ValueError(f"expected a non-empty (n, dim) array of tile vectors, got shape {tiles.shape}")
    norms = np.linalg.norm(tiles, axis=1, keepdims=True)
    return tiles / np.maximum(norms, 1e-12)


def _unit(vector: np.ndarray) -> np.ndarray:
    return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)


def mean_vector(tiles: np.ndarray) -> np.ndarray:
    return _unit(_unit_rows(tiles).mean(axis=0))


def medoid_index(tiles: np.ndarray) -> int:
    unit = _unit_rows(tiles)
    return int(np.argmax(unit @ unit.sum(axis=0)))


def medoid_vector(tiles: np.ndarray, fraction: float = MEDOID_FRACTION) -> np.ndarray:
    unit = _unit_rows(tiles)
    similarity = unit @ unit[medoid_index(unit)]
    keep = max(1, math.ceil(fraction * len(unit)))
    nearest = np.argsort(-similarity, kind="stable")[:keep]
    return _unit(unit[nearest].mean(axis=0))


METHODS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"mean": mean_vector, "medoid": medoid_vector}
DESCRIPTIONS = {
    "mean": "mean of the slide's CONCH tile vectors",
    "medoid": f"mean of the {MEDOID_FRACTION:.0%} of CONCH tiles nearest the slide's medoid tile",
    "wsc": "Whole Slide Concepts (WSC-MTL-tiny) slide vector",
}


def slide_vector(tiles: np.ndarray, method: str) -> np.ndarray:
    if method not in METHODS:
        raise ValueError(f"unknown slide-vector method {method!r} (built in: {', '.join(METHODS)})")
    return METHODS[method](tiles)
