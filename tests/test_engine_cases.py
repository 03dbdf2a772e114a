"""Case grouping as a pure function over ranked tile hits (no index, no model)."""

from __future__ import annotations

import pytest

from search.engine.cases import group_cases


def _hit(tile_id: int, score: float, case: str | None, slide: str | None = None) -> dict:
    return {"tile_id": tile_id, "score": score, "case": case, "slide": slide}


HITS = [
    _hit(1, 0.95, "A", "A-1"),  # one lucky tile
    _hit(2, 0.90, "B", "B-1"),
    _hit(3, 0.89, "B", "B-2"),
    _hit(4, 0.88, None),
    _hit(5, 0.87, "B", "B-1"),
    _hit(6, 0.50, "C", "C-1"),
]


def test_cases_are_ranked_by_the_mean_of_their_best_tiles():
    grouped = group_cases(HITS, per_case=2, k=10)
    assert [c["case"] for c in grouped["results"]] == ["A", "B", "C"]
    a, b, c = grouped["results"]
    assert a["score"] == pytest.approx(0.95) and b["score"] == pytest.approx((0.90 + 0.89) / 2)
    assert [c["rank"] for c in grouped["results"]] == [1, 2, 3]
    assert b["hits"] == 3 and b["best_score"] == 0.90
    assert [t["tile_id"] for t in b["tiles"]] == [2, 3]
    assert [(s["slide"], s["hits"], [t["tile_id"] for t in s["tiles"]]) for s in b["slides"]] == [
        ("B-1", 2, [2, 5]),
        ("B-2", 1, [3]),
    ]
    assert (grouped["total"], grouped["unassigned"]) == (3, 1)


def test_a_truncated_search_counts_missing_tiles_at_the_cutoff():
    grouped = group_cases(HITS, per_case=3, k=2, cutoff=0.50)
    # A: (0.95 + 0.50 + 0.50) / 3 = 0.65 falls below B's three good tiles.
    assert [c["case"] for c in grouped["results"]] == ["B", "A"]
    assert grouped["results"][1]["score"] == pytest.approx((0.95 + 0.5 + 0.5) / 3)
    assert grouped["total"] == 3  # all cases counted, k only limits the list


def test_ties_break_by_best_tile_then_case_name():
    hits = [_hit(1, 0.9, "Z"), _hit(2, 0.8, "Y"), _hit(3, 0.8, "X"), _hit(4, 0.9, "W"), _hit(5, 0.7, "W")]
    assert [c["case"] for c in group_cases(hits, per_case=1, k=5)["results"]] == ["W", "Z", "X", "Y"]


def test_no_hits_no_cases():
    assert group_cases([], per_case=3, k=5) == {"unassigned": 0, "total": 0, "results": []}
