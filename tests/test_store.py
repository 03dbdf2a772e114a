"""The store on real SQLite files: migrations, atomic writes, filters, neighbours, jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from search.core.errors import ConfigError, NotFound
from search.storage import store as store_module
from search.storage.store import Base, Store, TileState, alembic_config

ROOT = Path(__file__).resolve().parents[1]
TABLES = {
    "sources",
    "cases",
    "slides",
    "tiles",
    "embeddings",
    "texts",
    "text_embeddings",
    "builds",
    "jobs",
    "file_errors",
    "meta",
}
DIM = 8


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _row(source_id: int, locator: str, **extra: object) -> dict:
    return {
        "source_id": source_id,
        "locator": locator,
        "path": f"tiles/{locator}.png",
        "content_hash": f"h-{locator}",
        "fingerprint": f"f-{locator}",
        **extra,
    }


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Store]:
    store = Store(_url(tmp_path / "data" / "histosearch.db"))
    yield store
    store.close()


@pytest.fixture
def src(db: Store) -> int:
    return db.get_or_create_source("folder", "/archive/a")


# --- migrations ------------------------------------------------------------------------------


def test_migrations_build_schema_from_nothing_and_downgrade_to_base(tmp_path: Path) -> None:
    url = _url(tmp_path / "new" / "h.db")
    Store(url).close()
    engine = create_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
        head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head

        command.downgrade(alembic_config(url), "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}

        store = Store(url)
        assert store.counts()["tiles"] == 0
        store.close()
        assert set(inspect(engine).get_table_names()) == TABLES | {"alembic_version"}
    finally:
        engine.dispose()


def test_processes_opening_a_new_database_together_all_succeed(tmp_path: Path) -> None:
    url = _url(tmp_path / "h.db")
    code = "import sys; from search.storage.store import Store; print(Store(sys.argv[1]).counts()['tiles'])"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert [(p.returncode, out.strip()) for p, (out, _) in zip(procs, results, strict=True)] == [(0, b"0")] * 3, [
        err.decode()[-500:] for _, err in results
    ]


def test_second_open_runs_no_migration_and_keeps_data(tmp_path: Path, monkeypatch) -> None:
    url = _url(tmp_path / "h.db")
    first = Store(url)
    first.set_meta("model", "abc")
    first.close()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("upgrade ran on a database already at head")

    monkeypatch.setattr(store_module.command, "upgrade", refuse)
    second = Store(url)
    assert second.get_meta("model") == "abc"
    second.close()


def test_orm_metadata_matches_migrated_schema(db: Store) -> None:
    # A model change without a migration shows up here as a non-empty diff.
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    url = _url(tmp_path / "h.db")
    Store(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff_future'"))
    engine.dispose()
    with pytest.raises(ConfigError, match="ffff_future.*newer"):
        Store(url)


def test_in_memory_sqlite_is_refused() -> None:
    with pytest.raises(ConfigError, match="in-memory"):
        Store("sqlite://")


def test_connections_use_wal_foreign_keys_and_busy_timeout(db: Store) -> None:
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


def test_reader_is_not_blocked_by_an_open_write_transaction(db: Store, src: int) -> None:
    reader = Store(db.db_url)
    try:
        with db.session(write=True) as s:
            s.execute(text("INSERT INTO meta (key, value) VALUES ('k', 'v')"))
            started = time.monotonic()
            assert reader.get_meta("k") is None  # the uncommitted row is invisible, and no wait
            assert time.monotonic() - started < 5
        assert reader.get_meta("k") == "v"
    finally:
        reader.close()


def test_session_rolls_back_on_error(db: Store) -> None:
    with pytest.raises(RuntimeError), db.session(write=True) as s:
        s.execute(text("INSERT INTO meta (key, value) VALUES ('k', 'v')"))
        raise RuntimeError("boom")
    assert db.get_meta("k") is None


# --- sources, cases, slides --------------------------------------------------------------------


def test_sources_cases_and_slides(db: Store) -> None:
    a = db.get_or_create_source("folder", "/archive/a")
    assert db.get_or_create_source("folder", "/archive/a") == a
    b = db.get_or_create_source("zip", "/archive/b.zip")
    assert b != a
    assert db.get_or_create_source("tar", "/archive/b.zip") == b  # the kind follows the file

    db.add_tiles([_row(a, "t1"), _row(a, "t2")], _vectors(2), "m1")
    assert db.sources()[0]["last_scanned_at"] is None
    db.mark_scanned(a)
    listed = db.sources()
    assert [(s["id"], s["kind"], s["uri"], s["tiles"]) for s in listed] == [
        (a, "folder", "/archive/a", 2),
        (b, "tar", "/archive/b.zip", 0),
    ]
    assert listed[0]["last_scanned_at"].endswith("+00:00")
    assert listed[0]["added_at"].endswith("+00:00")

    case = db.upsert_case("C1", {"site": "lung"})
    assert db.upsert_case("C1") == case
    assert db.upsert_case("C1", {"site": "colon"}) == case
    slide = db.upsert_slide("S1", a, case, "C1/S1.svs", mpp=0.25, width=1000, height=800, meta={"stain": "HE"})
    assert db.upsert_slide("S1", a, None, "moved/S1.svs", mpp=0.5) == slide
    (tile_id,) = db.add_tiles([_row(a, "t3", slide_id=slide)], _vectors(1), "m1")
    (tile,) = db.get_tiles([tile_id])
    assert tile["slide_key"] == "S1" and tile["case_key"] is None  # the second upsert unlinked the case
    with db.session() as s:
        stored = s.get(store_module.Slide, slide)
        assert (stored.path, stored.mpp, stored.width, stored.meta) == ("moved/S1.svs", 0.5, None, {"stain": "HE"})
        assert s.get(store_module.Case, case).meta == {"site": "colon"}


# --- tiles and embeddings ----------------------------------------------------------------------


def test_add_tiles_then_read_them_back(db: Store, src: int) -> None:
    vectors = _vectors(3)
    ids = db.add_tiles(
        [_row(src, "a", level=0, x=0, y=0, meta={"stain": "HE"}), _row(src, "b"), _row(src, "c")],
        vectors,
        "m1",
    )
    assert ids == sorted(ids) and len(set(ids)) == 3

    states = db.tile_states(src)
    assert states["a"] == TileState(ids[0], "f-a", "h-a", "m1")
    assert set(states) == {"a", "b", "c"}

    got = db.get_embeddings([ids[2], ids[0]], "m1")
    assert got.dtype == np.float32 and got.flags.writeable
    np.testing.assert_array_equal(got, vectors[[2, 0]])

    tiles = db.get_tiles([ids[1], 999_999, ids[0]])
    assert [t["id"] for t in tiles] == [ids[1], ids[0]]
    assert tiles[1]["source"] == {"id": src, "kind": "folder", "uri": "/archive/a"}
    assert tiles[1]["meta"] == {"stain": "HE"} and tiles[0]["meta"] == {}
    assert tiles[1]["created_at"].endswith("+00:00")

    batches = list(db.iter_embeddings("m1", batch=2))
    assert [b[0].tolist() for b in batches] == [ids[:2], ids[2:]]
    assert batches[0][0].dtype == np.int64
    np.testing.assert_array_equal(np.vstack([b[1] for b in batches]), vectors)
    assert list(db.iter_embeddings("other")) == []


def test_vectors_are_stored_as_little_endian_float32(db: Store, src: int) -> None:
    vectors = _vectors(1).astype(">f8")  # any float input is stored as <f4
    (tile_id,) = db.add_tiles([_row(src, "a")], vectors, "m1")
    with db.session() as s:
        blob = s.get(store_module.Embedding, tile_id).vector
    np.testing.assert_array_equal(np.frombuffer(blob, dtype="<f4"), vectors[0].astype(np.float32))


def test_add_tiles_is_atomic(db: Store, src: int) -> None:
    db.add_tiles([_row(src, "a")], _vectors(1), "m1")
    before = db.counts()
    with pytest.raises(IntegrityError):
        db.add_tiles([_row(src, "b"), _row(src, "a")], _vectors(2), "m1")
    with pytest.raises(IntegrityError):
        db.add_tiles([_row(src, "c"), _row(src, "c")], _vectors(2), "m1")
    with pytest.raises(ValueError, match="shape"):
        db.add_tiles([_row(src, "d")], _vectors(2), "m1")
    with pytest.raises(ValueError, match="unknown keys.*colour"):
        db.add_tiles([_row(src, "e", colour="red")], _vectors(1), "m1")
    assert db.counts() == before
    assert set(db.tile_states(src)) == {"a"}


def test_tile_ids_are_never_reused(db: Store, src: int) -> None:
    ids = db.add_tiles([_row(src, str(i)) for i in range(3)], _vectors(3), "m1")
    db.delete_tiles(ids[1:])
    (again,) = db.add_tiles([_row(src, "1")], _vectors(1), "m1")
    assert again > max(ids)

    (replaced,) = db.replace_tiles([ids[0]], [_row(src, "0", content_hash="new")], _vectors(1, seed=5), "m1")
    assert replaced > again
    assert db.get_tiles([ids[0]]) == []
    assert db.tile_states(src)["0"] == TileState(replaced, "f-0", "new", "m1")
    np.testing.assert_array_equal(db.get_embeddings([replaced], "m1"), _vectors(1, seed=5))
    # The cascade removed the old vectors: only the two live tiles have one.
    assert db.counts()["embedded"] == 2


def test_replace_tiles_is_atomic(db: Store, src: int) -> None:
    ids = db.add_tiles([_row(src, "a"), _row(src, "b")], _vectors(2), "m1")
    with pytest.raises(IntegrityError):
        db.replace_tiles([ids[0]], [_row(src, "b")], _vectors(1), "m1")
    assert {k: v.id for k, v in db.tile_states(src).items()} == {"a": ids[0], "b": ids[1]}


def test_model_change_reembeds_in_place(db: Store, src: int) -> None:
    ids = db.add_tiles([_row(src, "a"), _row(src, "b")], _vectors(2), "m1")
    (extra,) = db.add_tiles([_row(src, "c")], _vectors(1), "m1")
    new = _vectors(2, seed=9)
    db.set_embeddings(ids, new, "m2")
    assert db.tile_states(src)["a"].model_fingerprint == "m2"
    (batch_ids, batch_vectors), *_ = db.iter_embeddings("m2")
    assert batch_ids.tolist() == ids
    np.testing.assert_array_equal(batch_vectors, new)
    assert db.counts()["embedded_by_model"] == {"m1": 1, "m2": 2}
    with pytest.raises(NotFound, match=rf"model m1 for tile\(s\) {ids[0]}, {ids[1]};"):
        db.get_embeddings([ids[0], extra, ids[1]], "m1")
    with pytest.raises(IntegrityError):
        db.set_embeddings([999_999], _vectors(1), "m2")


def test_update_fingerprints_keeps_ids(db: Store, src: int) -> None:
    ids = db.add_tiles([_row(src, "a"), _row(src, "b")], _vectors(2), "m1")
    db.update_fingerprints([(ids[0], "moved"), (ids[1], "touched")])
    states = db.tile_states(src)
    assert (states["a"].id, states["a"].fingerprint) == (ids[0], "moved")
    assert (states["b"].id, states["b"].fingerprint) == (ids[1], "touched")


def test_deleting_a_source_cascades_to_its_tiles(db: Store, src: int) -> None:
    db.add_tiles([_row(src, "a")], _vectors(1), "m1")
    db.record_error("a/broken.png", "not an image", source_id=src)
    with db.session(write=True) as s:
        s.execute(text("DELETE FROM sources WHERE id = :id"), {"id": src})
    counts = db.counts()
    assert (counts["tiles"], counts["embedded"]) == (0, 0)
    assert db.recent_errors() == []


def test_large_id_lists_are_chunked(db: Store, src: int) -> None:
    n = store_module._CHUNK + 5
    ids = db.add_tiles([_row(src, str(i)) for i in range(n)], np.zeros((n, 2), np.float32), "m1")
    assert db.get_embeddings(ids, "m1").shape == (n, 2)
    assert len(db.get_tiles(ids)) == n
    db.delete_tiles(ids)
    assert db.counts()["tiles"] == 0


# --- filters, neighbours, facets ---------------------------------------------------------------


@pytest.fixture
def catalogue(db: Store) -> dict[str, list[int]]:
    a = db.get_or_create_source("folder", "/archive/a")
    b = db.get_or_create_source("zip", "/archive/b.zip")
    c1 = db.upsert_case("C1")
    c2 = db.upsert_case("C2")
    s1 = db.upsert_slide("S1", a, c1, "C1/S1")
    s2 = db.upsert_slide("S2", b, c2, "C2/S2")
    s3 = db.upsert_slide("S3", b, None, "S3")
    ids = db.add_tiles(
        [
            _row(a, "1", slide_id=s1, meta={"stain": "HE", "year": 2020}),
            _row(a, "2", slide_id=s1, meta={"stain": "IHC"}),
            _row(b, "3", slide_id=s2, meta={"stain": "HE"}),
            _row(b, "4", slide_id=s3, meta={"stain": "HE", "year": 2021}),
            _row(b, "5", meta={'rater "A"': "yes", "Färbung": "HE"}),
        ],
        _vectors(5),
        "m1",
    )
    return {"a": [a], "b": [b], "ids": ids}


def test_tile_ids_matching_filters(db: Store, catalogue: dict[str, list[int]]) -> None:
    t1, t2, t3, t4, t5 = catalogue["ids"]

    def match(**kw: object) -> list[int]:
        result = db.tile_ids_matching(**kw)
        assert result.dtype == np.int64
        return result.tolist()

    assert match() == [t1, t2, t3, t4, t5]
    assert match(source="/archive/b.zip") == [t3, t4, t5]
    assert match(source=str(catalogue["a"][0])) == [t1, t2]
    assert match(source=catalogue["a"][0]) == [t1, t2]
    assert match(source="/nowhere") == []
    assert match(slide="S1") == [t1, t2]
    assert match(case="C2") == [t3]
    assert match(meta={"stain": "HE"}) == [t1, t3, t4]
    assert match(meta={"year": "2021"}) == [t4]
    assert match(meta={"stain": "HE", "year": "2020"}) == [t1]
    assert match(meta={"stain": "HE", "year": "2019"}) == []
    assert match(source="/archive/b.zip", meta={"stain": "HE"}) == [t3, t4]
    assert match(case="C1", meta={"stain": "IHC"}) == [t2]
    assert match(slide="S1", case="C2") == []
    # Keys a JSON path cannot name (quotes, non-ASCII) still match.
    assert match(meta={'rater "A"': "yes"}) == [t5]
    assert match(meta={"Färbung": "HE"}) == [t5]


def test_facet_values(db: Store, catalogue: dict[str, list[int]]) -> None:
    facets = db.facet_values()
    assert facets == {
        "sources": ["/archive/a", "/archive/b.zip"],
        "slides": ["S1", "S2", "S3"],
        "cases": ["C1", "C2"],
        "meta": {"Färbung": ["HE"], 'rater "A"': ["yes"], "stain": ["HE", "IHC"], "year": ["2020", "2021"]},
    }
    limited = db.facet_values(limit=1)
    assert limited["slides"] == ["S1"]
    assert limited["meta"]["stain"] == ["HE"] and limited["meta"]["year"] == ["2020"]


def test_counts(db: Store, catalogue: dict[str, list[int]]) -> None:
    db.add_texts("captions", [("a tumour", {})], _vectors(1), "m1")
    assert db.counts() == {
        "sources": 2,
        "slides": 3,
        "cases": 2,
        "tiles": 5,
        "texts": 1,
        "embedded": 5,
        "embedded_by_model": {"m1": 5},
    }


def _grid(db: Store, src: int, slide: int, level: int, stride: int, n: int = 5) -> dict[tuple[int, int], int]:
    cells = [(i, j) for j in range(n) for i in range(n)]
    rows = [
        _row(src, f"{slide}/{level}/{i}/{j}", slide_id=slide, level=level, x=100 + i * stride, y=50 + j * stride)
        for i, j in cells
    ]
    return dict(zip(cells, db.add_tiles(rows, _vectors(len(rows)), "m1"), strict=True))


def test_neighbours(db: Store, src: int) -> None:
    s1 = db.upsert_slide("S1", src, None, "S1.svs")
    s2 = db.upsert_slide("S2", src, None, "S2.svs")
    grid = _grid(db, src, s1, level=0, stride=224)
    _grid(db, src, s1, level=1, stride=224)  # same coordinates, other level
    _grid(db, src, s2, level=0, stride=224)  # same coordinates, other slide
    db.delete_tiles([grid[(3, 2)]])  # a hole (e.g. background) in the 3x3 block

    around = db.neighbours(grid[(2, 2)])
    expected = [(i, j) for j in (1, 2, 3) for i in (1, 2, 3) if (i, j) != (3, 2)]
    assert [t["id"] for t in around] == [grid[c] for c in expected]
    assert [(t["dx"], t["dy"]) for t in around] == [(i - 2, j - 2) for i, j in expected]
    assert around[0]["slide_key"] == "S1"

    corner = db.neighbours(grid[(0, 0)], radius=2)
    assert sorted(t["id"] for t in corner) == sorted(grid[(i, j)] for i in range(3) for j in range(3))

    (lonely,) = db.add_tiles([_row(src, "no-slide", x=0, y=0)], _vectors(1), "m1")
    assert db.neighbours(lonely) == []
    with pytest.raises(NotFound):
        db.neighbours(999_999)


def test_neighbours_of_a_single_column(db: Store, src: int) -> None:
    slide = db.upsert_slide("S1", src, None, "S1")
    ids = db.add_tiles(
        [_row(src, str(j), slide_id=slide, level=0, x=0, y=j * 512) for j in range(4)], _vectors(4), "m1"
    )
    assert [(t["id"], t["dx"], t["dy"]) for t in db.neighbours(ids[1])] == [
        (ids[0], 0, -1),
        (ids[1], 0, 0),
        (ids[2], 0, 1),
    ]


# --- texts -------------------------------------------------------------------------------------


def test_texts(db: Store) -> None:
    vectors = _vectors(3)
    items = [("a tumour", {"organ": "lung"}), ("necrosis", {}), ("a tumour", {})]
    assert db.add_texts("captions", items, vectors, "m1") == 2
    assert db.add_texts("captions", [("necrosis", {}), ("stroma", {})], _vectors(2, seed=3), "m1") == 1
    assert db.add_texts("other", [("necrosis", {})], _vectors(1), "m1") == 1

    ids, matrix = db.text_matrix("m1")
    assert ids.dtype == np.int64 and len(ids) == 4
    np.testing.assert_array_equal(matrix[:2], vectors[:2])

    texts = db.get_texts([int(ids[1]), 999, int(ids[0])])
    assert [(t["corpus"], t["text"], t["tags"]) for t in texts] == [
        ("captions", "necrosis", {}),
        ("captions", "a tumour", {"organ": "lung"}),
    ]

    missing = db.texts_missing_embeddings("m2")
    assert [i for i, _ in missing] == ids.tolist()
    assert missing[0][1] == "a tumour"
    assert db.texts_missing_embeddings("m1") == []
    db.set_text_embeddings([int(ids[0])], _vectors(1, seed=7), "m2")
    assert [i for i, _ in db.texts_missing_embeddings("m2")] == ids[1:].tolist()
    ids2, matrix2 = db.text_matrix("m2")
    assert ids2.tolist() == [ids[0]]
    np.testing.assert_array_equal(matrix2, _vectors(1, seed=7))
    empty_ids, empty = db.text_matrix("m3")
    assert empty_ids.shape == (0,) and empty.shape == (0, 0)


# --- builds, jobs, errors, meta ----------------------------------------------------------------


def test_builds(db: Store) -> None:
    assert db.live_build() is None
    first = db.add_build("m1", "flat", 10, "/idx/1", "cpu")
    second = db.add_build("m1", "hnsw", 12, "/idx/2", "cuda")
    db.set_build_status(first, "live")
    assert db.live_build()["id"] == first
    db.set_build_status(second, "live")
    live = db.live_build()
    assert {k: live[k] for k in ("id", "index_type", "count", "path", "status", "device")} == {
        "id": second,
        "index_type": "hnsw",
        "count": 12,
        "path": "/idx/2",
        "status": "live",
        "device": "cuda",
    }
    with db.session() as s:
        assert s.get(store_module.Build, first).status == "retired"
    with pytest.raises(ValueError, match="status"):
        db.set_build_status(first, "great")
    with pytest.raises(NotFound):
        db.set_build_status(999, "failed")


def test_jobs(db: Store) -> None:
    assert db.running_job() is None and db.last_job() is None
    job = db.start_job("index", {"paths": ["/archive/a"]}, total=10)
    running = db.running_job()
    assert (running["id"], running["pid"], running["done"], running["total"]) == (job, os.getpid(), 0, 10)
    assert running["args"] == {"paths": ["/archive/a"]}

    time.sleep(0.01)
    db.update_job(job, done=4, errors=1, message="reading a")
    updated = db.running_job()
    assert (updated["done"], updated["errors"], updated["message"], updated["total"]) == (4, 1, "reading a", 10)
    assert updated["heartbeat_at"] > running["heartbeat_at"]
    assert db.mark_stale_jobs_interrupted() == 0  # this process is alive

    db.finish_job(job, "done")
    assert db.running_job() is None
    last = db.last_job()
    assert (last["status"], last["message"]) == ("done", "reading a")
    assert last["finished_at"] is not None
    with pytest.raises(ValueError):
        db.finish_job(job, "running")
    with pytest.raises(NotFound):
        db.update_job(999, done=1)


def test_jobs_of_dead_processes_are_marked_interrupted(db: Store) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    job = db.start_job("reindex", {})
    with db.session(write=True) as s:
        s.get(store_module.Job, job).pid = dead.pid
    mine = db.start_job("index", {})
    assert db.mark_stale_jobs_interrupted() == 1
    with db.session() as s:
        assert s.get(store_module.Job, job).status == "interrupted"
        assert s.get(store_module.Job, mine).status == "running"


def test_errors_and_meta(db: Store, src: int) -> None:
    job = db.start_job("index", {})
    for i in range(3):
        db.record_error(f"a/{i}.png", "cannot decode", job_id=job, source_id=src)
    db.record_error("b.zip", "bad archive")
    recent = db.recent_errors(limit=2)
    assert [e["path"] for e in recent] == ["b.zip", "a/2.png"]
    assert (recent[1]["job_id"], recent[1]["source_id"], recent[1]["reason"]) == (job, src, "cannot decode")

    assert db.get_meta("model") is None
    db.set_meta("model", "m1")
    db.set_meta("model", "m2")
    assert db.get_meta("model") == "m2"


# --- crash safety ------------------------------------------------------------------------------

WRITER = """
import sys
import numpy as np
from search.storage.store import Store

