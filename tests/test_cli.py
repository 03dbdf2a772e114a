"""The indexing and query commands as a user runs them, and a live server following a reindex."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from indexer.indexer import Indexer
from indexer.texts import builtin_vocabulary
from search.cli import build_parser, main
from search.engine.engine import Engine
from search.storage.word_vectors import WordVectors
from tests.archives import files_under, make_hostile_zip, make_tiles, make_zip


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
    lines = [line for line in capsys.readouterr().out.splitlines() if line.lstrip()[:1].isdigit()]
    assert len(lines) == 1 and "case=PATIENT-7" in lines[0]

    tiles[1].unlink()
    assert cli("reindex", "--quiet", "--workers", "0") == 0
    assert "1 removed" in capsys.readouterr().out
    assert cli("status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["counts"]["tiles"] == 5 and status["index"]["size"] == 5
    assert cli("reindex", "--retrain", "--quiet", "--workers", "0") == 0
    assert "index: build 3, flat, 5 vectors" in capsys.readouterr().out  # nothing changed, yet a new build

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


def test_index_texts_runs_as_a_job(cli, tiny_settings, tiny_encoder, tmp_path, capsys):
    terms = tmp_path / "terms.txt"
    terms.write_text("tumour necrosis\nfat\n")
    assert cli("index-texts", str(terms), "--corpus", "mine", "--quiet") == 0
    assert capsys.readouterr().out.strip() == "added 2 texts"
    assert cli("status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    job = status["last_job"]
    assert (job["kind"], job["status"], job["message"]) == ("index-texts", "done", "2 texts added")
    assert job["args"] == {"files": [str(terms)], "corpus": "mine"}
    assert status["running_job"] is None
    assert status["counts"]["texts"] == len(builtin_vocabulary()) + 2
    # The corpus's words are embedded ahead of queries, beside the built-in vocabulary's.
    words = WordVectors(tiny_settings.data_dir, tiny_encoder.fingerprint).load()
    assert {"tumour", "necrosis", "fat", "cribriform"} <= set(words)

    bad = tmp_path / "terms.doc"
    bad.write_text("x")
    assert cli("index-texts", str(bad)) == 2
    assert "terms.doc" in capsys.readouterr().err
    assert cli("status") == 0
    assert f"last run: index-texts job {job['id'] + 1} failed" in capsys.readouterr().out


def test_the_cli_loads_no_lower_layer_until_a_command_needs_it():
    code = (
        "import sys; from search.cli import build_parser; build_parser().parse_args(['status']); "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'search', 'indexer', 'webui', 'migrations', 'torch', 'numpy', 'PIL', 'faiss', 'sqlalchemy', 'fastapi'})))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [
        "search",
        "search.cli",
        "search.cli.admin",
        "search.cli.evaluation",
        "search.cli.index",
        "search.cli.inputs",
        "search.cli.model",
        "search.cli.options",
        "search.cli.query",
        "search.cli.results",
        "search.cli.slides",
        "search.core",
        "search.core.errors",
        "search.core.settings",
    ]


def test_status_names_the_archive_of_a_refused_member_once(cli, tmp_path, capsys):
    make_hostile_zip(tmp_path / "hostile.zip")
    assert cli("index", str(tmp_path / "hostile.zip"), "--quiet", "--workers", "0") == 0
    capsys.readouterr()
    assert cli("status") == 0
    out = capsys.readouterr().out
    archive = (tmp_path / "hostile.zip").resolve()
    assert f"  {archive}:../evil.png: member path with '..' refused\n" in out
    assert "1 tiles" in out and "errors" in out


def test_a_manifest_keyed_by_slide_id_says_so(cli, tmp_path, capsys):
    make_tiles(tmp_path / "tiles", 3)
    make_zip(tmp_path / "tiles.zip", files_under(tmp_path / "tiles"))
    manifest = tmp_path / "slides.csv"
    manifest.write_text("slide_id,case_id,organ\nslide0,P7,breast\n")
    assert cli("index", str(tmp_path / "tiles.zip"), "--manifest", str(manifest), "--quiet", "--workers", "0") == 0
    assert f"manifest {manifest}: 1 rows keyed by 'slide_id'" in capsys.readouterr().out
    assert cli("query", "glands", "-k", "5", "--case", "P7", "--json") == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert {h["path"] for h in hits} == {"case0/slide0/tile_000.jpg"} and hits[0]["meta"] == {"organ": "breast"}


def test_a_text_file_given_to_index_is_an_error(cli, tmp_path, capsys):
    (tmp_path / "x.txt").write_text("not tiles")
    assert cli("index", str(tmp_path / "x.txt"), "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("histosearch: error: ") and "x.txt: no tiles (x.txt: not" not in err
    assert f"{(tmp_path / 'x.txt').resolve()}: no tiles (not an input histosearch reads" in err
    assert len(err.splitlines()) == 1


REFUSED = textwrap.dedent(
    """
    import sys
    from filelock import FileLock
    from search.cli import main

    held = FileLock(sys.argv[1] + "/indexer.lock")
    held.acquire()
    code = main(["--data-dir", sys.argv[1], "index", sys.argv[2], "--quiet"])
    print(code, "torch" in sys.modules)
    """
)


def test_a_refused_second_indexer_stops_before_importing_torch(tmp_path):
    (tmp_path / "data").mkdir()
    make_tiles(tmp_path / "tiles", 1)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run(
        [sys.executable, "-c", REFUSED, str(tmp_path / "data"), str(tmp_path / "tiles")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "another indexer is running" in done.stderr


def test_a_bare_ray_option_means_the_cluster_this_machine_joined():
    assert build_parser().parse_args(["index", "p", "--ray"]).ray_address == "auto"
    assert build_parser().parse_args(["index", "p"]).ray_address is None


def test_a_database_url_that_is_not_sqlite_or_postgres_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("HISTOSEARCH_DATABASE_URL", "mysql://db/histosearch")
    assert main(["status"]) == 2
    assert "database_url" in capsys.readouterr().err


def test_backup_of_a_postgres_database_points_to_pg_dump(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HISTOSEARCH_DATABASE_URL", "postgresql+psycopg://histosearch@127.0.0.1:1/histosearch")
    assert main(["--data-dir", str(tmp_path), "backup", str(tmp_path / "copy.db")]) == 2
    assert "pg_dump" in capsys.readouterr().err and not (tmp_path / "copy.db").exists()


def test_result_commands_cases_describe_and_the_query_log(cli, tmp_path, capsys):
    tiles = make_tiles(tmp_path / "tiles", 6)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,magnification\ncase0,20\n")
    assert cli("index", str(tmp_path / "tiles"), "--manifest", str(manifest), "--quiet", "--workers", "0") == 0
    capsys.readouterr()
    assert cli("status") == 0
    out = capsys.readouterr().out
    assert "index recall@10 vs exact: 1.000" in out
    assert "index nprobe" not in out  # an exact index probes no lists

    assert cli("query", "--image", str(tiles[0]), "-k", "6", "--max-per-slide", "0", "--json") == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert hits[0]["mpp"] == 0.5 and hits[0]["why"]  # the manifest's magnification, the vocabulary's terms
    first = hits[0]
    # make_tiles repeats slide names across its two case folders, so every slide lands in case0.
    assert {h["case"] for h in hits} == {"case0"}
    assert cli("query", "--tile", str(first["tile_id"]), "--max-per-slide", "0", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 5
    assert cli("query", "--tile", str(first["tile_id"]), "--exclude-case", "--json") == 0
    assert json.loads(capsys.readouterr().out)["results"] == []
    assert cli("query", "DCIS", "--plus", "necrosis", "--minus", "fat", "--weight", "0.4", "--json") == 0
    query = json.loads(capsys.readouterr().out)["query"]
    assert query["searched"] == "ductal carcinoma in situ" and query["plus"] == ["necrosis"] and query["weight"] == 0.4
    assert cli("query", "--image", str(tiles[1]), "--tta", "--magnification", "5", "--same-scale", "--json") == 0
    answer = json.loads(capsys.readouterr().out)
    # Tiles the manifest gave 0.5 um/px are 4x off the query's 2 um/px and left out; those of unknown scale stay.
    assert answer["query"]["tta"] is True and answer["results"]
    assert all(h["mpp"] is None and h["scale_mismatch"] is None for h in answer["results"])

    assert cli("cases", "--image", str(tiles[0]), "-k", "5") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].lstrip().startswith("1 ") and "case" in out
    assert cli("describe", "--image", str(tiles[0]), "-k", "3") == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert cli("describe", "--tile", str(first["tile_id"]), "-k", "2", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 2
    assert cli("describe") == 2
    assert "--image FILE" in capsys.readouterr().err

    assert cli("queries", "--json") == 0
    log = json.loads(capsys.readouterr().out)
    kinds = [e["kind"] for e in log["entries"]]
    assert kinds == ["image", "text", "tile", "tile", "image"] and log["entries"][1]["text"] == "DCIS"
    assert all(e["image_hash"] is None or len(e["image_hash"]) == 20 for e in log["entries"])
    assert cli("queries") == 0
    assert "DCIS" in capsys.readouterr().out


def test_status_shows_the_nprobe_an_ivf_build_was_tuned_to(cli, tmp_path, capsys):
    make_tiles(tmp_path / "tiles", 6)
    assert cli("index", str(tmp_path / "tiles"), "--index-type", "ivf", "--quiet", "--workers", "0") == 0
    capsys.readouterr()
    assert cli("status") == 0
    assert "index nprobe: 1 of 1 lists, the fewest reaching recall@10 0.98" in capsys.readouterr().out
