"""Evaluation metrics, bootstrap and rankers on tiny hand-made cases, compared exactly."""

from __future__ import annotations

import numpy as np
import pytest

from search.evaluation import metrics as m
from search.evaluation.bootstrap import Estimate, bootstrap_mean, bootstrap_statistic
from search.evaluation.ranking import rank_exact, rank_index
from search.evaluation.reports import pairs_report, retrieval_report, zero_shot_report
from search.storage.vectors import VectorIndex

NO = -1
# Database labels of five items: two of class 0, two of class 1, one of class 2.
DB = np.array([0, 0, 1, 1, 2])


def test_acc_mv_and_ap_by_hand():
    ranked = np.array(
        [
            [2, 0, 3, NO],  # query of class 0: wrong, right, wrong
            [2, 3, 0, 1],  # class 1: right, right, wrong, wrong
            [NO, NO, NO, NO],  # class 2: empty result
        ]
    )
    labels = np.array([0, 1, 2])
    hits = m.hit_matrix(labels, ranked, DB)
    assert hits.tolist() == [[False, True, False, False], [True, True, False, False], [False] * 4]
    assert m.acc_at_k(hits, 1).tolist() == [0.0, 1.0, 0.0]
    assert m.acc_at_k(hits, 3).tolist() == [1.0, 1.0, 0.0]
    # Top 3 labels: [1, 0, 1] -> 1; [1, 1, 0] -> 1; nothing -> no vote.
    assert m.majority_vote(m.ranked_labels(ranked, DB), 3).tolist() == [1, 1, NO]
    assert m.mv_acc_at_k(labels, m.ranked_labels(ranked, DB), 3).tolist() == [0.0, 1.0, 0.0]
    # Query 0: one relevant at rank 2 (precision 1/2), R = 2 -> (1/2) / 2. Query 1: (1 + 1) / 2.
    assert m.ap_at_k(hits, np.array([2, 2, 1]), 3).tolist() == [0.25, 1.0, 0.0]
    # R below k divides by R, not k: one relevant item retrieved first is a perfect AP.
    assert m.ap_at_k(np.array([[True, False, False]]), np.array([1]), 10).tolist() == [1.0]
    assert m.precision_at_k(hits, 2).tolist() == [0.5, 1.0, 0.0]


def test_majority_vote_ties_go_to_the_label_ranked_first():
    labels = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [2, NO, NO, NO]])
    assert m.majority_vote(labels, 4).tolist() == [1, 0, 2]
    assert m.majority_vote(labels, 2).tolist() == [1, 0, 2]
    with pytest.raises(ValueError):
        m.majority_vote(labels, 0)


def test_a_class_with_one_member_has_nothing_to_find():
    # The only class-2 item is the query itself, excluded as its own group: R = 0, every metric 0.
    vectors = np.eye(5, dtype=np.float32)
    ranked = rank_exact(vectors, vectors, 3, query_groups=np.arange(5), db_groups=np.arange(5))
    assert NO not in ranked[4] and 4 not in ranked[4]
    hits = m.hit_matrix(DB, ranked, DB)
    assert hits[4].tolist() == [False, False, False]
    assert m.ap_at_k(hits, np.array([1, 1, 1, 1, 0]), 3)[4] == 0.0


def test_leave_one_case_out_removes_the_only_match():
    # Items 0 and 1 share class 0 and case 0; item 2 is class 1 in case 1.
    vectors = np.array([[1, 0], [0.99, 0.14], [0, 1]], np.float32)
    labels, cases = np.array([0, 0, 1]), np.array([0, 0, 1])
    plain = rank_exact(vectors, vectors, 2, query_groups=np.arange(3), db_groups=np.arange(3))
    assert plain[0].tolist() == [1, 2]
    loco = rank_exact(vectors, vectors, 2, query_groups=cases, db_groups=cases)
    assert loco.tolist() == [[2, NO], [2, NO], [1, 0]]
    report = retrieval_report(labels, loco, labels, np.array([0, 0, 0]), ["a", "b"], ks=(1,), mv_k=1, ap_k=2)
    assert report["metrics"]["Acc@1"]["value"] == 0.0
    assert report["no_match"] == 3


def test_exact_ranker_breaks_ties_against_the_query():
    db = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    query = np.array([[1, 0]], np.float32)
    labels = {"query_labels": np.array([0]), "db_labels": np.array([0, 1, 0])}
    # Items 0 and 1 tie; item 1 has the wrong label and goes first.
    assert rank_exact(query, db, 3, **labels).tolist() == [[1, 0, 2]]
    # Asking for fewer than the tie holds still sees the whole tie.
    assert rank_exact(query, db, 1, **labels).tolist() == [[1]]


