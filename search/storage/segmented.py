"""An index build made of index segments: one trained quantiser, a FAISS index per batch of added tiles,
and the ids deleted since, so that a publish adds and deletes instead of rebuilding.

A build folder (``index/builds/<id>/``) holds::

    manifest.json        index type, model, dimension, how many vectors trained the quantiser, the parts
    trained.faiss        the trained, empty index every part is cloned from (IVF types; absent for flat)
    part-<build>.faiss   an IndexIDMap2 over the tiles added by build <build> (hard links to earlier builds' parts)
    part-<build>.ids.npy its sorted tile ids, so a publish plans without loading the parts
    part-<build>.loc.npy where each of those tiles' stored vector lies in the vector files, so a re-rank
                         reads them with no database query (absent in builds from before it; -1 for a
                         vector kept in a database row)
    deleted.npy          sorted tile ids removed since their part was written

The manifest is written last, so a build without one was never finished (``build_writer.py`` writes
builds). This module reads them: a query searches every part and merges by (score, tile id); deleted ids
are dropped from the answers. Compressed types (``ivfsq8``, ``ivfpq``) fetch more candidates than asked
and re-rank them on the stored vectors, so shown scores are exact inner products with them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from search.core.errors import BadQuery, IndexUnavailable
from search.core.settings import Settings
from search.storage.index_directory import INDEX_FILE_NAME, MANIFEST_NAME, IndexDirectory
from search.storage.live import LiveIndex
from search.storage.vectors import (
    EXACT_FILTER_MAX,
    VectorIndex,
    _as_ids,
    _contained,
    _empty,
    _members,
    _pad,
    _positions,
    _sorted_unique,
)

if TYPE_CHECKING:
    from search.storage.store import Store

TRAINED_NAME = "trained.faiss"
DELETED_NAME = "deleted.npy"
FORMAT = 1
COMPRESSED = frozenset({"ivfpq", "ivfsq8"})
# Candidates re-ranked exactly per query for compressed types: at least this many, and k times the
# ``rerank_factor`` setting.
RERANK_MIN = 256
DEFAULT_RERANK_FACTOR: int = Settings.model_fields["rerank_factor"].default
# Searches of at most this many queries run on the calling thread alone.
SINGLE_THREAD_QUERIES = 4
# A part whose deleted ids are not all skipped by an over-fetch this deep is searched with a filter instead.
_MAX_FETCH = 4096
# Stored vectors scored per step of an exact search over candidates.
_SCORE_CHUNK = 8192
# Past this many candidates (a filter's tiles), they are first narrowed down in float16 (``_preselected``).
_PRESELECT_ABOVE = 2048
# The most a float16 inner product of unit vectors is off from the float32 one: ~1e-3, with room to spare.
_FLOAT16_ERROR = 2e-3

# (tile ids, model fingerprint) -> (the ids that have a stored vector, in order; their vectors [n, d]).
StoredVectors = Callable[[np.ndarray, str], tuple[list[int], np.ndarray]]
# Locations in the vector files (``Store.locate_embeddings``), dtype -> their vectors [n, d], no database read.
LocatedVectors = Callable[..., np.ndarray]


@dataclass(frozen=True)
class Manifest:
    index_type: str
    model_fingerprint: str
    dim: int
    trained_count: int
    parts: tuple[str, ...]
    deleted: int
    # Lists probed per query, chosen when the build was checked (``build_checks.tune_nprobe``); None: the
    # index type's default.
    nprobe: int | None = None

    @classmethod
    def read(cls, build_dir: Path) -> Manifest:
        path = build_dir / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            return cls(
                data["index_type"],
                data["model_fingerprint"],
                int(data["dim"]),
                int(data["trained_count"]),
                tuple(data["parts"]),
                int(data["deleted"]),
                int(data["nprobe"]) if data.get("nprobe") is not None else None,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexUnavailable(f"{path}: unreadable build manifest ({exc}): run `histosearch reindex`") from None

    def write(self, build_dir: Path) -> None:
        data = {"format": FORMAT, **self.__dict__, "parts": list(self.parts)}
        tmp = build_dir / f"{MANIFEST_NAME}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, build_dir / MANIFEST_NAME)


def _ids_name(part: str) -> str:
    return part.removesuffix(".faiss") + ".ids.npy"


def _locations_name(part: str) -> str:
    return part.removesuffix(".faiss") + ".loc.npy"


def _read_locations(build_dir: Path, part: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A part's (sorted ids, locations of their vectors), memory-mapped; None for a part written without."""
    path = build_dir / _locations_name(part)
    if not path.is_file():
        return None
    return np.load(build_dir / _ids_name(part), mmap_mode="r"), np.load(path, mmap_mode="r")


