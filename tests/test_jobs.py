"""Index builds, jobs, file errors and meta on real SQLite."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from search.core.errors import NotFound
from search.storage.schema import Build, Job
from search.storage.store import Store


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
        assert s.get(Build, first).status == "retired"
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
        s.get(Job, job).pid = dead.pid
    mine = db.start_job("index", {})
    assert db.mark_stale_jobs_interrupted() == 1
    with db.session() as s:
        assert s.get(Job, job).status == "interrupted"
        assert s.get(Job, mine).status == "running"


def test_a_dead_pids_job_is_shown_interrupted_before_anyone_marks_it(db: Store) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    job = db.start_job("index", {})
    with db.session(write=True) as s:
        s.get(Job, job).pid = dead.pid
    assert db.running_job() is None
    last = db.last_job()
    assert (last["id"], last["status"]) == (job, "interrupted")
    assert last["message"] == f"process {dead.pid} ended without finishing the job"
    with db.session() as s:
        assert s.get(Job, job).status == "running"  # only read: `status` may run on a read-only copy


def test_an_error_is_a_state_of_a_file(db: Store, src: int) -> None:
    first, second = db.start_job("index", {}), db.start_job("reindex", {})
    db.record_error("a/1.png", "cannot decode", job_id=first, source_id=src)
    db.record_error("a/2.png", "cannot decode", job_id=first, source_id=src)
    db.record_error("a/1.png", "still cannot decode", job_id=second, source_id=src)
    assert [(e["path"], e["reason"], e["job_id"]) for e in db.recent_errors()] == [
        ("a/2.png", "cannot decode", first),
        ("a/1.png", "still cannot decode", second),
    ]
    # The second run saw a/2.png read well: its error goes; errors of inputs that never opened stay apart.
    db.record_error("/gone.zip", "no such file", job_id=second)
    assert db.clear_errors(src, keep_job=second) == 1
    assert [e["path"] for e in db.recent_errors()] == ["/gone.zip", "a/1.png"]
    assert db.clear_errors(None, path="/gone.zip") == 1
    assert [e["path"] for e in db.recent_errors()] == ["a/1.png"]


def test_errors_and_meta(db: Store, src: int) -> None:
    job = db.start_job("index", {})
    for i in range(3):
        db.record_error(f"a/{i}.png", "cannot decode", job_id=job, source_id=src)
    db.record_error("b.zip", "bad archive")
    recent = db.recent_errors(limit=2)
    assert [e["path"] for e in recent] == ["b.zip", "a/2.png"]
    assert (recent[1]["job_id"], recent[1]["source_id"], recent[1]["reason"]) == (job, src, "cannot decode")
    # The files one run refused, and how many.
    assert [e["path"] for e in db.recent_errors(job_id=job)] == ["a/2.png", "a/1.png", "a/0.png"]
    assert db.count_errors(job) == 3 and db.count_errors(job + 1) == 0

    assert db.get_meta("model") is None
    db.set_meta("model", "m1")
    db.set_meta("model", "m2")
    assert db.get_meta("model") == "m2"
