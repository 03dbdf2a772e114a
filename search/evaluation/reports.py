"""From ranked lists and scores to a report: every figure with its bootstrap interval, per class, confusion.

A report is a plain JSON-able dict, the same one the CLI prints with ``--json``, the store keeps and the
web UI draws: ``metrics`` (name -> {value, low, high}), ``per_class`` (one dict per class),
``confusion`` (labels and a count matrix whose last column counts queries with no prediction).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from search.evaluation import metrics as m
from search.evaluation.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap_mean, bootstrap_statistic


def _per_class_mean(values: np.ndarray, labels: np.ndarray, label: int, n_boot: int, seed: int) -> dict:
    return bootstrap_mean(values[labels == label], n_boot=n_boot, seed=seed).to_dict()


def retrieval_report(
    query_labels: np.ndarray,
    ranked: np.ndarray,
    db_labels: np.ndarray,
    relevant: np.ndarray,
    classes: Sequence[str],
    *,
    ks: Sequence[int] = (1, 3, 5),
    mv_k: int = 5,
    ap_k: int | None = 10,
    mv_name: str = "mMV",
    n_boot: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict:
    """Acc@k, majority-vote accuracy and mAP@k of image -> image (or slide -> slide) retrieval.

    ``relevant[i]``: how many database items share query i's label once its own group is left out.
    """
    query_labels = np.asarray(query_labels, dtype=np.int64)
    hits = m.hit_matrix(query_labels, ranked, db_labels)
    per_query = {f"Acc@{k}": m.acc_at_k(hits, k) for k in ks}
    per_query[f"{mv_name}@{mv_k}"] = m.mv_acc_at_k(query_labels, m.ranked_labels(ranked, db_labels), mv_k)
    if ap_k is not None:
        per_query[f"mAP@{ap_k}"] = m.ap_at_k(hits, relevant, ap_k)
    predicted = m.majority_vote(m.ranked_labels(ranked, db_labels), mv_k)
    return {
        "n_queries": len(query_labels),
        "no_match": int((np.asarray(relevant) == 0).sum()),
        "metrics": {name: bootstrap_mean(v, n_boot=n_boot, seed=seed).to_dict() for name, v in per_query.items()},
        "per_class": [
            {
                "label": name,
                "n": int((query_labels == c).sum()),
                **{metric: _per_class_mean(v, query_labels, c, n_boot, seed) for metric, v in per_query.items()},
            }
            for c, name in enumerate(classes)
        ],
        "confusion": {
            "predicted_by": f"{mv_name}@{mv_k}",
            "labels": list(classes),
            "matrix": m.confusion_matrix(query_labels, predicted, len(classes)).tolist(),
        },
    }


def zero_shot_report(
    labels: np.ndarray,
    scores: np.ndarray,
    ranked: np.ndarray,
    classes: Sequence[str],
    *,
    k: int = 10,
    n_boot: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict:
    """Text -> image zero-shot: ``scores`` [images, classes] (argmax is the prediction), ``ranked``
    [classes, >= k] the images retrieved by each class prompt."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.argmax(scores, axis=1) if len(scores) else np.zeros(0, np.int64)
    correct = (predicted == labels).astype(np.float64)
    class_ids = np.arange(len(classes))
    precision = m.precision_at_k(m.hit_matrix(class_ids, ranked, labels), k)
    return {
        "n_queries": len(labels),
        "metrics": {
            "accuracy": bootstrap_mean(correct, n_boot=n_boot, seed=seed).to_dict(),
            "balanced_accuracy": bootstrap_statistic(
                lambda rows: m.balanced_accuracy(labels, predicted, rows), len(labels), n_boot=n_boot, seed=seed
            ).to_dict(),
            # The queries here are the class prompts: the interval resamples classes.
            f"mean_precision@{k}": bootstrap_mean(precision, n_boot=n_boot, seed=seed).to_dict(),
        },
        "per_class": [
            {
                "label": name,
                "n": int((labels == c).sum()),
                "recall": _per_class_mean(correct, labels, c, n_boot, seed),
                # One query (the class prompt): a single value, no interval.
                f"precision@{k}": {"value": float(precision[c])},
            }
            for c, name in enumerate(classes)
        ],
        "confusion": {
            "predicted_by": "zero-shot argmax",
            "labels": list(classes),
            "matrix": m.confusion_matrix(labels, predicted, len(classes)).tolist(),
        },
    }


def pairs_report(
    t2i_ranks: np.ndarray,
    i2t_ranks: np.ndarray,
    caption_image: np.ndarray,
    *,
    ks: Sequence[int] = (1, 5, 10, 50),
    mean_ks: Sequence[int] = (1, 5, 10),
    n_boot: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict:
    """Cross-modal Recall@k both ways and their mean recall (CONCH: R@1/5/10 of both directions).

    The bootstrap resamples images, each with all of its captions, so one interval method covers
    both directions and the mean.
    """
    caption_image = np.asarray(caption_image, dtype=np.int64)
    n_images = len(i2t_ranks)
    captions_per_image = np.bincount(caption_image, minlength=n_images).astype(np.float64)
    per_image: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (sums per image, weight per image)
    for k in ks:
        hits = m.recall_at_k(t2i_ranks, k)
        per_image[f"text->image R@{k}"] = (np.bincount(caption_image, hits, minlength=n_images), captions_per_image)
    for k in ks:
        per_image[f"image->text R@{k}"] = (m.recall_at_k(i2t_ranks, k), np.ones(n_images))

    def figure(name: str, rows: np.ndarray) -> float:
        sums, weights = per_image[name]
        total = weights[rows].sum()
        return float(sums[rows].sum() / total) if total else 0.0

    mean_names = [f"{d} R@{k}" for d in ("text->image", "image->text") for k in mean_ks if k in ks]

    def mean_recall(rows: np.ndarray) -> float:
        return float(np.mean([figure(name, rows) for name in mean_names]))

    out = {
        name: bootstrap_statistic(lambda rows, name=name: figure(name, rows), n_images, n_boot=n_boot, seed=seed)
        for name in per_image
    }
    out["mean_recall"] = bootstrap_statistic(mean_recall, n_images, n_boot=n_boot, seed=seed)
    return {
        "n_queries": len(t2i_ranks) + n_images,
        "n_images": n_images,
        "n_captions": len(t2i_ranks),
        "mean_recall_of": mean_names,
        "metrics": {name: est.to_dict() for name, est in out.items()},
    }
