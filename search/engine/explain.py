"""Why this hit: the vocabulary or caption terms a hit's stored vector matches best (image -> text), and
for a text query, how the hit scores on each of the query's own words.

Terms are cached per (build, tile), so a tile seen before costs a dict lookup; a page of new tiles costs
one [hits x texts] product against the build's text matrix and labels (cached by ``TextRanker``).
Word vectors are embedded once per word and cached with the query vectors.
"""

from __future__ import annotations

import numpy as np

from search.storage.store import Store

from .cache import LRU
from .describe import TextRanker
from .query import QueryVectors
from .ranking import top

TERMS_PER_HIT = 3
TERM_CACHE_SIZE = 100_000


class Explainer:
    def __init__(self, store: Store, texts: TextRanker, queries: QueryVectors) -> None:
        self.store = store
        self.texts = texts
        self.queries = queries
        self._terms = LRU(TERM_CACHE_SIZE)

    def annotate(self, build: dict, hits: list[dict], vectors: dict[int, np.ndarray], words: tuple[str, ...]) -> None:
        """Add ``why`` (the hit's best terms, with their cosines) to each hit, and for a text query
        ``words`` (the hit's cosine to each of its words)."""
        self._add_terms(build, hits, vectors)
        if words:
            word_vectors = self.queries.text_vectors(list(words))
            for hit in hits:
                scores = word_vectors @ vectors[hit["tile_id"]]
                hit["words"] = [{"word": w, "score": round(float(s), 4)} for w, s in zip(words, scores, strict=True)]

    def _add_terms(self, build: dict, hits: list[dict], vectors: dict[int, np.ndarray]) -> None:
        missing = [h["tile_id"] for h in hits if self._terms.get((build["id"], h["tile_id"])) is None]
        if missing:
            texts = self.texts.corpora(build)
            if len(texts.ids) == 0:
                for tile_id in missing:
                    self._terms.put((build["id"], tile_id), [])
            else:
                # einsum stays on one core: in a server whose torch threads spin between queries, a threaded
                # BLAS product this small waits for cores longer than it computes.
                scores = np.einsum("ij,kj->ik", np.stack([vectors[i] for i in missing]), texts.vectors)
                for tile_id, row in zip(missing, scores, strict=True):
                    terms = []
                    for j in top(row, TERMS_PER_HIT):
                        text, corpus = texts.labels[int(texts.ids[j])]
                        terms.append({"text": text, "corpus": corpus, "score": round(float(row[j]), 4)})
                    self._terms.put((build["id"], tile_id), terms)
        for hit in hits:
            hit["why"] = self._terms.get((build["id"], hit["tile_id"])) or []
