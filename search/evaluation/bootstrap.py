"""Seeded percentile-bootstrap confidence intervals, resampling queries.

Pathology test sets are small: a difference of 0.02 between two runs is often noise. Every figure a
run reports is an :class:`Estimate`: the value on all queries and the 2.5th/97.5th percentiles of the
figure recomputed on ``n_boot`` resamples of the queries (drawn with replacement, same size). With the
same seed and query count, every metric of a run sees the same resamples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
LEVEL = 0.95
# Resamples drawn at once: bounds memory to (this x queries) indices.
_BATCH = 100


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}

    def overlaps(self, other: Estimate) -> bool:
        return self.low <= other.high and other.low <= self.high


def _resamples(n: int, n_boot: int, seed: int):
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        size = min(_BATCH, n_boot - done)
        yield rng.integers(0, n, size=(size, n))
        done += size


def _interval(value: float, samples: np.ndarray) -> Estimate:
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Estimate(float(value), float(low), float(high))


def bootstrap_mean(values: np.ndarray, *, n_boot: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Estimate:
    """The mean of per-query ``values`` with its 95 % interval; no queries gives 0 with a [0, 0] interval."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return Estimate(0.0, 0.0, 0.0)
    means = np.concatenate([values[rows].mean(axis=1) for rows in _resamples(len(values), n_boot, seed)])
    return _interval(values.mean(), means)


def bootstrap_statistic(
    statistic: Callable[[np.ndarray], float], n: int, *, n_boot: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> Estimate:
    """A figure that is not a mean over queries (balanced accuracy): ``statistic(rows)`` on all rows and
    on each resample of them."""
    if n == 0:
        return Estimate(0.0, 0.0, 0.0)
    samples = np.array([statistic(rows) for batch in _resamples(n, n_boot, seed) for rows in batch])
    return _interval(statistic(np.arange(n)), samples)
