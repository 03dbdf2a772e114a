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
from search.storage.vectors import VectorIndex

CALIBRATION_FILE = "calibration.npy"
RECALL_K = 10
SAMPLE_SEED = 10
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


def exact_top(queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """Tile ids [q, k] of the exact top-k inner products over (ids, vectors) chunks, so no whole matrix is held."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for chunk_ids_, chunk in chunks:
        scores = np.hstack([best_scores, queries @ np.asarray(chunk, np.float32).T])
        chunk_ids = np.hstack([best_ids, np.broadcast_to(chunk_ids_, (len(queries), len(chunk)))])
        keep = min(k, scores.shape[1])
        part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        best_scores = np.take_along_axis(scores, part, axis=1)
        best_ids = np.take_along_axis(chunk_ids, part, axis=1)
    return best_ids


def _sample_rows(n: int, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    rng = rng if rng is not None else np.random.default_rng(SAMPLE_SEED)
    return np.sort(rng.choice(n, min(size, n), replace=False))


def measure_recall(
    index,
    ids: np.ndarray,
    chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    vectors_at: Callable[[np.ndarray], np.ndarray],
    text_vectors: np.ndarray,
    queries: int,
) -> Recall:
    """Recall@10 of ``index`` against exact search over its own content: ``ids``, whose vectors ``chunks()``
    streams as (ids, vectors) pairs and ``vectors_at(rows)`` reads by row.

    The queries are ``queries`` stored vectors drawn with a fixed seed and up to as many ``text_vectors``
    (the vocabulary), so two builds of the same content are measured on the same queries."""
    rng = np.random.default_rng(SAMPLE_SEED)
    rows = _sample_rows(len(ids), queries, rng)
    texts = text_vectors[_sample_rows(len(text_vectors), queries, rng)]
    k = min(RECALL_K, len(ids))

    def recall(query_vectors: np.ndarray) -> float | None:
        if len(query_vectors) == 0:
            return None
        truth = exact_top(query_vectors, chunks(), k)
        _, found = index.search(query_vectors, k)
        hits = [len(set(t.tolist()) & set(f.tolist())) for t, f in zip(truth, found, strict=True)]
        return float(np.mean(hits) / k)

    image_queries = np.asarray(vectors_at(rows), np.float32)
    images = recall(image_queries)
    same_space = len(texts) and texts.shape[1] == image_queries.shape[1]
    text = recall(np.asarray(texts, np.float32)) if same_space else None
    parts = [(r, n) for r, n in ((images, len(rows)), (text, len(texts))) if r is not None]
    total = sum(n for _, n in parts)
    overall = sum(r * n for r, n in parts) / total if total else 1.0
    return Recall(overall, images, text, total)


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
    recall = measure_recall(index, ids, in_memory(ids, vectors), vectors.__getitem__, text_vectors, recall_queries)
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
