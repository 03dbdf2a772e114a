"""What every index build is checked against before it is published, and what it carries for scoring.

- Recall@10 of the new index against exact search, on a fixed sample of its own stored vectors and of
  the vocabulary texts' vectors (text queries lie outside the image distribution, where approximate
  indexes do worst). A build below the ``min_recall`` setting is not published.
- A calibration sample: stored vectors of a fixed random sample of the index, drawn once per build and
  kept beside it, against which the engine calibrates a query's scores (``search.engine.calibration``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from search.core.errors import BuildRejected
from search.storage.index_directory import IndexDirectory
from search.storage.store import Store
from search.storage.vectors import VectorIndex, _pad

CALIBRATION_FILE = "calibration.npy"
RECALL_K = 10
# Exact answers kept per recall query with a build (``RecallTruth``).
TRUTH_K = 2 * RECALL_K
TRUTH_FILE = "recall_truth.npz"
SAMPLE_SEED = 10
# The fewest lists a tuned IVF index probes: below this, a query near a list boundary misses too easily for
# the recall queries' figure to speak for the queries users type.
MIN_NPROBE = 8
# The most a tuning raises nprobe over the index type's default, in factors of that default.
MAX_NPROBE_GROWTH = 8
# Rows scored at once by the exact reference search.
_CHUNK = 65_536


@dataclass(frozen=True)
class Recall:
    """Recall@10 of an index against exact search, overall and per query kind."""

    recall: float
    images: float | None
    texts: float | None
    queries: int

    def as_dict(self) -> dict:
        return {"recall_at_10": self.recall, "image_recall": self.images, "text_recall": self.texts,
                "recall_queries": self.queries}  # fmt: skip


def exact_top(
    queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32 [q, k], tile ids int64 [q, k]) of the exact top-k inner products over (ids, vectors)
    chunks, best first, padded with -inf / -1; no whole matrix is held."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for chunk_ids_, chunk in chunks:
        scores = np.hstack([best_scores, queries @ np.asarray(chunk, np.float32).T])
        chunk_ids = np.hstack([best_ids, np.broadcast_to(chunk_ids_, (len(queries), len(chunk)))])
        keep = min(k, scores.shape[1])
        part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        best_scores = np.take_along_axis(scores, part, axis=1)
        best_ids = np.take_along_axis(chunk_ids, part, axis=1)
    return _sorted_padded(best_scores, best_ids, k)


def _sorted_padded(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return _pad(np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1), k)


def _sample_rows(n: int, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    rng = rng if rng is not None else np.random.default_rng(SAMPLE_SEED)
    return np.sort(rng.choice(n, min(size, n), replace=False))


@dataclass(frozen=True)
class RecallTruth:
    """A build's recall queries and their exact answers, kept with the build so that the next incremental
    publish updates the answers from the tiles it adds and removes instead of scanning every stored vector
    (at 10M tiles two full scans took minutes; the +1 % publish has a minute).

    ``texts`` marks the vocabulary queries; ``ids`` / ``scores`` hold each query's exact top ``TRUTH_K``
    (twice recall's k, so removals leave enough), best first, padded with -1 / -inf."""

    queries: np.ndarray
    texts: np.ndarray
    ids: np.ndarray
    scores: np.ndarray

    def save(self, path: Path) -> None:
        tmp = path.with_name(f"{path.name}.tmp.npz")
        np.savez(tmp, queries=self.queries, texts=self.texts, ids=self.ids, scores=self.scores)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> RecallTruth | None:
        """The truth kept with a build, or None for a build from before it (or without one)."""
        try:
            with np.load(path) as f:
                return cls(f["queries"], f["texts"], f["ids"], f["scores"])
        except (FileNotFoundError, KeyError, ValueError, OSError):
            return None

    def updated(
        self, added: Iterable[tuple[np.ndarray, np.ndarray]], removed: np.ndarray, n: int
    ) -> RecallTruth | None:
        """The exact answers after ``removed`` ids left and ``added`` (ids, vectors) joined a collection of
        ``n`` tiles; None when a removal leaves some query fewer answers than recall needs."""
        gone = np.isin(self.ids, removed) | (self.ids < 0)
        if ((~gone).sum(axis=1) < min(RECALL_K, n)).any():
            return None
        scores = np.where(gone, -np.inf, self.scores).astype(np.float32)
        ids = np.where(gone, -1, self.ids)
        new_scores, new_ids = exact_top(self.queries, added, TRUTH_K)
        scores, ids = _sorted_padded(np.hstack([scores, new_scores]), np.hstack([ids, new_ids]), TRUTH_K)
        return RecallTruth(self.queries, self.texts, ids, scores)


def measure_recall(
    index,
    ids: np.ndarray,
    chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    vectors_at: Callable[[np.ndarray], np.ndarray],
    text_vectors: np.ndarray,
    queries: int,
    truth: RecallTruth | None = None,
) -> tuple[Recall, RecallTruth]:
    """Recall@10 of ``index`` against exact search over its own content: ``ids``, whose vectors ``chunks()``
    streams as (ids, vectors) pairs and ``vectors_at(rows)`` reads by row; also the truth to keep with it.

    The queries are ``queries`` stored vectors drawn with a fixed seed and up to as many ``text_vectors``
    (the vocabulary), so two builds of the same content are measured on the same queries. ``truth``, the
    previous build's answers already brought up to date (:meth:`RecallTruth.updated`), spares the scan."""
    k = min(RECALL_K, len(ids))
    if truth is None:
        rng = np.random.default_rng(SAMPLE_SEED)
        rows = _sample_rows(len(ids), queries, rng)
        texts = text_vectors[_sample_rows(len(text_vectors), queries, rng)]
        image_queries = np.asarray(vectors_at(rows), np.float32)
        if not (len(texts) and texts.shape[1] == image_queries.shape[1]):
            texts = np.zeros((0, image_queries.shape[1]), np.float32)
        all_queries = np.vstack([image_queries, np.asarray(texts, np.float32)])
        is_text = np.arange(len(all_queries)) >= len(image_queries)
        # One pass over the stored vectors answers both kinds of query.
        scores, answers = exact_top(all_queries, chunks(), TRUTH_K)
        truth = RecallTruth(all_queries, is_text, answers, scores)
    return recall_against(index, truth, k), truth


def recall_against(index, truth: RecallTruth, k: int = RECALL_K) -> Recall:
    """Recall@k of ``index`` on ``truth``'s queries, overall and per kind of query."""
    _, found = index.search(truth.queries, k) if len(truth.queries) else (None, np.zeros((0, k), np.int64))
    hits = np.array(
        [len(set(t[:k].tolist()) & set(f.tolist())) / max(k, 1) for t, f in zip(truth.ids, found, strict=True)]
    )
    images = float(hits[~truth.texts].mean()) if (~truth.texts).any() else None
    text = float(hits[truth.texts].mean()) if truth.texts.any() else None
    overall = float(hits.mean()) if len(hits) else 1.0
    return Recall(overall, images, text, len(hits))


def nprobe_ladder(nlist: int, current: int) -> list[int]:
    """The nprobe values a tuning tries: steps of about sqrt(2) from ``MIN_NPROBE`` up to ``nlist``, and
    ``current``."""
    steps = {min(nlist, round(2 ** (i / 2))) for i in range(2 * int(np.log2(max(nlist, 2))) + 2)}
    return sorted(v for v in steps | {nlist, current} if v >= min(MIN_NPROBE, nlist))


def tune_nprobe(index, truth: RecallTruth, target: float, measured: Recall) -> Recall:
    """Set ``index.nprobe`` to the fewest lists whose recall@10 on ``truth`` reaches ``target``, or to the
    best tried when none does; ``measured`` is the recall at the index's current nprobe. Returns the recall at
    the nprobe set.

    Recall rises with nprobe: below a current nprobe that reaches the target, a binary search finds the
    fewest lists; above one that does not, nprobe doubles (up to ``MAX_NPROBE_GROWTH`` times, since each
    doubling doubles the cost of every query) until it does. Each step is one search of the recall queries,
    no scan of the stored vectors."""
    current = index.nprobe
    ladder = nprobe_ladder(index.nlist, current)
    known = {current: measured}

    def at(position: int) -> Recall:
        nprobe = ladder[position]
        if nprobe not in known:
            index.nprobe = nprobe
            known[nprobe] = recall_against(index, truth)
        return known[nprobe]

    lo = hi = ladder.index(current)
    if measured.recall >= target:
        lo = 0
    else:
        # Up in doublings (two ladder steps) until the target is reached: hi passes, lo below it fails.
        while at(hi).recall < target and hi < len(ladder) - 1 and ladder[hi] < MAX_NPROBE_GROWTH * current:
            lo, hi = hi + 1, min(hi + 2, len(ladder) - 1)
        if at(hi).recall < target:
            best = max(known, key=lambda n: (known[n].recall, -n))
            index.nprobe = best
            return known[best]
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid).recall >= target:
            hi = mid
        else:
            lo = mid + 1
    index.nprobe = ladder[hi]
    return at(hi)


