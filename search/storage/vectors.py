"""One FAISS vector index over tile embeddings: build, filtered search, reconstruct, save and load.

Its kinds: index_types.py; running on a GPU: gpu.py; the live one a server holds: live.py; builds on disk:
index_directory.py.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import numpy as np

try:
    import faiss
except ImportError:  # neither FAISS build: they are extras so that the two never land together
    raise ImportError(
        "FAISS is not installed: pip install 'histosearch[cpu]' (or 'histosearch[gpu]' on a CUDA machine, never both)"
    ) from None

from search.core.errors import BadInput, BadQuery, ConfigError, IndexUnavailable, NotFound
from search.storage.gpu import _GPU_MAX_K, _Gpu, _gpu_capable, _gpu_for, _resolve_device, _to_gpu
from search.storage.index_types import (
    IVF_TYPES,
    TRAIN_POINTS_PER_LIST,
    TRAIN_SEED,
    _inner,
    _kind_of,
    _new_index,
    choose_index_type,
)

# A filter admitting at most this many tiles is answered by scoring those vectors exactly.
EXACT_FILTER_MAX = 50_000
# Rows scored at once by the exact path: bounds its memory to (queries x this) floats.
_EXACT_CHUNK = 16_384


def _as_ids(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)


def _empty(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)


def _sorted_unique(ids: np.ndarray) -> np.ndarray:
    # Filters come sorted from the database: checking is much cheaper than sorting again.
    return ids if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()) else np.unique(ids)


def _positions(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``ids`` (any shape) would sit in ``sorted_ids`` (non-empty), and whether it is there:
    binary searches, no sort of either."""
    at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return at, sorted_ids[at] == ids


