"""FAISS vector indexes over tile embeddings, and the live one a server holds (builds on disk: index_directory.py).

Embeddings are L2-normalised float32, so similarity is the inner product. Every index is an
``IndexIDMap2`` whose ids are tile ids (int64, not contiguous: ids are never reused after deletes);
``IDMap2`` keeps the reverse map that ``reconstruct`` needs.

Index types:

- ``flat``: exact inner product. The ``auto`` choice up to ``exact_max`` vectors.
- ``ivf``: IVF-Flat (inverted lists of raw vectors). The ``auto`` choice past ``exact_max``: in
  ``bench/ann.py`` at 1M vectors it keeps recall@10 >= 0.95 while searching >= 10x faster than ``flat``.
- ``ivfpq``: IVF with product-quantised codes of ``dim // 4`` bytes (16x smaller than raw vectors); for
  archives whose raw vectors do not fit in memory, at a recall cost (0.88 at 100k, 0.81 at 1M, 512-d).
- ``ivfsq8``: IVF with 8-bit scalar-quantised vectors (4x smaller than raw ones; trains no more than ``ivf``).
- ``hnsw``: HNSW graph (M=32) over raw vectors; CPU only (FAISS has no GPU HNSW).

A GPU FAISS build (``faiss-gpu``) trains and searches ``flat``/``ivf``/``ivfpq`` on the GPU (``ivfpq`` only
with at most 96 code bytes, which GPU IVFPQ supports: not at 512-d); the CPU form stays in memory for
``reconstruct``, exact re-scoring and ``save``. The CPU build gives the same answers.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    import faiss
except ImportError:  # neither FAISS build: they are extras so that the two never land together
    raise ImportError(
        "FAISS is not installed: pip install 'histosearch[cpu]' (or 'histosearch[gpu]' on a CUDA machine, never both)"
    ) from None

from search.core.errors import BadInput, BadQuery, ConfigError, IndexUnavailable, NotFound
from search.storage.index_directory import REPAIR, IndexDirectory

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivf", "ivfpq", "ivfsq8", "hnsw")
# Types built on inverted lists: trained by k-means, searched with nprobe.
IVF_TYPES = frozenset({"ivf", "ivfpq", "ivfsq8"})
# `python -m bench.ann` at 1M synthetic 512-d vectors on 2 CPU cores: ivf (default nprobe 25) had the best
# recall@10, 0.994, at 15x exact's batch and 96x its single-query speed; hnsw was faster (24x / 196x) at
# recall 0.980 but is CPU-only, and its graph walk suffers more from filters and from text queries that
# lie outside the image distribution; ivfpq reached 0.81.
APPROXIMATE_DEFAULT = "ivf"

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
# k-means gets this many training points per inverted list (FAISS warns below 39, caps at 256):
# a 1M-vector IVF build then takes about 2 minutes on 2 CPU cores.
TRAIN_POINTS_PER_LIST = 64
TRAIN_SEED = 1234
# A filter admitting at most this many tiles is answered by scoring those vectors exactly.
EXACT_FILTER_MAX = 50_000
# Rows scored at once by the exact path: bounds its memory to (queries x this) floats.
_EXACT_CHUNK = 16_384
# FAISS GPU k-selection limit (k and nprobe).
_GPU_MAX_K = 2048
# Sub-quantizer counts (code bytes) the GPU IVFPQ kernels support.
_GPU_PQ_CODE_BYTES = frozenset({1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96})


def choose_index_type(n: int, requested: str = "auto", exact_max: int = 200_000) -> str:
    """The index type to build for ``n`` vectors: ``requested`` itself, or for ``auto`` exact search
    while ``n <= exact_max`` and the measured approximate default past it."""
    if requested == "auto":
        return "flat" if n <= exact_max else APPROXIMATE_DEFAULT
    if requested not in INDEX_TYPES:
        raise ConfigError(f"unknown index type {requested!r}: use one of auto, {', '.join(INDEX_TYPES)}")
    return requested


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: about 4*sqrt(n), with enough points per list to train."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39, 65_536))


def default_nprobe(nlist: int) -> int:
    """Lists probed per query: grows like sqrt(nlist) (16 up to 1,600 lists, 25 at 4,000: the
    benchmark's 1M size, recall@10 0.993), so the scanned share of the index shrinks as it grows."""
    return min(nlist, max(16, round(0.4 * math.sqrt(nlist))))


def pq_subquantizers(dim: int) -> int:
    """PQ code bytes per vector: sub-vectors of 4 dims (2 below 128-d, where 4-dim codebooks
    trained on a small index lose too much recall)."""
    target = dim // (4 if dim >= 128 else 2)
    return next(m for m in range(max(1, target), 0, -1) if dim % m == 0)


def gpu_available() -> bool:
    """Whether this FAISS build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass(frozen=True)
class _Gpu:
    """One GPU's FAISS resources and the lock every use of them takes.

    One StandardGpuResources per device and process (each reserves scratch memory on the GPU), shared by
    every index on that device: a live reload clones the new build onto it while request threads search the
    old one. The resources are not thread-safe, so clone, train, add, search and free all hold ``lock``.
    Re-entrant: a GPU index freed by the garbage collector inside a locked call must not deadlock.
    """

    number: int
    resources: object
    lock: threading.RLock


_gpus: dict[int, _Gpu] = {}
_gpus_lock = threading.Lock()


def _gpu_for(gpu: int) -> _Gpu:
    with _gpus_lock:
        if gpu not in _gpus:
            _gpus[gpu] = _Gpu(gpu, faiss.StandardGpuResources(), threading.RLock())
        return _gpus[gpu]


def _resolve_device(device: str) -> int | None:
    """The GPU number to use, or None for the CPU."""
    if device == "cpu":
        return None
    number = device.partition(":")[2]
    if device not in ("auto", "cuda") and not (device.startswith("cuda:") and number.isdigit()):
        raise ConfigError(f"device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not gpu_available():
        if device != "auto":
            # The device setting is shared with the model, which may well run on CUDA through torch
            # while FAISS is the CPU build: the index then runs on the CPU, with the same answers.
            log.warning("device=%s: this FAISS build has no GPU support, the index runs on the CPU", device)
        return None
    gpu = int(number or 0)
    if gpu >= faiss.get_num_gpus():
        raise ConfigError(f"device {device!r}: FAISS sees {faiss.get_num_gpus()} GPU(s)")
    return gpu


def _new_index(kind: str, dim: int, n: int, nprobe: int | None) -> faiss.IndexIDMap2:
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, HNSW_M, ip)
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        nlist = ivf_nlist(n)
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            inner = faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
        elif kind == "ivfsq8":
            inner = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, ip)
        else:
            inner = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_subquantizers(dim), 8, ip)
            inner.pq.cp.seed = TRAIN_SEED
        inner.own_fields = True
        quantizer.this.disown()
        inner.cp.seed = TRAIN_SEED
        inner.nprobe = min(nlist, nprobe or default_nprobe(nlist))
    index = faiss.IndexIDMap2(inner)
    index.own_fields = True
    inner.this.disown()
    return index


def _inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index)


def _kind_of(index: faiss.Index) -> str | None:
    if not isinstance(index, faiss.IndexIDMap2) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    inner = _inner(index)
    # An IndexFlatIP, or the plain IndexFlat a GPU index copies back to, is an IndexFlat.
    for cls, kind in (
        (faiss.IndexFlat, "flat"),
        (faiss.IndexIVFPQ, "ivfpq"),
        (faiss.IndexIVFScalarQuantizer, "ivfsq8"),
        (faiss.IndexIVFFlat, "ivf"),
        (faiss.IndexHNSWFlat, "hnsw"),
    ):
        if isinstance(inner, cls):
            return kind
    return None


def _gpu_capable(kind: str, index: faiss.Index) -> bool:
    if kind == "hnsw":
        return False
    # GPU IVF refuses an nprobe past its k-selection limit when cloned: such an index searches on the CPU.
    if kind in ("ivf", "ivfpq") and _inner(index).nprobe > _GPU_MAX_K:
        return False
    if kind == "ivfpq":
        return _inner(index).pq.M in _GPU_PQ_CODE_BYTES
    return True


def _to_gpu(kind: str, index: faiss.Index, gpu: _Gpu) -> faiss.Index:
    options = faiss.GpuClonerOptions()
    # For IVFPQ this means float16 lookup tables, which GPU PQ needs past 48 code bytes to fit in
    # shared memory; for flat it would store float16 vectors, so it is left off there.
    options.useFloat16 = kind == "ivfpq"
    with gpu.lock:
        return faiss.index_cpu_to_gpu(gpu.resources, gpu.number, index, options)


def _as_ids(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)


def _empty(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Results widened to k columns, with -inf scores wherever the id is -1."""
    out_scores, out_ids = _empty(len(ids), k)
    width = min(k, ids.shape[1])
    out_ids[:, :width] = ids[:, :width]
    out_scores[:, :width] = np.where(ids[:, :width] >= 0, scores[:, :width], -np.inf)
    return out_scores, out_ids


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
    def ids(self) -> np.ndarray:
        """The tile ids in the index, in insertion order (read-only)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    @property
    def nprobe(self) -> int | None:
        """Inverted lists probed per query (IVF types), else None."""
        return int(_inner(self._cpu).nprobe) if self.index_type in IVF_TYPES else None

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
        candidates = self._present(allowed)
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

    def _present(self, allowed: np.ndarray) -> np.ndarray:
        """The sorted unique ids of ``allowed`` that are in the index."""
        allowed = np.unique(_as_ids(allowed))
        if self.ntotal == 0 or len(allowed) == 0:
            return allowed[:0]
        pos = np.minimum(np.searchsorted(self._sorted_ids, allowed), self.ntotal - 1)
        return allowed[self._sorted_ids[pos] == allowed]

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
        missing = np.setdiff1d(ids, self._present(ids))
        if len(missing):
            raise NotFound(f"tile ids not in the index: {missing[:10].tolist()}: re-run `histosearch index PATH`")
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._cpu.reconstruct_batch(ids)

    def save(self, path: Path) -> None:
        """Write the CPU form to ``path`` atomically (a temporary file beside it, then os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            faiss.write_index(self._cpu, str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path, device: str = "auto") -> VectorIndex:
        """Read an index written by ``save``, onto the GPU where ``device`` and the FAISS build allow."""
        path = Path(path)
        if not path.is_file():
            raise IndexUnavailable(f"{path}: no index file: run `histosearch index PATH` first")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise IndexUnavailable(
                f"{path}: not a readable FAISS index ({str(exc).splitlines()[-1]}): rebuild it with "
                "`histosearch index PATH`"
            ) from None
        if _kind_of(index) is None:
            raise IndexUnavailable(f"{path}: not a histosearch index: rebuild it with `histosearch index PATH`")
        return cls(index, _resolve_device(device))


@dataclass(frozen=True)
class _Loaded:
    stamp: tuple[int, int, int]
    build_id: int
    index: Any


class LiveIndex:
    """What a server holds: the live build, loaded lazily and reloaded when the pointer changes
    (one stat per call). Thread-safe: while one thread loads a new build, others keep using the old.

    ``load`` reads a build id into an index (a build of segments: ``segmented.SegmentedIndex.load``);
    by default the build's single ``index.faiss``. ``checksums``: a build's recorded sha256 (the store's
    ``build_checksum``), checked at each load.
    """

    def __init__(
        self,
        directory: IndexDirectory,
        device: str = "auto",
        checksums: Callable[[int], str | None] | None = None,
        load: Callable[[int], Any] | None = None,
    ) -> None:
        self.directory = directory
        self.device = device
        self.checksums = checksums
        self._load = load or (lambda build_id: VectorIndex.load(directory.build_path(build_id), device))
        self._loaded: _Loaded | None = None
        self._reload_lock = threading.Lock()

    @property
    def build_id(self) -> int | None:
        """The build id of the index ``get`` last returned."""
        loaded = self._loaded
        return loaded.build_id if loaded else None

    def get(self) -> Any:
        loaded = self._loaded
        if loaded is not None and loaded.stamp == self.directory.pointer_stamp():
            return loaded.index
        if not self._reload_lock.acquire(blocking=loaded is None):
            return loaded.index
        try:
            return self._reload()
        finally:
            self._reload_lock.release()

    def _reload(self) -> Any:
        # A few tries: two publishes in quick succession can remove the build the pointer named
        # between reading the pointer and loading the file.
        for _ in range(3):
            stamp = self.directory.pointer_stamp()
            loaded = self._loaded
            if loaded is not None and loaded.stamp == stamp:
                return loaded.index
            build_id = self.directory.live_build_id()
            if stamp is None or build_id is None:
                raise IndexUnavailable(f"no index in {self.directory.root}: run `histosearch index PATH` first")
            if loaded is not None and loaded.build_id == build_id:
                index = loaded.index
            else:
                if not self.directory.has_build(build_id):
                    continue
                expected = self.checksums(build_id) if self.checksums is not None else None
                if expected is not None and self.directory.checksum(build_id) != expected:
                    raise IndexUnavailable(
                        f"{self.directory.build_dir(build_id)}: damaged (it does not match its recorded checksum): "
                        f"{REPAIR}"
                    )
                index = self._load(build_id)
            self._loaded = _Loaded(stamp, build_id, index)
            return index
        raise IndexUnavailable(
            f"{self.directory.pointer} names build {self.directory.live_build_id()}, whose index file is "
            f"missing: {REPAIR}"
        )
