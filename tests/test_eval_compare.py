"""Runs as text and side by side: what `histosearch eval` prints."""

from __future__ import annotations

from search.evaluation.compare import compare_runs, format_comparison, format_run


def _run(run_id: int, acc: tuple[float, float, float], **changes) -> dict:
    run = {
        "id": run_id,
        "created_at": "2026-12-02T10:00:00+00:00",
        "kind": "tiles",
        "dataset": {"name": "crc", "hash": "h1"},
        "model_fingerprint": "conch-a",
        "settings": {"mode": "index", "index_type": "ivf", "nprobe": 16, "tta": None, "filters": {}},
        "report": {
            "n_queries": 10,
            "no_match": 2,
            "metrics": {"Acc@1": dict(zip(("value", "low", "high"), acc, strict=True)), "mAP@10": {"value": 0.4}},
            "per_class": [{"label": "TUM", "n": 10, "Acc@1": {"value": acc[0]}}],
        },
    }
    for key, value in changes.items():
        run[key] = value
    return run


def test_format_run_has_intervals_per_class_and_no_match():
    text = format_run(_run(3, (0.8, 0.7, 0.9)))
    lines = text.splitlines()
    assert lines[0] == "tiles on crc: 10 queries, index ivf nprobe=16 (run 3)"
    assert "2 queries have no same-label item outside their own case" in text
    assert "  Acc@1   0.800 [0.700, 0.900]" in lines and "  mAP@10  0.400" in lines
    assert lines[-2].split() == ["class", "n", "Acc@1"] and lines[-1].split() == ["TUM", "10", "0.800"]


def test_compare_reports_difference_overlap_and_what_changed():
    a = _run(1, (0.8, 0.7, 0.9))
    b = _run(2, (0.95, 0.92, 0.97), settings={**a["settings"], "index_type": "flat", "nprobe": None})
    comparison = compare_runs(a, b)
    assert comparison["warnings"] == [] and comparison["changed"] == ["index_type", "nprobe"]
    acc = comparison["metrics"][0]
    assert acc["metric"] == "Acc@1" and round(acc["diff"], 3) == 0.15 and acc["overlap"] is False
    assert comparison["metrics"][1]["overlap"] is True  # no interval: equal values overlap
    text = format_comparison(comparison, a, b)
    assert "B: run 2 2026-12-02T10:00:00+00:00 index flat" in text and "+0.150  apart" in text

    other = _run(4, (0.8, 0.7, 0.9), kind="zeroshot", dataset={"name": "unito", "hash": "h2"}, model_fingerprint="m2")
    comparison = compare_runs(a, other)
    assert comparison["warnings"] == [
        "different evaluations: tiles and zeroshot",
        "different datasets: crc and unito (content hashes differ)",
    ]
    assert comparison["changed"] == ["model"]
    assert format_comparison(comparison, a, other).startswith("warning: different evaluations")
