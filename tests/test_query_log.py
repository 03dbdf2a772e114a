"""The query log table: append, read back newest first, bounded."""

from __future__ import annotations

from search.storage import query_log
from search.storage.store import Store


def _log(db: Store, n: int) -> None:
    db.log_query(kind="text", text=f"q{n}", image_hash=None, tile_id=None, filters={"case": "C1"}, options={},
                 model_fingerprint="m", build_id=1, results=n, duration_ms=1.5)  # fmt: skip


def test_entries_read_back_newest_first(db: Store) -> None:
    for n in range(3):
        _log(db, n)
    log = db.query_log(limit=2)
    assert log["total"] == 3 and [e["text"] for e in log["entries"]] == ["q2", "q1"]
    assert log["entries"][0]["filters"] == {"case": "C1"} and log["entries"][0]["at"].endswith("+00:00")
    assert [e["text"] for e in db.query_log(limit=5, offset=2)["entries"]] == ["q0"]


def test_the_log_keeps_only_the_newest_entries(db: Store, monkeypatch) -> None:
    monkeypatch.setattr(query_log, "QUERY_LOG_MAX", 4)
    monkeypatch.setattr(query_log, "TRIM_EVERY", 5)
    for n in range(10):
        _log(db, n)
    # Trimmed at entries 5 and 10: each time down to the newest QUERY_LOG_MAX.
    assert [e["text"] for e in db.query_log()["entries"]] == ["q9", "q8", "q7", "q6"]
