"""The indexing and query commands as a user runs them, and a live server following a reindex."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from indexer.indexer import Indexer
from search.cli import main
from search.engine.engine import Engine
from tests.archives import make_tiles


@pytest.fixture
def cli(tiny_settings, tiny_model_args, monkeypatch):
    """Runs `histosearch ...` in process against tiny_settings' data dir and model."""
    monkeypatch.setenv("HISTOSEARCH_DATA_DIR", str(tiny_settings.data_dir))
    monkeypatch.setenv("HISTOSEARCH_CACHE_DIR", str(tiny_settings.cache_dir))
    monkeypatch.setenv("HISTOSEARCH_TILE_SIZE", "64")

    def run(*args: str) -> int:
        return main([*args, *tiny_model_args])

    return run


def test_index_status_query_and_reindex(cli, tmp_path, capsys):
    tiles = make_tiles(tmp_path / "tiles", 6)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,case_id,organ\ncase0/slide0/tile_000.jpg,PATIENT-7,breast\n")
    assert cli("index", str(tmp_path / "tiles"), "--manifest", str(manifest), "--quiet", "--workers", "0") == 0
    out = capsys.readouterr().out
    assert "6 new" in out and "index: build 1, flat, 6 vectors" in out

    assert cli("status") == 0
    out = capsys.readouterr().out
    assert "tiles: 6 in 1 sources" in out and "index: flat, 6 vectors" in out and "last run: index job 1 done" in out

    assert cli("query", "--image", str(tiles[0]), "-k", "3", "--json") == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert hits[0]["path"] == "case0/slide0/tile_000.jpg" and hits[0]["case"] == "PATIENT-7"
    assert hits[0]["meta"] == {"organ": "breast"}

    assert cli("query", "cribriform glands", "-k", "2", "--meta", "organ=breast") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "case=PATIENT-7" in lines[0]

    tiles[1].unlink()
    assert cli("reindex", "--quiet", "--workers", "0") == 0
    assert "1 removed" in capsys.readouterr().out
    assert cli("status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["counts"]["tiles"] == 5 and status["index"]["size"] == 5

    assert cli("remove", str(tmp_path / "tiles")) == 0
    assert "removed with its 5 tiles" in capsys.readouterr().out
    assert cli("remove", str(tmp_path / "tiles")) == 2
    assert "not an indexed source" in capsys.readouterr().err


def test_query_errors_are_clear(cli, tmp_path, capsys):
    assert cli("query", "necrosis") == 2
    assert "histosearch index" in capsys.readouterr().err
    assert cli("query", "x", "--image", str(tmp_path / "a.png")) == 2
    assert "not both" in capsys.readouterr().err
    assert cli("index", str(tmp_path / "nothing-here"), "--quiet") == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert cli("query", "x", "--meta", "organ") == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_a_running_engine_follows_a_reindex_without_restart(tiny_settings, tiny_encoder, tmp_path):
    root = tmp_path / "tiles"
    make_tiles(root, 4)
    Indexer(tiny_settings, encoder=tiny_encoder).run([root])
    engine = Engine(tiny_settings, encoder=tiny_encoder)
    try:
        assert engine.search_text("glands", k=10)["total"] == 4
        extra = make_tiles(tmp_path / "extra", 3, seed=5)
        for i, p in enumerate(extra):
            p.rename(root / f"extra_{i}{p.suffix}")
        Indexer(tiny_settings, encoder=tiny_encoder).run(kind="reindex")
        result = engine.search_image(Image.open(root / "extra_2.tif"), k=1)
        assert result["total"] == 7 and result["results"][0]["path"] == "extra_2.tif"
    finally:
        engine.close()
