"""Retrieval and zero-shot metrics as pure functions of ranked lists, labels and scores.

Every function returns one value per query (so that a bootstrap can resample queries) or, where a
figure is not a mean over queries (balanced accuracy), takes the rows to use. Exact definitions are
in docs/evaluation.md; the choices a paper leaves open are fixed here:

- A ranked list is a row of database positions, best first, padded with -1 where fewer items came
  back (an empty result is a miss for every metric, never a dropped query).
- Majority vote (mMV@k): the most frequent label among the top k; a tie goes to the tied label that
  appears first in the ranking.
- AP@k divides by min(k, R), R being how many relevant items the query could have retrieved (after
  leave-one-case-out); a query with R = 0 scores 0.
- Ranks with tied scores count the tied wrong items as ranked above the right one (pessimistic), so a
  collapsed model that gives every item the same score cannot score well.
"""

from __future__ import annotations

import numpy as np

NO_LABEL = -1


def hit_matrix(query_labels: np.ndarray, ranked: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """bool [n, depth]: whether each retrieved item shares the query's label (False for padding)."""
    ranked = np.asarray(ranked, dtype=np.int64)
    labels = ranked_labels(ranked, db_labels)
    return (labels == np.asarray(query_labels)[:, None]) & (ranked >= 0)


def ranked_labels(ranked: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """int [n, depth]: the labels of the retrieved items, NO_LABEL for padding."""
    ranked = np.asarray(ranked, dtype=np.int64)
    db_labels = np.asarray(db_labels, dtype=np.int64)
    if db_labels.size == 0:
        return np.full(ranked.shape, NO_LABEL, np.int64)
    return np.where(ranked >= 0, db_labels[np.clip(ranked, 0, None)], NO_LABEL)


def acc_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """Acc@k per query: 1 when any of the top k shares the query's label."""
    _check_k(k)
    return hits[:, :k].any(axis=1).astype(np.float64)


def majority_vote(labels: np.ndarray, k: int) -> np.ndarray:
    """The majority label of each row's top k (NO_LABEL for an empty row); ties go to the earlier-ranked label."""
    _check_k(k)
    out = np.full(len(labels), NO_LABEL, np.int64)
    for row, top in enumerate(np.asarray(labels)[:, :k]):
        top = top[top != NO_LABEL]
        if len(top) == 0:
            continue
        values, first, counts = np.unique(top, return_index=True, return_counts=True)
        # Highest count first, then the earliest first appearance.
        out[row] = values[np.lexsort((first, -counts))[0]]
    return out


def mv_acc_at_k(query_labels: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """mMV@k per query: 1 when the majority label of the top k is the query's label."""
    return (majority_vote(labels, k) == np.asarray(query_labels)).astype(np.float64)


def ap_at_k(hits: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """AP@k per query: sum over relevant ranks i <= k of precision@i, divided by min(k, R)."""
    _check_k(k)
    top = hits[:, :k].astype(np.float64)
    precision = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    denominator = np.minimum(k, np.asarray(relevant, dtype=np.float64))
    total = (precision * top).sum(axis=1)
    return np.divide(total, denominator, out=np.zeros(len(top)), where=denominator > 0)


def precision_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """Precision@k per query: relevant items among the top k, over k (missing results count as wrong)."""
    _check_k(k)
    return hits[:, :k].sum(axis=1) / k


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """int [n_classes, n_classes + 1]: rows true class, columns predicted; the last column counts no prediction."""
    matrix = np.zeros((n_classes, n_classes + 1), np.int64)
    predicted = np.where(np.asarray(predicted) < 0, n_classes, predicted)
    np.add.at(matrix, (np.asarray(truth), predicted), 1)
    return matrix


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray, rows: np.ndarray | None = None) -> float:
    """Mean over the classes present in ``rows`` of the share of that class predicted correctly."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    if rows is not None:
        truth, predicted = truth[rows], predicted[rows]
    if len(truth) == 0:
        return 0.0
    classes, inverse = np.unique(truth, return_inverse=True)
    correct = np.bincount(inverse, weights=(truth == predicted).astype(np.float64), minlength=len(classes))
    return float(np.mean(correct / np.bincount(inverse, minlength=len(classes))))


def pessimistic_rank(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """0-based rank of the best correct item per row: the wrong items scoring at least as high as it.

    ``scores`` [n, m], ``correct`` bool [n, m] with at least one True per row.
    """
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if not correct.any(axis=1).all():
        raise ValueError("every query needs at least one correct item")
    best = np.where(correct, scores, -np.inf).max(axis=1)
    return ((scores >= best[:, None]) & ~correct).sum(axis=1)


def recall_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Recall@k per query (one relevant target or any of several): 1 when its rank is below k."""
    _check_k(k)
    return (np.asarray(ranks) < k).astype(np.float64)


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