def test_index_ranker_matches_exact_on_a_flat_index_and_drops_foreign_hits():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((60, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    groups = np.arange(60) // 4
    ids = np.arange(100, 160)
    extra = rng.standard_normal((20, 16)).astype(np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    index = VectorIndex.build(np.r_[ids, np.arange(500, 520)], np.r_[vectors, extra], "flat", device="cpu")
    exact = rank_exact(vectors, vectors, 5, query_groups=groups, db_groups=groups)
    via_index = rank_index(index, vectors, ids, 5, allowed=ids, query_groups=groups, db_groups=groups)
    assert via_index.tolist() == exact.tolist()
    # Unfiltered, the foreign tiles 500.. can be hits; they are dropped, never mapped to a position.
    loose = rank_index(index, extra, ids, 5)
    assert loose.max() < 60


def test_confusion_and_balanced_accuracy():
    truth, predicted = np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])
    assert m.balanced_accuracy(truth, predicted) == pytest.approx(5 / 6)
    assert m.balanced_accuracy(truth, predicted, np.array([3, 3])) == 1.0
    assert m.confusion_matrix(truth, np.array([0, NO, 1, 1]), 2).tolist() == [[1, 1, 1], [0, 1, 0]]


def test_pessimistic_rank_counts_tied_wrong_items_above():
    scores = np.array([[0.5, 0.5, 0.1], [0.9, 0.5, 0.2], [0.1, 0.3, 0.3]])
    correct = np.array([[False, True, False], [True, False, False], [True, True, False]])
    # Row 3: best correct is 0.3 (item 1); the wrong item 2 ties at 0.3.
    assert m.pessimistic_rank(scores, correct).tolist() == [1, 0, 1]
    assert m.recall_at_k(np.array([0, 1, 5]), 1).tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        m.pessimistic_rank(scores, np.zeros_like(correct))


def test_bootstrap_is_seeded_and_brackets_the_value():
    values = np.r_[np.ones(30), np.zeros(70)]
    first = bootstrap_mean(values, seed=3)
    assert first == bootstrap_mean(values, seed=3)
    assert first != bootstrap_mean(values, seed=4)
    assert first.low < first.value == 0.3 < first.high
    # About +-1.96 * sqrt(0.3 * 0.7 / 100) = 0.09 around the mean.
    assert 0.05 < first.high - first.value < 0.13
    assert bootstrap_mean(np.full(10, 0.5)) == Estimate(0.5, 0.5, 0.5)
    assert bootstrap_mean(np.zeros(0)) == Estimate(0.0, 0.0, 0.0)
    assert bootstrap_statistic(lambda rows: float(len(rows)), 7) == Estimate(7.0, 7.0, 7.0)
    assert Estimate(0.5, 0.4, 0.6).overlaps(Estimate(0.7, 0.55, 0.8))
    assert not Estimate(0.5, 0.4, 0.5).overlaps(Estimate(0.7, 0.55, 0.8))


def test_zero_shot_report_by_hand():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.7], [0.3, 0.6]])
    ranked = np.array([[0, 3], [2, 1]])  # class prompt 0 finds images 0 (right) and 3 (wrong)
    report = zero_shot_report(labels, scores, ranked, ["a", "b"], k=2)
    assert report["metrics"]["accuracy"]["value"] == 0.75
    assert report["metrics"]["balanced_accuracy"]["value"] == 0.75
    assert report["metrics"]["mean_precision@2"]["value"] == 0.5
    assert [c["recall"]["value"] for c in report["per_class"]] == [0.5, 1.0]
    assert [c["precision@2"]["value"] for c in report["per_class"]] == [0.5, 0.5]
    assert report["confusion"]["matrix"] == [[1, 1, 0], [0, 2, 0]]


def test_pairs_report_by_hand():
    # Three images; image 0 has two captions. Text -> image ranks per caption, image -> text per image.
    caption_image = np.array([0, 0, 1, 2])
    t2i = np.array([0, 3, 1, 0])
    i2t = np.array([0, 0, 12])
    report = pairs_report(t2i, i2t, caption_image, ks=(1, 5, 10), mean_ks=(1, 5))
    figures = {name: f["value"] for name, f in report["metrics"].items()}
    assert figures["text->image R@1"] == 0.5
    assert figures["text->image R@5"] == 1.0
    assert figures["image->text R@1"] == pytest.approx(2 / 3)
    assert figures["image->text R@10"] == pytest.approx(2 / 3)
    assert figures["mean_recall"] == pytest.approx((0.5 + 1.0 + 2 / 3 + 2 / 3) / 4)
    assert report["n_captions"] == 4 and report["n_images"] == 3
