"""Rotation and flip test-time augmentation: tissue has no up, so an image query may be averaged over
the eight symmetries of the square (four rotations, each also mirrored), embedded in one batch."""

from __future__ import annotations

import numpy as np


def dihedral_views(pixels: np.ndarray) -> np.ndarray:
    """The eight rotations/flips ``[8, S, S, 3]`` of one square uint8 tile ``[S, S, 3]``.

    Pixels are only permuted (no resampling), so the views of a rotated or mirrored tile are the same
    eight arrays in another order, and their mean embedding is the same."""
    rotations = [np.rot90(pixels, r, axes=(0, 1)) for r in range(4)]
    return np.ascontiguousarray(np.stack(rotations + [r[:, ::-1] for r in rotations]))
