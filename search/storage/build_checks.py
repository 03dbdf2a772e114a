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


def exact_top(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Tile ids [q, k] of the exact top-k inner products, a chunk of rows at a time."""
    chunks = (
        (ids[start : start + _CHUNK], vectors[start : start + _CHUNK]) for start in range(0, len(vectors), _CHUNK)
    )
    return exact_top_chunks(queries, chunks, k)


def exact_top_chunks(queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """Like :func:`exact_top` over (ids, vectors) chunks streamed from the store, so no whole matrix is held."""
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


def _recall(index: VectorIndex, queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray) -> float | None:
    if len(queries) == 0:
        return None
    k = min(RECALL_K, len(ids))
    truth = exact_top(queries, vectors, ids, k)
    _, found = index.search(queries, k)
    hits = [len(set(t.tolist()) & set(f.tolist())) for t, f in zip(truth, found, strict=True)]
    return float(np.mean(hits) / k)


def measure_recall(
    index: VectorIndex, ids: np.ndarray, vectors: np.ndarray, text_vectors: np.ndarray, queries: int
) -> Recall:
    """Recall@10 of ``index`` against exact search over (``ids``, ``vectors``), the index's own content.

    The queries are ``queries`` stored vectors drawn with a fixed seed and up to as many ``text_vectors``
    (the vocabulary), so two builds of the same content are measured on the same queries."""
    rng = np.random.default_rng(SAMPLE_SEED)
    rows = np.sort(rng.choice(len(ids), min(queries, len(ids)), replace=False))
    texts = text_vectors[np.sort(rng.choice(len(text_vectors), min(queries, len(text_vectors)), replace=False))]
    images = _recall(index, vectors[rows], vectors, ids)
    text = _recall(index, texts, vectors, ids) if len(texts) and texts.shape[1] == vectors.shape[1] else None
    parts = [(r, n) for r, n in ((images, len(rows)), (text, len(texts))) if r is not None]
    total = sum(n for _, n in parts)
    overall = sum(r * n for r, n in parts) / total if total else 1.0
    return Recall(overall, images, text, total)


def draw_calibration_sample(vectors: np.ndarray, size: int) -> np.ndarray:
    """Stored vectors of ``size`` tiles drawn at random with a fixed seed: the build's calibration sample."""
    rows = np.sort(np.random.default_rng(SAMPLE_SEED).choice(len(vectors), min(size, len(vectors)), replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


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
    recall = measure_recall(index, ids, vectors, text_vectors, recall_queries)
    sample = draw_calibration_sample(vectors, calibration_size)
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


def check_segmented_build(
    index,
    ids: np.ndarray,
    chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    stored: Callable[[np.ndarray], np.ndarray],
    text_vectors: np.ndarray,
    *,
    calibration_size: int,
    recall_queries: int,
) -> tuple[Recall, np.ndarray]:
    """Recall@10 and the calibration sample of a build of segments, reading stored vectors in chunks.

    The same fixed-seed draws as :func:`measure_recall` and :func:`draw_calibration_sample`, over the store's
    ids instead of a matrix in memory: a build of millions of tiles is checked without holding its vectors."""
    rng = np.random.default_rng(SAMPLE_SEED)
    rows = np.sort(rng.choice(len(ids), min(recall_queries, len(ids)), replace=False))
    texts = text_vectors[np.sort(rng.choice(len(text_vectors), min(recall_queries, len(text_vectors)), replace=False))]
    k = min(RECALL_K, len(ids))

    def recall(queries: np.ndarray) -> float | None:
        if len(queries) == 0:
            return None
        truth = exact_top_chunks(queries, chunks(), k)
        _, found = index.search(queries, k)
        return float(np.mean([len(set(t.tolist()) & set(f.tolist())) for t, f in zip(truth, found, strict=True)]) / k)

    dim = index.dim
    images = recall(stored(ids[rows]).astype(np.float32))
    text = recall(texts.astype(np.float32)) if len(texts) and texts.shape[1] == dim else None
    parts = [(r, n) for r, n in ((images, len(rows)), (text, len(texts))) if r is not None]
    total = sum(n for _, n in parts)
    overall = sum(r * n for r, n in parts) / total if total else 1.0
    sample_rows = np.sort(
        np.random.default_rng(SAMPLE_SEED).choice(len(ids), min(calibration_size, len(ids)), replace=False)
    )
    sample = np.ascontiguousarray(stored(ids[sample_rows]), dtype=np.float32)
    return Recall(overall, images, text, total), sample