store = Store(sys.argv[1])
source = store.get_or_create_source("folder", "/archive")
batch = 0
while True:
    rows = [
        {"source_id": source, "locator": f"{batch}/{i}", "path": "p", "content_hash": "h", "fingerprint": "f"}
        for i in range(50)
    ]
    store.add_tiles(rows, np.full((50, 16), batch, np.float32), "m1")
    batch += 1
"""


def test_kill_9_during_writes_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    url = _url(tmp_path / "h.db")
    Store(url).close()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), url], env=env)
    reader = Store(url)
    try:
        deadline = time.monotonic() + 30
        while reader.counts()["tiles"] < 500:
            assert writer.poll() is None, "the writer process died on its own"
            assert time.monotonic() < deadline, "the writer wrote too little"
            time.sleep(0.05)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()

        after = Store(url)
        counts = after.counts()
        assert counts["tiles"] % 50 == 0 and counts["tiles"] == counts["embedded"]
        ids, vectors = next(after.iter_embeddings("m1", batch=10**6))
        assert len(ids) == counts["tiles"] == len(np.unique(ids))
        # Every batch is whole: each stored vector value names its batch, 50 tiles each.
        _, per_batch = np.unique(vectors[:, 0], return_counts=True)
        assert set(per_batch.tolist()) == {50}
        with after.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        after.close()
    finally:
        if writer.poll() is None:
            writer.kill()
        reader.close()
