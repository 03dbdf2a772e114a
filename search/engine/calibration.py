"""Calibrated relevance: how unusual a hit's cosine is for this query, not just how high.

Raw cosines of CONCH embeddings sit in a narrow band that shifts from query to query, so 0.31 can be
the best of a bad lot for one query and noise for another. Each build keeps a fixed random sample of
its tiles' vectors (drawn once per build, ``search.storage.build_checks``); a query's cosines to that
sample say what an ordinary tile scores for this query. A hit's z-score is how many standard deviations
its cosine lies above that mean, its percentile the share of sampled tiles it beats. Both grow with the
cosine for a fixed query, so they never reorder a result list.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from search.storage.build_checks import CALIBRATION_FILE, load_calibration_sample
from search.storage.index_directory import IndexDirectory

EXPLANATION = (
    "z: how many standard deviations a hit's cosine lies above this query's mean cosine to {n} random "
    "tiles of the index; percentile: the share of those tiles it beats. Below z = {threshold} the best "
    "hit is no more similar than chance would give."
)


@dataclass(frozen=True)
class Scale:
    """A query's cosines to the calibration sample: sorted, their mean and spread."""

    sorted_scores: np.ndarray
    mean: float
    std: float

    def z(self, score: float) -> float:
        return (score - self.mean) / self.std

    def percentile(self, score: float) -> float:
        return 100.0 * float(np.searchsorted(self.sorted_scores, score, side="right")) / len(self.sorted_scores)


class Calibration:
    """The calibration samples of the builds, loaded once per build id."""

    def __init__(self, directory: IndexDirectory) -> None:
        self.directory = directory
        self._samples: dict[int, np.ndarray | None] = {}
        self._lock = threading.Lock()

    def sample(self, build_id: int) -> np.ndarray | None:
        with self._lock:
            if build_id not in self._samples:
                # Builds come and go rarely: keep the live one and forget the others.
                self._samples = {
                    build_id: load_calibration_sample(self.directory.build_file(build_id, CALIBRATION_FILE))
                }
            return self._samples[build_id]

    def scale(self, build_id: int, vector: np.ndarray) -> Scale | None:
        """The query's score scale on this build, or None for a build without a sample (built before
        calibration existed: reindex to get one)."""
        sample = self.sample(build_id)
        if sample is None or len(sample) < 2:
            return None
        # einsum stays on one core: a threaded BLAS gemv this small loses more to waking threads than it gains.
        scores = np.sort(np.einsum("ij,j->i", sample, vector.astype(np.float32)))
        return Scale(scores, float(scores.mean()), max(float(scores.std()), 1e-6))

    def annotate(
        self, build_id: int, vector: np.ndarray, hits: list[dict], top_score: float | None, threshold: float
    ) -> dict:
        """Add ``z`` and ``percentile`` to each hit; returns the page's calibration summary, whose
        ``confident`` is False when the z of the best hit of the whole list (``top_score``, rank 1,
        whatever page this is) is below ``threshold``."""
        scale = self.scale(build_id, vector)
        if scale is None:
            for hit in hits:
                hit.update(z=None, percentile=None)
            return {"available": False, "confident": True, "threshold": threshold, "best_z": None,
                    "explanation": "this index was built before calibrated scores: reindex to get them"}  # fmt: skip
        for hit in hits:
            hit.update(z=round(scale.z(hit["score"]), 3), percentile=round(scale.percentile(hit["score"]), 2))
        best = None if top_score is None else round(scale.z(top_score), 3)
        return {
            "available": True,
            "confident": best is not None and best >= threshold,
            "threshold": threshold,
            "best_z": best,
            "sample": len(scale.sorted_scores),
            "sample_mean": round(scale.mean, 4),
            "sample_std": round(scale.std, 4),
            "explanation": EXPLANATION.format(n=len(scale.sorted_scores), threshold=threshold),
        }
