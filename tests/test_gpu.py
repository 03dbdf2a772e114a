"""FAISS on the GPU (search/storage/gpu.py) and the GPU branches of VectorIndex, run on the CPU through a
stand-in for FAISS's GPU API; and the CPU fallback of a FAISS build without one.

The stand-in keeps a CPU clone as the "GPU replica" and behaves as FAISS GPU does where it matters: the
resources object of a device is shared, is not thread-safe (every use records whether another one was in
progress on it), and a clone of an IVF index probing more lists than the k-selection limit throws.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import faiss
import numpy as np
import pytest

from search.storage import gpu, vectors
from search.storage.gpu import gpu_available
from search.storage.vectors import VectorIndex

DIM = 16
GPU_MAX_K = 2048


class StandInResources:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self.busy = 0
        self.overlaps = 0
        self.calls: list[tuple[str, int]] = []

    @contextlib.contextmanager
    def using(self, what: str, k: int = 0):
        with self._guard:
            self.busy += 1
            self.overlaps += self.busy > 1
            self.calls.append((what, k))
        try:
            time.sleep(0.0002)  # widen the window a racing call would fall into
            yield
        finally:
            with self._guard:
                self.busy -= 1


class StandInGpuIndex:
    def __init__(self, resources: StandInResources, inner: faiss.Index) -> None:
        self.resources = resources
        self.inner = inner

    @property
    def ntotal(self) -> int:
        return self.inner.ntotal

    def search(self, queries, k, params=None):
        if k > GPU_MAX_K:
            raise RuntimeError("k > GPU max k-selection")
        with self.resources.using("search", k):
            return self.inner.search(queries, k, params=params)

    def add_with_ids(self, x, ids) -> None:
        with self.resources.using("add"):
            self.inner.add_with_ids(x, ids)

    def __del__(self) -> None:
        with self.resources.using("free"):
            pass


class ClonerOptions:
    useFloat16 = False


def index_cpu_to_gpu(resources: StandInResources, device: int, index: faiss.Index, options=None):
    with resources.using("clone"):
        if isinstance(index, faiss.IndexIDMap2):
            inner = faiss.downcast_index(index.index)
            if isinstance(inner, faiss.IndexIVF) and inner.nprobe > GPU_MAX_K:
                raise RuntimeError("Error: 'nprobe <= getMaxKSelection()' failed")
            return StandInGpuIndex(resources, faiss.clone_index(index))
        return faiss.clone_index(index)  # the k-means clustering index: used as a plain index


def index_gpu_to_cpu(gpu_index: StandInGpuIndex) -> faiss.Index:
    with gpu_index.resources.using("copy back"):
        return faiss.clone_index(gpu_index.inner)


@pytest.fixture
def stand_in_gpu(monkeypatch) -> StandInResources:
    made: list[StandInResources] = []

    def resources() -> StandInResources:
        made.append(StandInResources())
        return made[-1]

    monkeypatch.setattr(faiss, "StandardGpuResources", resources, raising=False)
    monkeypatch.setattr(faiss, "GpuClonerOptions", ClonerOptions, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", index_cpu_to_gpu, raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", index_gpu_to_cpu, raising=False)
    monkeypatch.setattr(gpu, "_gpus", {})
    gpu._gpu_for(0)
    assert len(made) == 1
    return made[0]


def points(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact(x: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :k]]


def test_build_and_search_run_on_the_stand_in_gpu(stand_in_gpu) -> None:
    x, ids = points(500, 1), np.arange(500, dtype=np.int64) * 3
    for kind in ("flat", "ivf"):
        index = VectorIndex.build(ids, x, kind, device="cuda")
        assert index.device == "cuda"
        _, found = index.search(x[:5], 5)
        assert (found[:, 0] == ids[:5]).all()
    whats = {what for what, _ in stand_in_gpu.calls}
    assert {"clone", "add", "copy back", "search"} <= whats
    assert stand_in_gpu.overlaps == 0


def test_reloads_and_searches_share_one_lock_per_gpu(stand_in_gpu, tmp_path) -> None:
    # A live reload clones the new build onto the device's resources while request threads search the old
    # index, and the old replica is freed when its last reference goes: all of it on one resources object.
    x, ids = points(400, 2), np.arange(400, dtype=np.int64)
    path = tmp_path / "index.faiss"
    VectorIndex.build(ids, x, "flat", device="cpu").save(path)
    live = {"index": VectorIndex.load(path, "cuda")}
    queries = points(4, 3)
    want = exact(x, ids, queries, 5)
    wrong: list[np.ndarray] = []
    stop = threading.Event()

    def search() -> None:
        while not stop.is_set():
            _, found = live["index"].search(queries, 5)
            if not (found == want).all():
                wrong.append(found)

    def reload() -> None:
        for _ in range(40):
            live["index"] = VectorIndex.load(path, "cuda")

    threads = [threading.Thread(target=search) for _ in range(3)]
    for thread in threads:
        thread.start()
    reload()
    stop.set()
    for thread in threads:
        thread.join()
    assert not wrong
    counts = {what: sum(1 for w, _ in stand_in_gpu.calls if w == what) for what in ("clone", "search", "free")}
    assert counts["clone"] == 41 and counts["search"] > 40 and counts["free"] >= 39
    assert stand_in_gpu.overlaps == 0


def test_nprobe_past_the_gpu_limit_searches_on_the_cpu(stand_in_gpu, tmp_path) -> None:
    x, ids = points(2000, 4), np.arange(2000, dtype=np.int64)
    built = VectorIndex.build(ids, x, "ivf", device="cpu")
    faiss.downcast_index(built._cpu.index).nprobe = GPU_MAX_K + 1
    built.save(tmp_path / "index.faiss")
    index = VectorIndex.load(tmp_path / "index.faiss", "cuda")
    assert index.device == "cpu" and index.nprobe == GPU_MAX_K + 1
    _, found = index.search(x[:3], 4)
    assert (found[:, 0] == ids[:3]).all()
    assert not [what for what, _ in stand_in_gpu.calls if what == "search"]


@pytest.mark.parametrize(("every", "on_gpu"), [(2, True), (50, False)])
def test_filtered_search_over_fetches_on_gpu_only_within_its_k_limit(stand_in_gpu, monkeypatch, every, on_gpu):
    # k=10 over 3000 vectors: a filter keeping 1 in 2 needs a fetch of 40 (within a limit of 64), one keeping
    # 1 in 50 a fetch of 1000: the CPU index with a selector answers, not the GPU plus exact scoring.
    # The limit is read where an index is cloned (gpu.py) and where a search picks its device (vectors.py).
    monkeypatch.setattr(gpu, "_GPU_MAX_K", 64)
    monkeypatch.setattr(vectors, "_GPU_MAX_K", 64)
    monkeypatch.setattr(vectors, "EXACT_FILTER_MAX", 0)
    x, ids = points(3000, 5), np.arange(3000, dtype=np.int64) * 2 + 1
    index = VectorIndex.build(ids, x, "flat", device="cuda")
    exact_calls = []
    real_exact = index._exact
    monkeypatch.setattr(index, "_exact", lambda *a: exact_calls.append(a) or real_exact(*a))
    stand_in_gpu.calls.clear()
    queries = points(6, 6)
    _, found = index.search(queries, 10, allowed=ids[::every])
    assert (found == exact(x[::every], ids[::every], queries, 10)).all()
    searches = [k for what, k in stand_in_gpu.calls if what == "search"]
    assert searches == ([40] if on_gpu else [])
    assert not exact_calls


@pytest.mark.skipif(gpu_available(), reason="checks the fallback of a CPU-only FAISS build")
def test_cuda_without_gpu_faiss_runs_on_cpu(caplog) -> None:
    x, ids = points(50, 7), np.arange(50, dtype=np.int64)
    with caplog.at_level(logging.WARNING, logger="search.storage.gpu"):
        index = VectorIndex.build(ids, x, "flat", device="cuda")
    assert index.device == "cpu"
    assert "no GPU support" in caplog.text
