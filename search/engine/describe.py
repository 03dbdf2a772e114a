"""Image -> text: the embedded captions and terms ranked by cosine similarity to a query vector."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from search.core.errors import BadQuery
from search.storage.store import Store

from .cache import CACHE_SECONDS
from .ranking import top


@dataclass
class Texts:
    """The text corpora embedded under one model, as a matrix for image -> text ranking."""

    key: tuple
    loaded_at: float
    ids: np.ndarray
    vectors: np.ndarray
    corpus_index: np.ndarray
    corpora: list[str]
    # text id -> (text, corpus), read with the matrix so explaining a hit needs no query.
    labels: dict[int, tuple[str, str]]


class TextRanker:
    """Ranks the texts embedded under the live build's model; the matrix is cached per build for a minute."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._texts: Texts | None = None
        self._lock = threading.Lock()

    def describe(self, vector: np.ndarray, build: dict, k: int, corpus: str | None = None) -> dict:
        """The ``k`` texts nearest to ``vector`` (of ``corpus`` only, when given), and the corpora known."""
        texts = self.corpora(build)
        if corpus and corpus not in texts.corpora:
            known = ", ".join(texts.corpora) or "none"
            raise BadQuery(f"no text corpus named {corpus!r} for this model; embedded corpora: {known}")
        candidates = np.arange(len(texts.ids))
        if corpus:
            candidates = np.flatnonzero(texts.corpus_index == texts.corpora.index(corpus))
        scores = texts.vectors[candidates] @ vector if len(candidates) else np.zeros(0, np.float32)
        best = top(scores, k)
        chosen = texts.ids[candidates[best]]
        results = [
            {
                "text_id": item["id"],
                "text": item["text"],
                "corpus": item["corpus"],
                "tags": item["tags"],
                "score": float(score),
                "rank": rank,
            }
            for rank, (item, score) in enumerate(
                zip(self.store.get_texts(chosen.tolist()), scores[best], strict=True), start=1
            )
        ]
        return {"corpora": texts.corpora, "results": results}

    def corpora(self, build: dict) -> Texts:
        """The texts embedded under the build's model, as one matrix (cached per build for a minute)."""
        key = (build["model_fingerprint"], build["id"])
        with self._lock:
            texts = self._texts
            if texts and texts.key == key and time.monotonic() - texts.loaded_at < CACHE_SECONDS:
                return texts
        ids, vectors = self.store.text_matrix(build["model_fingerprint"])
        items = self.store.get_texts(ids.tolist())
        corpus_of = {item["id"]: item["corpus"] for item in items}
        labels = {item["id"]: (item["text"], item["corpus"]) for item in items}
        corpora = sorted(set(corpus_of.values()))
        position = {name: n for n, name in enumerate(corpora)}
        corpus_index = np.fromiter((position[corpus_of[int(i)]] for i in ids), dtype=np.int32, count=len(ids))
        if vectors.size == 0:
            vectors = np.zeros((0, 1), np.float32)
        texts = Texts(key, time.monotonic(), ids, vectors, corpus_index, corpora, labels)
        with self._lock:
            self._texts = texts
        return texts