def in_memory(ids: np.ndarray, vectors: np.ndarray) -> Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]:
    """``chunks`` for :func:`measure_recall` over a matrix already in memory."""
    return lambda: ((ids[i : i + _CHUNK], vectors[i : i + _CHUNK]) for i in range(0, len(vectors), _CHUNK))


def draw_calibration_sample(n: int, size: int, vectors_at: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Stored vectors of ``size`` of the ``n`` tiles drawn at random with a fixed seed: the calibration sample."""
    return np.ascontiguousarray(vectors_at(_sample_rows(n, size)), dtype=np.float32)


def save_calibration_sample(path: Path, sample: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, sample)
    tmp.replace(path)


def load_calibration_sample(path: Path) -> np.ndarray | None:
    """The sample saved with a build, or None for a build from before calibration existed."""
    try:
        return np.load(path)
    except FileNotFoundError:
        return None


def publish_build(
    store: Store,
    directory: IndexDirectory,
    index: VectorIndex,
    ids: np.ndarray,
    vectors: np.ndarray,
    fingerprint: str,
    *,
    calibration_size: int,
    min_recall: float,
    recall_queries: int,
) -> dict:
    """Check a new build (recall@10 vs exact, on the model's vocabulary too), save it with its calibration
    sample and publish it; a build below ``min_recall`` is recorded as failed and BuildRejected raised."""
    _, text_vectors = store.text_matrix(fingerprint)
    recall, _ = measure_recall(index, ids, in_memory(ids, vectors), vectors.__getitem__, text_vectors, recall_queries)
    sample = draw_calibration_sample(len(ids), calibration_size, vectors.__getitem__)
    checks = {**recall.as_dict(), "min_recall": min_recall, "calibration_sample": len(sample)}
    build_id = store.add_build(fingerprint, index.index_type, index.ntotal, "", index.device, checks)
    if recall.recall < min_recall:
        store.set_build_status(build_id, "failed")
        raise BuildRejected(
            f"index build {build_id} ({index.index_type}, {index.ntotal} vectors) has recall@10 {recall.recall:.3f} "
            f"against exact search, below the floor {min_recall} (setting min_recall): it was not published and the "
            "previous index stays live; build an exact index (--index-type flat) or raise nprobe"
        )
    index.save(directory.build_path(build_id))
    store.set_build_checksum(build_id, directory.checksum(build_id))
    save_calibration_sample(directory.build_file(build_id, CALIBRATION_FILE), sample)
    directory.publish(build_id)
    store.set_build_status(build_id, "live")
    return store.live_build()