class SegmentedIndex:
    """The parts of one build searched as one index; ``search`` is safe to call from many threads."""

    def __init__(
        self,
        parts: list[VectorIndex],
        deleted: np.ndarray,
        manifest: Manifest,
        stored: StoredVectors | None = None,
        rerank_factor: int = DEFAULT_RERANK_FACTOR,
        locations: list[tuple[np.ndarray, np.ndarray] | None] | None = None,
        located: LocatedVectors | None = None,
    ) -> None:
        self.parts = parts
        self.deleted = np.unique(_as_ids(deleted))
        self.manifest = manifest
        self.index_type = manifest.index_type
        self.dim = manifest.dim
        self.device = parts[0].device if parts else "cpu"
        self._stored = stored
        self.rerank_factor = rerank_factor
        # Per part: (sorted ids, their locations), or None where the part was written without them.
        self._locations = locations if located is not None and locations else [None] * len(parts)
        self._located = located
        # Deleted ids per part: most parts have none and are searched as they are.
        self._part_deleted = [_members(self.deleted, p.sorted_ids) for p in parts]

    @property
    def ntotal(self) -> int:
        return sum(p.ntotal for p in self.parts) - len(self.deleted)

    @property
    def nprobe(self) -> int | None:
        return self.parts[0].nprobe if self.parts else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        for part in self.parts:
            part.nprobe = value

    @property
    def nlist(self) -> int | None:
        return self.parts[0].nlist if self.parts else None

    @property
    def compressed(self) -> bool:
        return self.index_type in COMPRESSED

    @property
    def exact_scores(self) -> bool:
        """Whether :meth:`search` scores are the exact inner products with the stored vectors (a compressed
        build re-ranks on them; a single-file one from before segments names no model to read them by)."""
        return not self.compressed or self._reranks

    @property
    def _reranks(self) -> bool:
        return self.compressed and self._stored is not None and bool(self.manifest.model_fingerprint)

    @property
    def ids(self) -> np.ndarray:
        """Sorted ids of the live (not deleted) vectors."""
        every = np.concatenate([p.ids for p in self.parts]) if self.parts else np.zeros(0, np.int64)
        return np.setdiff1d(every, self.deleted)

    @classmethod
    def load(
        cls,
        build_dir: Path,
        device: str = "auto",
        stored: StoredVectors | None = None,
        rerank_factor: int = DEFAULT_RERANK_FACTOR,
        located: LocatedVectors | None = None,
    ) -> SegmentedIndex:
        """Read a build folder; one holding only ``index.faiss`` (written before segments) is one part."""
        build_dir = Path(build_dir)
        if not (build_dir / MANIFEST_NAME).is_file():
            single = VectorIndex.load(build_dir / INDEX_FILE_NAME, device)
            legacy = Manifest(single.index_type, "", single.dim, single.ntotal, (INDEX_FILE_NAME,), 0)
            return cls([single], np.zeros(0, np.int64), legacy, stored, rerank_factor)
        manifest = Manifest.read(build_dir)
        parts = [VectorIndex.load(build_dir / name, device) for name in manifest.parts]
        deleted = np.load(build_dir / DELETED_NAME) if manifest.deleted else np.zeros(0, np.int64)
        locations = [_read_locations(build_dir, name) for name in manifest.parts]
        index = cls(parts, deleted, manifest, stored, rerank_factor, locations, located)
        if manifest.nprobe is not None:
            index.nprobe = manifest.nprobe
        return index

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k best (scores float32 [q,k], tile ids int64 [q,k]) over every part, best first, padded with
        -inf / -1; ``allowed`` as in :meth:`VectorIndex.search`. Compressed types re-rank on the stored vectors."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise BadQuery(f"query vectors of shape {queries.shape} do not match the index dimension {self.dim}")
        if k < 0:
            raise BadQuery(f"k must be >= 0, got {k}")
        if allowed is not None:
            allowed = _sorted_unique(_as_ids(allowed))
            if len(self.deleted):
                allowed = np.setdiff1d(allowed, self.deleted, assume_unique=True)
        if k == 0 or not self.parts:
            return _empty(len(queries), k)
        # One query is too little work to share between cores: on a busy machine OpenMP's fork and join
        # cost more than the search (an IVF query at 20k vectors: 0.8 ms on one thread, 30 ms on two).
        # The thread count is per calling thread, so other threads keep theirs.
        threads = faiss.omp_get_max_threads()
        if len(queries) <= SINGLE_THREAD_QUERIES:
            faiss.omp_set_num_threads(1)
        try:
            if not self._reranks:
                return self._merged(queries, k, allowed)
            if allowed is not None:
                present = self._present(allowed)
                # A filter that admits few tiles: score them all on the stored vectors, which is exact and
                # cheaper than decoding their codes and re-ranking those.
                if len(present) <= EXACT_FILTER_MAX:
                    return self._scored(queries, present, k)
            fetch = max(k * self.rerank_factor, RERANK_MIN)
            _, candidates = self._merged(queries, fetch, allowed)
            return self._rerank(queries, candidates, k)
        finally:
            faiss.omp_set_num_threads(threads)

    def _merged(self, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        found = [self._search_part(n, queries, k, allowed) for n in range(len(self.parts))]
        scores = np.hstack([s for s, _ in found])
        ids = np.hstack([i for _, i in found])
        return _best(scores, ids, k)

    def _search_part(
        self, n: int, queries: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        part, deleted = self.parts[n], self._part_deleted[n]
        if allowed is not None or len(deleted) == 0:
            return part.search(queries, k, allowed)
        live = part.ntotal - len(deleted)
        want = min(k, live)
        # Enough to hold k live ids at the part's share of deleted ones, with room to spare; deeper if not.
        fetch = min(part.ntotal, math.ceil(1.5 * k * part.ntotal / max(1, live)) + 16)
        while fetch <= _MAX_FETCH:
            scores, ids = part.search(queries, fetch)
            gone = _contained(ids, deleted)
            short = ((ids >= 0) & ~gone).sum(axis=1) < want
            # A row that got fewer ids than asked has had every probed list read: asking deeper finds no more,
            # and filtering by every live id (millions) would cost a second where the search took milliseconds.
            exhausted = (ids >= 0).sum(axis=1) < fetch
            if not (short & ~exhausted).any() or fetch >= part.ntotal:
                ids = np.where(gone, -1, ids)
                return _best(np.where(gone, -np.inf, scores), ids, k)
            fetch = min(part.ntotal, fetch * 4)
        return part.search(queries, k, np.setdiff1d(part.ids, deleted))

    def _present(self, allowed: np.ndarray) -> np.ndarray:
        """The sorted ids of ``allowed`` (deleted ones already dropped) that some part holds."""
        found = [part.present(allowed) for part in self.parts]
        return found[0] if len(found) == 1 else np.unique(np.concatenate(found))

    def _rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        out_scores, out_ids = _empty(len(queries), k)
        for row, (query, ids) in enumerate(zip(queries, candidates, strict=True)):
            out_scores[row], out_ids[row] = self._scored(query[None, :], ids[ids >= 0], k)
        return out_scores, out_ids

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, locations) of those ``ids`` whose part recorded where their vector lies, and the rest."""
        found, where, rest = [], [], ids
        for located in self._locations:
            if located is None or len(rest) == 0:
                continue
            part_ids, locations = located
            at, hit = _positions(part_ids, rest)
            places = locations[at[hit]]
            known = places >= 0
            found.append(rest[hit][known])
            where.append(places[known])
            rest = np.concatenate([rest[~hit], rest[hit][~known]])
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), rest
        return np.concatenate(found), np.concatenate(where), rest

    def stored_vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of those ``ids`` with a stored vector: read at the locations the parts recorded,
        the rest (parts written without locations) looked up in the store."""
        found, where, rest = self._locate(ids)
        ids_out, vectors = [found], [self._located(where) if len(found) else np.zeros((0, self.dim), np.float32)]
        if len(rest):
            more, more_vectors = self._stored(rest, self.manifest.model_fingerprint)
            if len(more):
                ids_out.append(np.asarray(more, dtype=np.int64))
                vectors.append(more_vectors)
        if len(ids_out) == 1:
            return ids_out[0], vectors[0]
        return np.concatenate(ids_out), np.vstack(vectors)

    def _preselected(self, queries: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
        """The sorted ids among ``ids`` that can be in some query's exact top k, found by scoring the stored
        float16 vectors in float16 (several times faster than converting them to float32 first).

        A float16 score is off by at most ~1e-3 (the query rounded to float16, then the result: 2^-11 each
        for unit vectors, accumulated in float32); keeping every id within ``2 * _FLOAT16_ERROR`` of the k-th
        best float16 score keeps every id of the exact top k. Ids without a recorded location are kept."""
        import torch  # the engine's process has it loaded for the encoder; the storage layer only needs it here

        found, where, rest = self._locate(ids)
        keep = [rest]
        query_half = torch.from_numpy(np.ascontiguousarray(queries.T)).half()
        for start in range(0, len(found), _SCORE_CHUNK):
            rows = self._located(where[start : start + _SCORE_CHUNK], np.float16)
            approx = (torch.from_numpy(rows) @ query_half).float().numpy()  # [n, q]
            chunk = found[start : start + _SCORE_CHUNK]
            if len(chunk) <= k:
                keep.append(chunk)
                continue
            kth = np.partition(approx, len(chunk) - k, axis=0)[len(chunk) - k]  # per query
            keep.append(chunk[(approx >= kth - 2 * _FLOAT16_ERROR).any(axis=1)])
        return np.unique(np.concatenate(keep))

    def _scored(self, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best of ``ids`` per query by the exact inner product with their stored vectors, ties by id;
        a tile whose vector is gone (deleted since this build) is left out."""
        if len(ids) > _PRESELECT_ABOVE and self._located is not None:
            ids = self._preselected(queries, ids, k)
        best_scores, best_ids = _empty(len(queries), 0)
        # A chunk at a time: a filter can admit tens of thousands of tiles, whose float32 copies would not
        # stay in cache (and would take a GB at the largest).
        for start in range(0, len(ids), _SCORE_CHUNK):
            found, vectors = self.stored_vectors(ids[start : start + _SCORE_CHUNK])
            if len(found):
                scores = np.hstack([best_scores, queries @ vectors.T])
                both = np.hstack([best_ids, np.broadcast_to(found, (len(queries), len(found)))])
                best_scores, best_ids = _best(scores, both, k)
        return _pad(best_scores, best_ids, k)


def _best(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row the k best (score, id) pairs, ties by id; -1 ids last; padded to k columns."""
    out_scores, out_ids = _empty(len(ids), k)
    for row in range(len(ids)):
        valid = ids[row] >= 0
        row_ids, row_scores = ids[row][valid], scores[row][valid]
        if len(row_scores) > 4 * k > 0:
            # Only the scores at or above the k-th best can be in the answer (ties with it included).
            keep = row_scores >= np.partition(row_scores, len(row_scores) - k)[len(row_scores) - k]
            row_ids, row_scores = row_ids[keep], row_scores[keep]
        order = np.lexsort((row_ids, -row_scores))[:k]
        out_scores[row, : len(order)] = row_scores[order]
        out_ids[row, : len(order)] = row_ids[order]
    return out_scores, out_ids


def live_tile_index(
    index_directory: IndexDirectory, store: Store, device: str, rerank_factor: int = DEFAULT_RERANK_FACTOR
) -> LiveIndex:
    """The live tile index of a data dir: builds of segments, re-ranked on the store's vectors, checksums checked."""
    return LiveIndex(
        index_directory,
        device,
        checksums=store.build_checksum,
        load=lambda build_id: SegmentedIndex.load(
            index_directory.build_dir(build_id),
            device,
            stored=lambda tile_ids, fingerprint: store.find_embeddings(tile_ids.tolist(), fingerprint),
            rerank_factor=rerank_factor,
            located=store.read_located,
        ),
    )
