"""Ranked lists for evaluation: exact brute force over the set's own vectors, or the live FAISS index.

Both answer the same question: for each query vector, the database positions of the ``depth``
best items, best first, with the items of the query's own group (its case, slide or itself) left out
and -1 padding where fewer remain. The exact ranker breaks ties against the query (wrong labels first);
the index ranker keeps whatever order the index returns, as a user would see it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from search.storage.vectors import VectorIndex

# Queries scored at once by the exact ranker: bounds memory to (this x database) floats.
_QUERY_CHUNK = 512


def rank_exact(
    queries: np.ndarray,
    database: np.ndarray,
    depth: int,
    *,
    query_groups: np.ndarray | None = None,
    db_groups: np.ndarray | None = None,
    query_labels: np.ndarray | None = None,
    db_labels: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """int64 [n, depth] database positions by inner product, excluding items with the query's group."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    database = np.ascontiguousarray(database, dtype=np.float32)
    out = np.full((len(queries), depth), -1, np.int64)
    if len(database) == 0 or depth == 0:
        return out
    for start in range(0, len(queries), _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, len(queries))
        scores = queries[start:stop] @ database.T
        if query_groups is not None and db_groups is not None:
            scores[query_groups[start:stop, None] == db_groups[None, :]] = -np.inf
        relevant = None
        if query_labels is not None and db_labels is not None:
            relevant = query_labels[start:stop, None] == db_labels[None, :]
        for row in range(stop - start):
            out[start + row] = _top(scores[row], depth, None if relevant is None else relevant[row])
        if progress is not None:
            progress(stop - start)
    return out


def _top(scores: np.ndarray, depth: int, relevant: np.ndarray | None) -> np.ndarray:
    finite = np.isfinite(scores)
    if depth < finite.sum():
        threshold = -np.partition(-scores, depth - 1)[depth - 1]
        candidates = np.flatnonzero(finite & (scores >= threshold))
    else:
        candidates = np.flatnonzero(finite)
    keys = (-scores[candidates],) if relevant is None else (relevant[candidates], -scores[candidates])
    chosen = candidates[np.lexsort(keys)][:depth]
    row = np.full(depth, -1, np.int64)
    row[: len(chosen)] = chosen
    return row


def rank_index(
    index: VectorIndex,
    queries: np.ndarray,
    db_ids: np.ndarray,
    depth: int,
    *,
    allowed: np.ndarray | None = None,
    query_groups: np.ndarray | None = None,
    db_groups: np.ndarray | None = None,
    batch: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Like :func:`rank_exact`, through ``index.search`` (its ANN, and its filter path with ``allowed``).

    ``db_ids`` are the tile ids of the database positions; hits outside them are dropped. The index
    is asked for ``depth`` plus the largest group, so that leaving out the query's own group still
    leaves ``depth`` items whenever the index returns them.
    """
    db_ids = np.asarray(db_ids, dtype=np.int64)
    out = np.full((len(queries), depth), -1, np.int64)
    if len(db_ids) == 0 or depth == 0:
        return out
    order = np.argsort(db_ids, kind="stable")
    sorted_ids = db_ids[order]
    excluding = query_groups is not None and db_groups is not None
    extra = int(np.bincount(db_groups).max()) if excluding and len(db_groups) else 0
    available = index.ntotal if allowed is None else len(allowed)
    ask = min(depth + extra, available)
    for start in range(0, len(queries), batch):
        chunk = np.asarray(queries[start : start + batch], dtype=np.float32)
        _, ids = index.search(chunk, ask, allowed=allowed)
        slot = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
        positions = np.where((ids >= 0) & (sorted_ids[slot] == ids), order[slot], -1)
        if excluding:
            own = query_groups[start : start + len(chunk), None]
            positions = np.where((positions >= 0) & (db_groups[np.clip(positions, 0, None)] == own), -1, positions)
        for row, found in enumerate(positions):
            kept = found[found >= 0][:depth]
            out[start + row, : len(kept)] = kept
        if progress is not None:
            progress(len(chunk))
    return out
