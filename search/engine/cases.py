"""Case grouping: the nearest tiles to a query, grouped by case and slide and ranked by case."""

from __future__ import annotations

import numpy as np

MAX_PER_CASE = 50


def group_cases(hits: list[dict], *, per_case: int, k: int, cutoff: float | None = None) -> dict:
    """The ``k`` best cases among ``hits`` (tile hits, best first), with their slides and best tiles.

    A case's score is the mean of its best ``per_case`` tile scores. When the search stopped before it
    ran out of tiles, ``cutoff`` is the lowest score it retrieved, and a case with fewer hits has its
    missing ones counted at it: no tile left out can score higher, so a single lucky tile does not
    outrank a case with several good ones. Hits without a case are counted as ``unassigned``.
    """
    groups: dict[str, list[dict]] = {}
    unassigned = 0
    for hit in hits:
        if not hit["case"]:
            unassigned += 1
            continue
        groups.setdefault(hit["case"], []).append(hit)
    ranked = []
    for case_key, members in groups.items():
        best = [r["score"] for r in members[:per_case]]
        if cutoff is not None:
            best += [cutoff] * (per_case - len(best))
        ranked.append((float(np.mean(best)), members[0]["score"], case_key, members))
    ranked.sort(key=lambda c: (-c[0], -c[1], c[2]))
    results = []
    for rank, (score, best_score, case_key, members) in enumerate(ranked[:k], start=1):
        slides: dict[str | None, list[dict]] = {}
        for r in members:
            slides.setdefault(r["slide"], []).append(r)
        results.append(
            {
                "case": case_key,
                "rank": rank,
                "score": score,
                "best_score": best_score,
                "hits": len(members),
                "tiles": members[:per_case],
                "slides": [
                    {"slide": slide, "hits": len(rs), "best_score": rs[0]["score"], "tiles": rs[:per_case]}
                    for slide, rs in slides.items()
                ],
            }
        )
    return {"unassigned": unassigned, "total": len(groups), "results": results}
