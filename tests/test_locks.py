"""The one-indexer lock on both databases: a file lock with SQLite, an advisory lock on Postgres that dies
with the process holding it, and job liveness read from who holds it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from search.storage.locks import Busy, acquire_indexer_lock
from search.storage.store import Store

ROOT = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from pathlib import Path
from search.storage.locks import acquire_indexer_lock
from search.storage.store import Store

lock = acquire_indexer_lock(sys.argv[1], Path(sys.argv[2]))
Store(sys.argv[1]).start_job("index", {})
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_holder_is_refused_until_the_first_lets_go(database_url: str, tmp_path: Path) -> None:
    Store(database_url).close()
    first = acquire_indexer_lock(database_url, tmp_path / "indexer.lock")
    with pytest.raises(Busy):
        acquire_indexer_lock(database_url, tmp_path / "indexer.lock")
    first.release()
    acquire_indexer_lock(database_url, tmp_path / "indexer.lock").release()


def test_a_killed_holder_leaves_neither_lock_nor_a_running_job(database_url: str, tmp_path: Path) -> None:
    store = Store(database_url)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, database_url, str(tmp_path / "indexer.lock")], env=env, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(Busy):
            acquire_indexer_lock(database_url, tmp_path / "indexer.lock")
        assert store.mark_stale_jobs_interrupted() == 0  # its holder is alive
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        deadline = time.monotonic() + 30
        while True:
            try:
                lock = acquire_indexer_lock(database_url, tmp_path / "indexer.lock")
                break
            except Busy:
                assert time.monotonic() < deadline, "the lock outlived its holder"
                time.sleep(0.05)
        try:
            assert store.mark_stale_jobs_interrupted() == 1
            assert store.last_job()["status"] == "interrupted"
        finally:
            lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
        store.close()
