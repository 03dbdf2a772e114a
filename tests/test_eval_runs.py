"""Evaluation runs on real SQLite: kept, listed newest first without per-class detail, read back whole."""

from __future__ import annotations

import pytest

from search.core.errors import NotFound
from search.storage.store import Store
from tests.store_fixture import random_vectors, tile_row


def _run(name: str, value: float, build_id: int | None = None) -> dict:
    return {
        "kind": "tiles",
        "dataset": {"name": name, "path": f"/sets/{name}.csv", "hash": f"hash-{name}", "size": 3},
        "model_fingerprint": "conch_tiny-abc",
        "build_id": build_id,
        "settings": {"mode": "exact", "k": 10},
        "report": {
            "n_queries": 3,
            "metrics": {"Acc@1": {"value": value, "low": 0.0, "high": 1.0}},
            "per_class": [{"label": "a", "n": 3}],
        },
    }


def test_runs_round_trip_newest_first(db: Store) -> None:
    build = db.add_build("conch_tiny-abc", "flat", 3, "", "cpu")
    first = db.add_eval_run(_run("crc", 0.5, build))
    second = db.add_eval_run(_run("unito", 0.75))
    listed = db.eval_runs()
    assert [r["id"] for r in listed] == [second, first]
    assert listed[1]["dataset"] == {"name": "crc", "hash": "hash-crc", "path": "/sets/crc.csv", "size": 3}
    assert listed[1]["build_id"] == build and listed[1]["settings"] == {"mode": "exact", "k": 10}
    assert "per_class" not in listed[0]["report"] and listed[0]["report"]["metrics"]["Acc@1"]["value"] == 0.75
    assert db.eval_runs(limit=1)[0]["id"] == second
    full = db.get_eval_run(first)
    assert full["report"]["per_class"] == [{"label": "a", "n": 3}] and full["created_at"].endswith("+00:00")
    with pytest.raises(NotFound, match="no evaluation run with id 99"):
        db.get_eval_run(99)


def test_tile_ids_by_content_hash_picks_the_lowest_id(db: Store, src: int) -> None:
    ids = db.add_tiles(
        [tile_row(src, "a"), tile_row(src, "b", content_hash="h-a"), tile_row(src, "c")], random_vectors(3), "m"
    )
    assert db.tile_ids_by_content_hash(["h-a", "h-c", "h-missing"]) == {"h-a": ids[0], "h-c": ids[2]}
