"""Spread across cases: a result page that is not ten neighbouring tiles of one slide.

Hits arrive best first. A hit on the tile grid next to (at most one grid step from, diagonals
included) a hit already kept of the same slide and level joins that hit's result, which then counts
it (``merged``); a slide contributes at most ``max_per_slide`` results, the rest are counted as
``hidden``. ``max_per_slide=0`` turns spreading off: every hit is its own result. "Exclude this
case" drops every hit of the query tile's case (or slide, for a
tile with no case), so a pathologist looking for other patients does not get the same one back.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Spread:
    results: list[dict] = field(default_factory=list)
    hidden: int = 0
    merged: int = 0
    excluded: int = 0


def _adjacent(a: dict, b: dict, step: tuple[int, int]) -> bool:
    if a["level"] != b["level"] or None in (a["x"], a["y"], b["x"], b["y"]):
        return False
    sx, sy = step
    return abs(a["x"] - b["x"]) <= sx and abs(a["y"] - b["y"]) <= sy and (sx or sy) > 0


def spread(
    hits: list[dict],
    *,
    max_per_slide: int,
    steps: dict[tuple[str, int | None], tuple[int, int]],
    exclude_case: str | None = None,
    exclude_slide: str | None = None,
) -> Spread:
    """``hits`` (best first) merged, capped per slide and with the excluded case left out."""
    out = Spread()
    per_slide: dict[str, list[dict]] = {}
    for hit in hits:
        if (exclude_case and hit["case"] == exclude_case) or (exclude_slide and hit["slide"] == exclude_slide):
            out.excluded += 1
            continue
        slide = hit["slide"]
        if slide is None or not max_per_slide:
            out.results.append({**hit, "merged": 1, "merged_ids": [hit["tile_id"]]})
            continue
        kept = per_slide.setdefault(slide, [])
        step = steps.get((slide, hit["level"]), (0, 0))
        group = next((r for r in kept if any(_adjacent(hit, m, step) for m in r["_members"])), None)
        if group is not None:
            group["_members"].append(hit)
            group["merged"] += 1
            group["merged_ids"].append(hit["tile_id"])
            out.merged += 1
            continue
        if max_per_slide and len(kept) >= max_per_slide:
            out.hidden += 1
            continue
        result = {**hit, "merged": 1, "merged_ids": [hit["tile_id"]], "_members": [hit]}
        kept.append(result)
        out.results.append(result)
    for result in out.results:
        result.pop("_members", None)
    return out
