"""Texts (captions, vocabulary) and their embeddings, for image -> text."""

from __future__ import annotations

import numpy as np
from sqlalchemy import insert, select

from search.storage.repository import Repository, as_matrix, chunks
from search.storage.schema import TextEmbedding, TextItem


class TextRepository(Repository):
    """Texts and their embeddings, read back as a matrix for image -> text."""

    def add_texts(self, corpus: str, items: list[tuple[str, dict]], vectors: np.ndarray, model_fingerprint: str) -> int:
        """Add texts with their embeddings, skipping (corpus, text) pairs already stored or repeated."""
        matrix = as_matrix(vectors, len(items))
        with self.session(write=True) as s:
            existing: set[str] = set()
            for chunk in chunks([text for text, _ in items]):
                existing.update(
                    s.scalars(select(TextItem.text).where(TextItem.corpus == corpus, TextItem.text.in_(chunk)))
                )
            new: list[tuple[str, dict, np.ndarray]] = []
            for (text, tags), vector in zip(items, matrix, strict=True):
                if text not in existing:
                    existing.add(text)
                    new.append((text, tags, vector))
            if not new:
                return 0
            ids = list(
                s.scalars(
                    insert(TextItem).returning(TextItem.id, sort_by_parameter_order=True),
                    [{"corpus": corpus, "text": text, "tags": tags or {}} for text, tags, _ in new],
                )
            )
            s.execute(
                insert(TextEmbedding),
                [
                    {"text_id": text_id, "model_fingerprint": model_fingerprint, "vector": v.tobytes()}
                    for text_id, (_, _, v) in zip(ids, new, strict=True)
                ],
            )
            return len(ids)

    def texts_missing_embeddings(self, model_fingerprint: str) -> list[tuple[int, str]]:
        """(id, text) of texts with no vector under ``model_fingerprint``, in id order."""
        stmt = (
            select(TextItem.id, TextItem.text)
            .outerjoin(TextEmbedding, TextEmbedding.text_id == TextItem.id)
            .where((TextEmbedding.text_id.is_(None)) | (TextEmbedding.model_fingerprint != model_fingerprint))
            .order_by(TextItem.id)
        )
        with self.session() as s:
            return [(i, t) for i, t in s.execute(stmt)]

    def set_text_embeddings(self, text_ids: list[int], vectors: np.ndarray, model_fingerprint: str) -> None:
        self._upsert_vectors(TextEmbedding, "text_id", text_ids, vectors, model_fingerprint)

    def text_matrix(self, model_fingerprint: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], vectors float32 [n, d]) of every text embedded under the model, in id order."""
        stmt = (
            select(TextEmbedding.text_id, TextEmbedding.vector)
            .where(TextEmbedding.model_fingerprint == model_fingerprint)
            .order_by(TextEmbedding.text_id)
        )
        return self._id_vectors(stmt)

    def get_texts(self, text_ids: list[int]) -> list[dict]:
        """Texts (id, corpus, text, tags) in the order of ``text_ids``; missing ids are skipped."""
        found: dict[int, dict] = {}
        with self.session() as s:
            for chunk in chunks(list(dict.fromkeys(int(i) for i in text_ids))):
                for item in s.scalars(select(TextItem).where(TextItem.id.in_(chunk))):
                    found[item.id] = {"id": item.id, "corpus": item.corpus, "text": item.text, "tags": item.tags}
        return [found[i] for i in (int(i) for i in text_ids) if i in found]
