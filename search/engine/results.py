"""A page of ranked results: exact scores, spread across slides, calibrated and explained.

1. The live index returns candidates with exact scores: flat and IVF-Flat score exactly, and a compressed
   build over-fetches ``rerank_factor`` times and re-ranks on the stored vectors itself (``segmented.py``).
2. Only a compressed build from before segments (no stored vectors named) is over-fetched and re-scored here,
   so the scores shown are exact whatever the index type.
3. Hits are flagged when their scale (um/px) is far from the query's, and dropped with ``same_scale``.
4. Adjacent tiles of a slide are merged, each slide capped at ``max_per_slide`` results, and for
   "exclude this case" the query tile's case left out (``spread.py``). When that leaves the page short,
   the search goes deeper.
5. The page's hits get calibrated scores (``calibration.py``) and their best terms (``explain.py``).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from collections import Counter

import numpy as np

from search.core.settings import Settings
from search.storage.live import LiveIndex
from search.storage.store import Store

from .cache import CACHE_SECONDS, LRU
from .calibration import Calibration
from .explain import Explainer
from .filters import Filters
from .options import SearchOptions
from .query import Query
from .ranking import MAX_DEPTH, AllowedIds, hits_of, nearest
from .spread import spread

# How much deeper than the page a spread search looks at first, and grows by when the page comes up short.
SPREAD_DEPTH = 2
GROWTH = 4
# Grid steps of this many slides are kept per build (a slide's grid does not change within a build).
STEP_CACHE_SIZE = 100_000
# Result pages kept for a repeated query (paging back, a shared link opened again, a reload).
PAGE_CACHE_SIZE = 1000


def rerank(
    store: Store, query: Query, pairs: list[tuple[int, float]], rescore: bool = True
) -> tuple[list[tuple[int, float]], dict]:
    """``pairs`` re-scored by the exact cosine of their stored vectors, best first (ties by id), or as they
    are when their scores are exact already (``rescore=False``); tiles with no stored vector (deleted since
    the build) are left out. Also returns {id: vector}."""
    ids, vectors = store.find_embeddings([i for i, _ in pairs], query.build["model_fingerprint"])
    if not ids:
        return [], {}
    if not rescore:
        kept = set(ids)
        return [p for p in pairs if p[0] in kept], dict(zip(ids, vectors, strict=True))
    scores = vectors @ query.vector.astype(np.float32)
    order = sorted(range(len(ids)), key=lambda n: (-scores[n], ids[n]))
    return [(ids[n], float(scores[n])) for n in order], dict(zip(ids, vectors, strict=True))


def scale_mismatch(query_mpp: float | None, hit_mpp: float | None, tolerance: float) -> bool | None:
    """Whether a hit's um/px is more than ``tolerance`` times off the query's; None when either is unknown."""
    if not query_mpp or not hit_mpp:
        return None
    ratio = hit_mpp / query_mpp
    return bool(ratio > tolerance or ratio < 1 / tolerance)


class ResultPages:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        live_index: LiveIndex,
        allowed_ids: AllowedIds,
        calibration: Calibration,
        explainer: Explainer,
    ) -> None:
        self.settings = settings
        self.store = store
        self.live_index = live_index
        self.allowed_ids = allowed_ids
        self.calibration = calibration
        self.explainer = explainer
        self._steps_cache = LRU(STEP_CACHE_SIZE)
        self._pages = LRU(PAGE_CACHE_SIZE)

    def _steps(self, build_id: int, hits: list[dict]) -> dict[tuple[str, int | None], tuple[int, int]]:
        """Grid steps of the hits' slides (those with positions), read once per slide and build."""
        # Only a slide with two hits or more can have adjacent ones to merge: the others need no step (reading
        # steps scans every tile of a slide, ~30 ms a query at 10M tiles when each hit is on another slide).
        counts = Counter(h["slide"] for h in hits if h["slide"] and h["x"] is not None)
        slides = {slide for slide, n in counts.items() if n > 1}
        missing = [s for s in slides if self._steps_cache.get((build_id, s)) is None]
        if missing:
            found = self.store.grid_steps(missing)
            for slide in missing:
                self._steps_cache.put((build_id, slide), {k: v for k, v in found.items() if k[0] == slide})
        steps: dict[tuple[str, int | None], tuple[int, int]] = {}
        for slide in slides:
            steps.update(self._steps_cache.get((build_id, slide)))
        return steps

    def page(self, query: Query, k: int, offset: int, filters: Filters | None, options: SearchOptions) -> dict:
        """A page of results; a page asked again within ``CACHE_SECONDS`` under the same live build is served
        from memory (a copy: callers may add to it)."""
        key = (
            query.build["id"],
            hashlib.sha256(np.ascontiguousarray(query.vector, dtype=np.float32).tobytes()).hexdigest(),
            json.dumps([query.names, query.exclude, query.mpp, query.words], sort_keys=True, default=str),
            k,
            offset,
            json.dumps((filters or Filters()).to_dict(), sort_keys=True),
            json.dumps(options.to_dict(), sort_keys=True, default=str),
        )
        cached = self._pages.get(key)
        if cached is None or time.monotonic() - cached[0] > CACHE_SECONDS:
            cached = (time.monotonic(), self._page(query, k, offset, filters, options))
            self._pages.put(key, cached)
        # A pickle round trip copies a page of plain dicts and lists ~5x faster than copy.deepcopy (in C); the
        # bytes never leave this process.
        return pickle.loads(pickle.dumps(cached[1], pickle.HIGHEST_PROTOCOL))

    def _page(self, query: Query, k: int, offset: int, filters: Filters | None, options: SearchOptions) -> dict:
        settings = self.settings
        max_per_slide = settings.max_per_slide if options.max_per_slide is None else options.max_per_slide
        threshold = settings.min_confidence if options.min_confidence is None else options.min_confidence
        exclude_case = exclude_slide = None
        if options.exclude_case and query.exclude is not None:
            tile = self.store.get_tiles([query.exclude])[0]
            exclude_case = tile["case_key"]
            exclude_slide = None if exclude_case else tile["slide_key"]
        need = offset + k
        trimming = bool(max_per_slide or exclude_case or exclude_slide or options.same_scale)
        depth = min(MAX_DEPTH, need * SPREAD_DEPTH if trimming else need)
        # Flat and IVF-Flat scores are exact, and a segmented compressed build re-ranks its own candidates on
        # the stored vectors: only a compressed build from before segments needs over-fetching and re-ranking here.
        index = self.live_index.get()
        exact = index.exact_scores
        factor = 1 if exact else settings.rerank_factor
        while True:
            ask = min(depth * factor, MAX_DEPTH * factor)
            pairs, total = nearest(self.live_index, self.allowed_ids, query.vector, ask, filters, query.exclude)
            exhausted = len(pairs) < ask
            pairs, vectors = rerank(self.store, query, pairs, rescore=not exact)
            hits = hits_of(self.store, pairs)
            for hit in hits:
                hit["scale_mismatch"] = scale_mismatch(query.mpp, hit["mpp"], settings.scale_tolerance)
            if options.same_scale:
                hits = [h for h in hits if not h["scale_mismatch"]]
            steps = self._steps(query.build["id"], hits) if max_per_slide else {}
            spread_hits = spread(
                hits, max_per_slide=max_per_slide, steps=steps, exclude_case=exclude_case, exclude_slide=exclude_slide
            )
            if len(spread_hits.results) >= need or exhausted or depth >= MAX_DEPTH or not trimming:
                break
            depth = min(MAX_DEPTH, depth * GROWTH)
        results = spread_hits.results[offset:need]
        for rank, hit in enumerate(results, start=offset + 1):
            hit["rank"] = rank
        top_score = spread_hits.results[0]["score"] if spread_hits.results else None
        calibration = self.calibration.annotate(query.build["id"], query.vector, results, top_score, threshold)
        self.explainer.annotate(query.build, results, vectors, query.words)
        return {
            "query": query.names,
            "filters": (filters or Filters()).to_dict(),
            "options": options.to_dict(),
            "k": k,
            "offset": offset,
            "total": total,
            "calibration": calibration,
            "spread": {
                "max_per_slide": max_per_slide,
                "merged": spread_hits.merged,
                "hidden": spread_hits.hidden,
                "excluded": spread_hits.excluded,
                "exclude_case": exclude_case,
                "exclude_slide": exclude_slide,
            },
            "query_mpp": query.mpp,
            "exact_scores": True,
            "index_type": index.index_type,
            "results": results,
        }
