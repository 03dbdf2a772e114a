"""Built-in slide vectors equal the stated aggregations."""

from __future__ import annotations

import numpy as np
import pytest

from search.slides.aggregate import mean_vector, medoid_index, medoid_vector, slide_vector


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_mean_is_the_normalised_mean_of_normalised_tiles():
    rng = np.random.default_rng(0)
    tiles = rng.normal(size=(9, 16)) * rng.uniform(0.5, 5, size=(9, 1))  # unequal norms must not weigh in
    expected = _unit(_unit(tiles).mean(axis=0))
    assert np.allclose(mean_vector(tiles), expected, atol=1e-6)
    assert slide_vector(tiles, "mean").dtype == np.float32


def test_medoid_is_the_brute_force_medoid_and_ignores_outliers():
    rng = np.random.default_rng(1)
    tissue = _unit(np.array([1.0, 0, 0, 0]) + 0.1 * rng.normal(size=(12, 4)))
    artefacts = _unit(np.array([0, 0, 0, 1.0]) + 0.1 * rng.normal(size=(5, 4)))
    tiles = np.vstack([tissue, artefacts])
    sims = tiles @ tiles.T
    assert medoid_index(tiles) == int(np.argmax(sims.sum(axis=1)))
    # the mean of the ceil(17/2) = 9 tiles most similar to the medoid: all tissue, no artefact
    nearest = np.argsort(-sims[medoid_index(tiles)])[:9]
    assert set(nearest) <= set(range(12))
    assert np.allclose(medoid_vector(tiles), _unit(tiles[nearest].mean(axis=0)), atol=1e-6)
    assert float(medoid_vector(tiles) @ [0, 0, 0, 1.0]) < float(mean_vector(tiles) @ [0, 0, 0, 1.0])


def test_one_tile_and_bad_input():
    one = np.array([[3.0, 4.0]])
    assert np.allclose(mean_vector(one), [0.6, 0.8]) and np.allclose(medoid_vector(one), [0.6, 0.8])
    with pytest.raises(ValueError, match="non-empty"):
        mean_vector(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="unknown slide-vector method 'max'"):
        slide_vector(one, "max")
