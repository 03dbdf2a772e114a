"""The evaluation pages and their JSON twins, and recent runs on the status page."""

from __future__ import annotations

from fastapi.testclient import TestClient

from search.core.settings import load_settings
from search.storage.store import Store
from webui.app import create_app

HOSTILE = "<script>alert(1)</script>"


def _f(value: float, low: float = 0.0, high: float = 1.0) -> dict:
    return {"value": value, "low": low, "high": high}


def _run(value: float) -> dict:
    return {
        "kind": "tiles",
        "dataset": {"name": "crc", "path": "/sets/crc.csv", "hash": "f" * 64, "size": 5},
        "model_fingerprint": "conch_tiny-abc",
        "build_id": None,
        "settings": {"mode": "index", "index_type": "ivf", "nprobe": 16, "k": 10},
        "report": {
            "n_queries": 5,
            "metrics": {"Acc@1": _f(value, 0.5, 0.9), "mMV@5": _f(0.6, 0.4, 0.8)},
            "per_class": [
                {"label": "TUM", "n": 3, "Acc@1": _f(1.0, 1.0), "mMV@5": _f(0.5)},
                {"label": HOSTILE, "n": 2, "Acc@1": _f(0.5), "mMV@5": _f(0.25)},
            ],
            "confusion": {"predicted_by": "mMV@5", "labels": ["TUM", HOSTILE], "matrix": [[2, 1, 0], [1, 0, 1]]},
        },
    }


def test_eval_pages_json_twins_and_status(tmp_path):
    settings = load_settings(data_dir=tmp_path)
    store = Store(settings.db_url)
    empty = TestClient(create_app(settings), base_url="http://localhost")
    assert "No runs yet" in empty.get("/eval").text
    assert empty.get("/api/eval/runs").json() == []
    missing = empty.get("/api/eval/runs/1")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"

    first = store.add_eval_run(_run(0.7))
    second = store.add_eval_run(_run(0.8))
    client = TestClient(create_app(settings), base_url="http://localhost")
    listing = client.get("/eval").text
    assert f'href="/eval/{second}"' in listing and "Acc@1 0.800" in listing and "ivf nprobe 16" in listing
    latest = client.get("/api/eval/runs", params={"limit": 1}).json()
    assert [(r["id"], r["url"], r["json_url"]) for r in latest] == [
        (second, f"/eval/{second}", f"/api/eval/runs/{second}")
    ]

    page = client.get(f"/eval/{first}")
    assert page.status_code == 200
    html = page.text
    # Two pictures: bars for the first per-class metric and the confusion matrix, both inline SVG.
    assert html.count("<svg") == 2
    assert html.count('class="class-bar"') == 2 and html.count('class="confusion-cell"') == 6
    assert "none" in html  # a query without a prediction gets its own column
    assert HOSTILE not in html and "&lt;script&gt;" in html
    assert 'href="/eval/1?metric=mMV%405"' in html
    chosen = client.get(f"/eval/{first}", params={"metric": "mMV@5"}).text
    assert "Per class: mMV@5" in chosen and 'width="80.0"' in chosen  # 0.25 of a 320 px bar
    assert client.get(f"/api/eval/runs/{first}").json()["report"]["per_class"][1]["label"] == HOSTILE

    status = client.get("/api/status").json()
    assert [r["id"] for r in status["eval_runs"]] == [second, first]
    assert f'href="/eval/{second}"' in client.get("/status").text
    store.close()
