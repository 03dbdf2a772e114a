"""The live index over published builds: lazy load, reload after a publish, concurrent readers, unpublish."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from search.core.errors import IndexUnavailable
from search.storage.index_directory import IndexDirectory
from search.storage.live import LiveIndex
from search.storage.vectors import VectorIndex

DIM = 32


def write_build(directory: IndexDirectory, build_id: int, n: int) -> None:
    x = np.random.default_rng(build_id).standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    VectorIndex.build(np.arange(n), x, "flat", device="cpu").save(directory.build_path(build_id))


def test_live_index_loads_and_reloads_after_publish(tmp_path) -> None:
    directory = IndexDirectory(tmp_path / "index")
    live = LiveIndex(directory, device="cpu")
    with pytest.raises(IndexUnavailable, match="run `histosearch index PATH` first"):
        live.get()
    write_build(directory, 1, 10)
    directory.publish(1)
    first = live.get()
    assert (first.ntotal, live.build_id) == (10, 1)
    assert live.get() is first  # unchanged pointer: no reload
    write_build(directory, 2, 20)
    assert live.get() is first  # written but not published yet
    directory.publish(2)
    second = live.get()
    assert (second.ntotal, live.build_id) == (20, 2)
    assert live.get() is second


def test_live_index_under_concurrent_publishes(tmp_path) -> None:
    directory = IndexDirectory(tmp_path / "index")
    write_build(directory, 1, 10)
    directory.publish(1)
    live = LiveIndex(directory, device="cpu")
    errors: list[BaseException] = []
    seen: set[int] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.add(live.get().ntotal)
            except BaseException as exc:  # noqa: BLE001 - collected and re-raised in the test thread
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for build_id in range(2, 8):
        write_build(directory, build_id, 10 * build_id)
        directory.publish(build_id)
    while live.build_id != 7:
        live.get()
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen <= {10 * b for b in range(1, 8)}
    assert live.get().ntotal == 70


def test_unpublish_makes_a_live_index_unavailable(tmp_path) -> None:
    directory = IndexDirectory(tmp_path / "index")
    ids = np.arange(3, dtype=np.int64)
    vectors = np.eye(3, 8, dtype=np.float32)
    VectorIndex.build(ids, vectors, "flat").save(directory.build_path(1))
    directory.publish(1)
    live = LiveIndex(directory, device="cpu")
    assert live.get().ntotal == 3
    directory.unpublish()
    assert directory.live_build_id() is None
    with pytest.raises(IndexUnavailable, match="histosearch index"):
        live.get()
