"""Planning a source's sync: a real folder's listing against stored tile states, errors into a real store."""

from __future__ import annotations

import os

import pytest

from indexer.job import Job
from indexer.plan import Plan, plan
from indexer.report import RunReport, SourceReport
from search.archives.readers import open_reader
from search.archives.readers.folder import FolderReader
from search.core.settings import Settings, load_settings
from search.storage.store import Store, TileState
from tests.archives import make_tiles

MODEL = "model-a"


@pytest.fixture
def settings() -> Settings:
    return load_settings(tile_size=64)


@pytest.fixture
def job(db: Store) -> Job:
    return Job(db, RunReport(db.start_job("index", {})))


def test_a_source_never_indexed_is_all_new_work(tmp_path, settings, job):
    make_tiles(tmp_path / "tiles", 4)
    report = SourceReport(str(tmp_path / "tiles"))
    todo = plan(open_reader(tmp_path / "tiles", settings), {}, MODEL, job, report)
    assert len(todo.work) == 4 and all(w.state is None for w in todo.work)
    assert todo.removed == [] and report.unchanged == 0 and report.errors == 0


def test_unchanged_tiles_are_counted_the_rest_is_work_and_unlisted_ones_are_removed(tmp_path, settings, job):
    make_tiles(tmp_path / "tiles", 4)
    reader = open_reader(tmp_path / "tiles", settings)
    same, moved, other_model, new = sorted(reader.scan(), key=lambda e: e.locator)
    existing = {
        same.locator: TileState(1, same.fingerprint, "h1", MODEL),
        moved.locator: TileState(2, "an older fingerprint", "h2", MODEL),
        other_model.locator: TileState(3, other_model.fingerprint, "h3", "model-b"),
        "gone/tile.png": TileState(4, "f4", "h4", MODEL),
    }
    report = SourceReport(str(tmp_path / "tiles"))
    todo = plan(reader, existing, MODEL, job, report)
    assert {w.entry.locator: w.state for w in todo.work} == {
        moved.locator: existing[moved.locator],
        other_model.locator: existing[other_model.locator],
        new.locator: None,
    }
    assert report.unchanged == 1 and todo.removed == [4]


def test_a_refused_file_is_a_job_error_named_by_its_path(tmp_path, settings, job, db):
    root = tmp_path / "tiles"
    make_tiles(root, 2)
    (root / "loop.png").symlink_to(root / "loop.png")
    uri = str(root.resolve())
    report = SourceReport(uri, source_id=db.get_or_create_source("folder", uri))
    todo = plan(open_reader(root, settings), {}, MODEL, job, report)
    assert len(todo.work) == 2 and todo.removed == [] and report.errors == 1
    ((path, reason),) = [(e["path"], e["reason"]) for e in db.recent_errors(5)]
    assert path == os.path.join(uri, "loop.png") and reason == "symbolic link loop: not followed"
    assert db.count_errors(job.id) == 1


def test_a_listing_cut_short_removes_nothing(tmp_path, settings, job, db):
    reader = FolderReader(tmp_path / "moved away", settings)
    report = SourceReport(str(reader.root))
    todo = plan(reader, {"a.png": TileState(1, "f1", "h1", MODEL)}, MODEL, job, report)
    assert todo == Plan([], None) and report.errors == 1
    # The reason does not name the folder again: the record does.
    assert [(e["path"], e["reason"]) for e in db.recent_errors(5)] == [(str(reader.root), "not a folder")]
