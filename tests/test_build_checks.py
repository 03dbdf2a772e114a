"""The checks a build passes before it is published: recall against exact search, and the nprobe tuned to it."""

from __future__ import annotations

import numpy as np
import pytest

from search.storage.build_checks import (
    MAX_NPROBE_GROWTH,
    MIN_NPROBE,
    in_memory,
    measure_recall,
    nprobe_ladder,
    recall_against,
    tune_nprobe,
)
from search.storage.vectors import VectorIndex


def isotropic(n: int, seed: int) -> np.ndarray:
    """Unit vectors with no structure: the hardest case for IVF, where recall climbs slowly with nprobe."""
    x = np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_fewest(index: VectorIndex, truth, target: float) -> None:
    """The index's nprobe reaches ``target`` and the ladder's next value down does not."""
    assert recall_against(index, truth).recall >= target
    ladder = nprobe_ladder(index.nlist, index.nprobe)
    chosen = index.nprobe
    if chosen > ladder[0]:
        index.nprobe = ladder[ladder.index(chosen) - 1]
        assert recall_against(index, truth).recall < target
        index.nprobe = chosen


@pytest.fixture(scope="module")
def ivf():
    x = isotropic(6000, seed=3)
    ids = np.arange(len(x), dtype=np.int64)
    index = VectorIndex.build(ids, x, "ivf", device="cpu")
    texts = isotropic(100, seed=4)  # queries that are not in the index
    _, truth = measure_recall(index, ids, in_memory(ids, x), x.__getitem__, texts, 150)
    return index, truth


def test_the_ladder_runs_from_the_floor_to_every_list_and_keeps_the_current_value() -> None:
    ladder = nprobe_ladder(100, 37)
    assert ladder[0] == MIN_NPROBE and ladder[-1] == 100 and 37 in ladder
    assert ladder == sorted(set(ladder))
    assert nprobe_ladder(5, 5) == [5]  # fewer lists than the floor: probe them all


def test_tuning_lowers_nprobe_to_the_fewest_lists_that_reach_the_target(ivf) -> None:
    index, truth = ivf
    index.nprobe = index.nlist  # every list: exact over the lists
    start = recall_against(index, truth)
    tuned = tune_nprobe(index, truth, 0.9, start)
    assert tuned == recall_against(index, truth)
    assert MIN_NPROBE < index.nprobe < index.nlist
    assert_fewest(index, truth, 0.9)


def test_tuning_raises_nprobe_when_the_default_falls_short(ivf) -> None:
    index, truth = ivf
    index.nprobe = MIN_NPROBE
    start = recall_against(index, truth)
    assert start.recall < 0.9
    tuned = tune_nprobe(index, truth, 0.9, start)
    assert tuned == recall_against(index, truth)
    assert_fewest(index, truth, 0.9)


def test_an_unreachable_target_keeps_the_best_nprobe_tried(ivf) -> None:
    index, truth = ivf
    index.nprobe = MIN_NPROBE
    start = recall_against(index, truth)
    tuned = tune_nprobe(index, truth, 1.01, start)
    # Doubled up to the bound on its growth, each step better than the last: the last one is kept.
    assert index.nprobe == MAX_NPROBE_GROWTH * MIN_NPROBE
    assert recall_against(index, truth) == tuned and tuned.recall > start.recall
