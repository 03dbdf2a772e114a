"""Composed queries: an image or tile plus positive and negative texts, combined in the embedding space.

``normalize(base + weight * sum(plus) - weight * sum(minus))``: "this patch + necrosis - inflammation"
moves the query towards the texts to add and away from those to remove. The vectors are unit length, so
a weight of 0.5 moves the query noticeably while the image still dominates.
"""

from __future__ import annotations

import numpy as np

from search.core.errors import BadQuery

DEFAULT_WEIGHT = 0.5
MAX_WEIGHT = 10.0
MAX_TEXTS = 8


def compose(base: np.ndarray, plus: list[np.ndarray], minus: list[np.ndarray], weight: float) -> np.ndarray:
    """The unit vector ``base + weight * (sum(plus) - sum(minus))``."""
    if not 0 < weight <= MAX_WEIGHT:
        raise BadQuery(f"weight must be above 0 and at most {MAX_WEIGHT}, got {weight}")
    if len(plus) + len(minus) > MAX_TEXTS:
        raise BadQuery(f"at most {MAX_TEXTS} texts to add or remove, got {len(plus) + len(minus)}")
    vector = np.asarray(base, dtype=np.float32).copy()
    for v in plus:
        vector += weight * v
    for v in minus:
        vector -= weight * v
    norm = float(np.linalg.norm(vector))
    if norm < 1e-6:
        raise BadQuery("the texts cancel the query out: use a smaller weight or fewer texts")
    return (vector / norm).astype(np.float32)
