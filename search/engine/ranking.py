"""Ranking: the nearest tiles of the live index to a query vector, and the hit a result list holds."""

from __future__ import annotations

from typing import Any

import numpy as np

from search.core.errors import BadQuery
from search.storage.live import LiveIndex
from search.storage.store import Store

from .cache import LRU
from .filters import Filters

# Pages are served down to this rank: deeper paging would make FAISS return ever larger k.
MAX_DEPTH = 10_000
# Filtered queries keep the admitted ids of their filters, up to this many ids in all (8 bytes each).
ALLOWED_CACHE_IDS = 4_000_000


def check_page(k: int, offset: int, max_k: int) -> None:
    """Refuse a page outside 1 <= k <= ``max_k`` (the setting) or deeper than ``MAX_DEPTH``."""
    if not 1 <= k <= max_k:
        raise BadQuery(f"k must be between 1 and {max_k} (setting max_k), got {k}")
    if offset < 0:
        raise BadQuery(f"offset must be 0 or more, got {offset}")
    if offset + k > MAX_DEPTH:
        raise BadQuery(f"results are served down to rank {MAX_DEPTH}; offset + k is {offset + k}")


class AllowedIds:
    """The sorted tile ids a filter admits, kept per live build.

    Reading them is most of a filtered query's time (a case holds thousands of tiles), and a user pages and
    re-queries within one case. The ids are read when the build is live; tiles added since are not in its
    index, and tiles deleted since drop out of the hits as they do without a filter."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache = LRU(ALLOWED_CACHE_IDS)

    def __call__(self, build_id: int | None, filters: Filters) -> np.ndarray:
        key = (build_id, filters.source, filters.slide, filters.case, tuple(sorted(filters.meta.items())))
        allowed = self._cache.get(key)
        if allowed is None:
            allowed = self.store.tile_ids_matching(filters.source, filters.slide, filters.case, dict(filters.meta))
            allowed.flags.writeable = False  # shared between threads
            self._cache.put(key, allowed, size=max(1, len(allowed)))
        return allowed


def nearest(
    live_index: LiveIndex,
    allowed_ids: AllowedIds,
    vector: np.ndarray,
    depth: int,
    filters: Filters | None,
    exclude: int | None = None,
) -> tuple[list[tuple[int, float]], int]:
    """The ``depth`` nearest (id, score) pairs, best first, and how many tiles were searchable."""
    index = live_index.get()
    allowed = None
    total = index.ntotal
    if filters:
        allowed = allowed_ids(live_index.build_id, filters)
        total = len(allowed)
        if total == 0:
            return [], 0
    ask = min(depth + (exclude is not None), total)
    scores, ids = index.search(vector[None, :].astype(np.float32), ask, allowed=allowed)
    hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0 and i != exclude]
    if exclude is not None and total:
        total -= 1
    return hits[:depth], total


def hits_of(store: Store, pairs: list[tuple[int, float]], first_rank: int = 1) -> list[dict]:
    """(id, score) pairs as hits, ranked from ``first_rank``; a tile deleted since the build is skipped
    until the next reindex."""
    tiles = {t["id"]: t for t in store.get_tiles([i for i, _ in pairs])}
    return [hit(tiles[i], score, rank) for rank, (i, score) in enumerate(pairs, start=first_rank) if i in tiles]


def hit(tile: dict, score: float | None = None, rank: int | None = None) -> dict:
    """A tile as one result: its id, score and rank, and where it lies (source, slide, case, position)."""
    out: dict[str, Any] = {"tile_id": tile["id"]}
    if score is not None:
        out.update(score=score, rank=rank)
    out.update(
        source=tile["source"]["uri"],
        path=tile["path"],
        slide=tile["slide_key"],
        case=tile["case_key"],
        level=tile["level"],
        x=tile["x"],
        y=tile["y"],
        width=tile["width"],
        height=tile["height"],
        mpp=tile["mpp"],
        meta=tile["meta"],
        content_hash=tile["content_hash"],
    )
    return out


def top(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest scores, best first."""
    if len(scores) <= k:
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]