def _contained(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Whether each of ``ids`` (any shape) is in ``sorted_ids``."""
    return _positions(sorted_ids, ids)[1] if len(sorted_ids) else np.zeros(ids.shape, bool)


def _members(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Those of ``ids`` that are in ``sorted_ids``."""
    return ids[_contained(ids, sorted_ids)] if len(ids) else ids


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Results widened to k columns, with -inf scores wherever the id is -1."""
    out_scores, out_ids = _empty(len(ids), k)
    width = min(k, ids.shape[1])
    out_ids[:, :width] = ids[:, :width]
    out_scores[:, :width] = np.where(ids[:, :width] >= 0, scores[:, :width], -np.inf)
    return out_scores, out_ids


def save_index(index: faiss.Index, path: Path) -> None:
    """Write ``index`` to ``path`` atomically (a temporary file beside it, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class VectorIndex:
    """One FAISS index over tile embeddings; ``search`` is safe to call from many threads."""

    def __init__(self, index: faiss.IndexIDMap2, gpu: int | None = None, gpu_index: faiss.Index | None = None):
        kind = _kind_of(index)
        if kind is None:
            raise ConfigError(f"unsupported FAISS index {type(index).__name__}: expected an inner-product IDMap2")
        self._cpu = index
        self.index_type: str = kind
        self.dim: int = index.d
        self._ids = faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
        self._sorted_ids = np.sort(self._ids)
        # The device's lock, shared with every other index on it; a private one for a GPU index handed in
        # without a device number (tests stand a CPU clone in for the replica).
        self._gpu_lock = _gpu_for(gpu).lock if gpu is not None else threading.RLock()
        if gpu_index is None and gpu is not None and _gpu_capable(kind, index):
            gpu_index = _to_gpu(kind, index, _gpu_for(gpu))
        self._gpu = gpu_index
        self.device: str = "cpu" if gpu_index is None else "cuda"

    def __del__(self) -> None:
        # The replica's memory goes back to the shared resources: not while another index uses them.
        gpu_index = getattr(self, "_gpu", None)
        if gpu_index is not None:
            with self._gpu_lock:
                self._gpu = None
                del gpu_index

    @property
    def ntotal(self) -> int:
        return int(self._cpu.ntotal)

    @property
    def sorted_ids(self) -> np.ndarray:
        """The tile ids in the index, sorted (read-only)."""
        view = self._sorted_ids.view()
        view.flags.writeable = False
        return view

    @property
    def ids(self) -> np.ndarray:
        """The tile ids in the index, in insertion order (read-only)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    @property
    def nprobe(self) -> int | None:
        """Inverted lists probed per query (IVF types), else None."""
        return int(_inner(self._cpu).nprobe) if self.index_type in IVF_TYPES else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        # Searches read it into their per-call parameters (``_params``), on the GPU replica too.
        if self.index_type in IVF_TYPES:
            _inner(self._cpu).nprobe = max(1, min(int(value), self.nlist))

    @property
    def nlist(self) -> int | None:
        """Inverted lists (IVF types), else None."""
        return int(_inner(self._cpu).nlist) if self.index_type in IVF_TYPES else None

    @classmethod
    def build(
        cls,
        ids: np.ndarray,
        vectors: np.ndarray,
        index_type: str = "auto",
        *,
        exact_max: int = 200_000,
        device: str = "auto",
        nprobe: int | None = None,
    ) -> VectorIndex:
        """Index ``vectors`` (rows: L2-normalised float32) under the tile ``ids``.

        IVF types train k-means on a deterministic sample; ``nprobe`` overrides the probed list count.
        """
        ids = _as_ids(ids)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise BadInput(f"vectors of shape {vectors.shape} do not match {len(ids)} ids: expected (n, dim)")
        if len(ids) and (ids.min() < 0 or len(np.unique(ids)) != len(ids)):
            raise BadInput("tile ids must be unique and >= 0 (-1 marks a missing result)")
        n, dim = vectors.shape
        kind = choose_index_type(n, index_type, exact_max)
        # k-means needs a point per list; PQ needs a point per code of its 256-entry codebooks.
        minimum = {"ivf": 1, "ivfsq8": 1, "ivfpq": 256}.get(kind, 0)
        if n < minimum:
            raise BadInput(
                f"an {kind!r} index needs at least {minimum} vectors to train, got {n}: use index type 'flat' or 'auto'"
            )
        if nprobe is not None and nprobe < 1:
            raise ConfigError(f"nprobe must be >= 1, got {nprobe}")
        number = _resolve_device(device)
        gpu = _gpu_for(number) if number is not None else None
        index = _new_index(kind, dim, n, nprobe)
        if kind in IVF_TYPES:
            cls._train(index, vectors, gpu)
        gpu_index = None
        if gpu is not None and _gpu_capable(kind, index):
            # Adding on the GPU assigns vectors to lists there; the CPU copy is kept for reconstruct/save.
            gpu_index = _to_gpu(kind, index, gpu)
            probes = _inner(index).nprobe if kind != "flat" else None
            with gpu.lock:
                gpu_index.add_with_ids(vectors, ids)
                index = faiss.index_gpu_to_cpu(gpu_index)
            if probes is not None:
                _inner(index).nprobe = probes
        else:
            index.add_with_ids(vectors, ids)
        if kind in IVF_TYPES:
            _inner(index).make_direct_map()
        return cls(index, number, gpu_index)

    @staticmethod
    def _train(index: faiss.IndexIDMap2, vectors: np.ndarray, gpu: _Gpu | None) -> None:
        ivf = _inner(index)
        size = min(len(vectors), TRAIN_POINTS_PER_LIST * ivf.nlist)
        rows = np.sort(np.random.default_rng(TRAIN_SEED).choice(len(vectors), size, replace=False))
        if gpu is None:
            index.train(vectors[rows])
            return
        # k-means on the GPU; the trained centroids land in the CPU coarse quantizer.
        with gpu.lock:
            clustering = faiss.index_cpu_to_gpu(gpu.resources, gpu.number, faiss.IndexFlatIP(index.d))
            ivf.clustering_index = clustering
            try:
                index.train(vectors[rows])
            finally:
                ivf.clustering_index = None
                del clustering

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k best (scores float32 [q,k], tile ids int64 [q,k]) per query, best first, padded with
        -inf / -1. With ``allowed``, only those tile ids, and always min(k, |allowed in index|) of them."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise BadQuery(f"query vectors of shape {queries.shape} do not match the index dimension {self.dim}")
        if k < 0:
            raise BadQuery(f"k must be >= 0, got {k}")
        nq = len(queries)
        if allowed is None:
            if self.ntotal == 0 or k == 0:
                return _empty(nq, k)
            return _pad(*self._search(queries, min(k, self.ntotal)), k)
        candidates = self.present(allowed)
        if len(candidates) == 0 or k == 0:
            return _empty(nq, k)
        if len(candidates) == self.ntotal:
            return _pad(*self._search(queries, min(k, self.ntotal)), k)
        if len(candidates) <= EXACT_FILTER_MAX:
            return _pad(*self._exact(queries, k, candidates), k)
        scores, ids = _pad(*self._filtered(queries, k, candidates), k)
        # IVF probes and HNSW beams can hold fewer admitted vectors than asked: score those rows exactly.
        short = (ids >= 0).sum(axis=1) < min(k, len(candidates))
        if short.any():
            scores[short], ids[short] = _pad(*self._exact(queries[short], k, candidates), k)
        return scores, ids

    def present(self, allowed: np.ndarray) -> np.ndarray:
        """The sorted unique ids of ``allowed`` that are in the index."""
        return _members(_sorted_unique(_as_ids(allowed)), self._sorted_ids)

    def _params(self, k: int, selector: faiss.IDSelector | None) -> faiss.SearchParameters | None:
        # Per-call parameters, never index attributes: concurrent searches must not see each other's.
        if self.index_type in IVF_TYPES:
            params = faiss.SearchParametersIVF()
            params.nprobe = _inner(self._cpu).nprobe
        elif self.index_type == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(_inner(self._cpu).hnsw.efSearch, k)
        elif selector is None:
            return None
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        return params

    def _on_gpu(self, k: int) -> bool:
        return self._gpu is not None and max(k, self.nprobe or 0) <= _GPU_MAX_K

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._on_gpu(k):
            with self._gpu_lock:
                return self._gpu.search(queries, k, params=self._params(k, None))
        return self._cpu.search(queries, k, params=self._params(k, None))

    def _filtered(self, queries: np.ndarray, k: int, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Approximate search restricted to ``candidates`` (may return fewer than k per row)."""
        # GPU indexes take no selector: over-fetch in proportion to how much the filter removes. Past the
        # GPU's k limit that over-fetch would come back short and fall to exact scoring of every candidate
        # (seconds at 10M): the CPU index with a selector is then the faster path.
        fetch = min(self.ntotal, max(k, math.ceil(2 * k * self.ntotal / len(candidates))))
        if not self._on_gpu(fetch):
            selector = faiss.IDSelectorBatch(candidates)
            return self._cpu.search(queries, k, params=self._params(k, selector))
        scores, ids = self._search(queries, fetch)
        keep = np.isin(ids, candidates)
        # A stable sort of "not kept" moves the admitted hits to the front, still best first.
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        ids = np.where(np.take_along_axis(keep, order, axis=1), np.take_along_axis(ids, order, axis=1), -1)
        return np.take_along_axis(scores, order, axis=1), ids

    def _exact(self, queries: np.ndarray, k: int, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the stored vectors of ``candidates``, a chunk at a time."""
        best_scores, best_ids = _empty(len(queries), 0)
        for start in range(0, len(candidates), _EXACT_CHUNK):
            chunk = candidates[start : start + _EXACT_CHUNK]
            scores = np.hstack([best_scores, queries @ self._cpu.reconstruct_batch(chunk).T])
            ids = np.hstack([best_ids, np.broadcast_to(chunk, (len(queries), len(chunk)))])
            if scores.shape[1] > k:
                top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
                scores, ids = np.take_along_axis(scores, top, axis=1), np.take_along_axis(ids, top, axis=1)
            best_scores, best_ids = scores, ids
        order = np.argsort(-best_scores, axis=1, kind="stable")
        return np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(best_ids, order, axis=1)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors [len(ids), dim] of tile ``ids`` (PQ-decoded approximations for ivfpq)."""
        ids = _as_ids(ids)
        missing = np.setdiff1d(ids, self.present(ids))
        if len(missing):
            raise NotFound(f"tile ids not in the index: {missing[:10].tolist()}: re-run `histosearch index PATH`")
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._cpu.reconstruct_batch(ids)

    def save(self, path: Path) -> None:
        """Write the CPU form to ``path`` atomically (a temporary file beside it, then os.replace)."""
        save_index(self._cpu, path)

    @classmethod
    def load(cls, path: Path, device: str = "auto") -> VectorIndex:
        """Read an index written by ``save``, onto the GPU where ``device`` and the FAISS build allow.

        IVF lists are memory-mapped, read-only: a 10M-tile part loads in a second instead of twelve, its codes
        live in the page cache (shared by every process serving the build) instead of each process's memory,
        and a publish that checks a new build does not hold a second copy of the live one."""
        path = Path(path)
        if not path.is_file():
            raise IndexUnavailable(f"{path}: no index file: run `histosearch index PATH` first")
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as exc:
            raise IndexUnavailable(
                f"{path}: not a readable FAISS index ({str(exc).splitlines()[-1]}): rebuild it with "
                "`histosearch index PATH`"
            ) from None
        if _kind_of(index) is None:
            raise IndexUnavailable(f"{path}: not a histosearch index: rebuild it with `histosearch index PATH`")
        return cls(index, _resolve_device(device))
