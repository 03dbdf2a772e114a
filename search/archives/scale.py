"""Tile scale: um per pixel, and the objective magnification a pathologist states instead."""

from __future__ import annotations

import math

# um/px at 1x: a 40x scan is about 0.25 um/px, a 20x one 0.5 (the usual scanner convention).
MPP_AT_1X = 10.0


def positive_number(value: str | float) -> float | None:
    """``value`` ("20", "20x", 0.5) as a positive finite float, else None."""
    try:
        number = float(str(value).strip().lower().removesuffix("x"))
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def magnification_mpp(magnification: float) -> float:
    """um/px of a scan at ``magnification`` (objective power)."""
    return MPP_AT_1X / magnification
