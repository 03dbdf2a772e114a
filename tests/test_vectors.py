"""FAISS indexes: build, filtered search, reconstruct, save and load, with real FAISS in tmp_path."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from search.core.errors import BadInput, BadQuery, ConfigError, IndexUnavailable, NotFound
from search.storage import vectors
from search.storage.gpu import gpu_available
from search.storage.index_types import APPROXIMATE_DEFAULT, INDEX_TYPES
from search.storage.vectors import VectorIndex

DIM = 32
APPROXIMATE = [t for t in INDEX_TYPES if t != "flat"]
# Quantised codes: reconstructions and scores are approximations of the vectors added.
LOSSY = ("ivfpq", "ivfsq8")


def clustered(n: int, seed: int, n_clusters: int = 40, rank: int = 4) -> np.ndarray:
    """L2-normalised points around fixed clusters (the same for every seed), each spread mostly along
    its own low-rank subspace, as embeddings are: isotropic noise alone would be unrealistically hard."""
    fixed = np.random.default_rng(0)
    centres = fixed.standard_normal((n_clusters, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = fixed.standard_normal((n_clusters, rank, DIM)).astype(np.float32) * (0.7 / np.sqrt(rank * DIM))
    rng = np.random.default_rng(seed)
    labels = rng.integers(n_clusters, size=n)
    z = rng.standard_normal((n, rank)).astype(np.float32)
    x = centres[labels] + np.einsum("nr,nrd->nd", z, bases[labels])
    x += (0.25 / np.sqrt(DIM)) * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    # Non-contiguous tile ids, as after deletes.
    x = clustered(3000, seed=1)
    ids = np.arange(len(x), dtype=np.int64) * 7 + 11
    return ids, x


@pytest.fixture(scope="module")
def built(data) -> dict[str, VectorIndex]:
    ids, x = data
    return {kind: VectorIndex.build(ids, x, kind, device="cpu") for kind in INDEX_TYPES}


def brute_force(x: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ x.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def test_auto_builds_flat_then_the_default(data) -> None:
    ids, x = data
    assert VectorIndex.build(ids, x, exact_max=len(x), device="cpu").index_type == "flat"
    assert VectorIndex.build(ids, x, exact_max=len(x) - 1, device="cpu").index_type == APPROXIMATE_DEFAULT


@pytest.mark.parametrize("kind", INDEX_TYPES)
def test_exact_duplicate_is_found_first(built, data, kind: str) -> None:
    ids, x = data
    index = built[kind]
    assert (index.index_type, index.dim, index.device, index.ntotal) == (kind, DIM, "cpu", len(x))
    rows = np.arange(0, len(x), 97)
    scores, found = index.search(x[rows], 5)
    assert found.dtype == np.int64 and scores.dtype == np.float32 and found.shape == (len(rows), 5)
    assert (found[:, 0] == ids[rows]).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_flat_equals_brute_force(built, data) -> None:
    ids, x = data
    queries = clustered(50, seed=2)
    scores, found = built["flat"].search(queries, 20)
    want_scores, want_ids = brute_force(x, ids, queries, 20)
    assert (found == want_ids).all()
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("kind", APPROXIMATE)
def test_approximate_recall_at_10(built, kind: str) -> None:
    queries = clustered(300, seed=3)
    _, truth = built["flat"].search(queries, 10)
    _, found = built[kind].search(queries, 10)
    recall = np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.9, f"{kind}: recall@10 {recall:.3f}"


def test_more_results_asked_than_stored_are_padded(data) -> None:
    ids, x = data
    index = VectorIndex.build(ids[:4], x[:4], "hnsw", device="cpu")
    scores, found = index.search(x[:2], 6)
    assert sorted(found[0, :4]) == sorted(ids[:4]) and (found[:, 4:] == -1).all()
    assert np.isneginf(scores[:, 4:]).all() and np.isfinite(scores[:, :4]).all()


def test_empty_index_and_k_zero(data) -> None:
    ids, x = data
    empty = VectorIndex.build(ids[:0], x[:0], device="cpu")
    assert (empty.index_type, empty.ntotal) == ("flat", 0)
    scores, found = empty.search(x[:2], 3)
    assert (found == -1).all() and np.isneginf(scores).all()
    scores, found = VectorIndex.build(ids, x, "flat", device="cpu").search(x[:2], 0)
    assert scores.shape == found.shape == (2, 0)


@pytest.mark.parametrize("kind", INDEX_TYPES)
@pytest.mark.parametrize("n_allowed", [1, 3, 10, 400])
def test_allowed_returns_only_allowed_and_enough(built, data, kind: str, n_allowed: int) -> None:
    ids, x = data
    allowed = np.random.default_rng(n_allowed).choice(ids, n_allowed, replace=False)
    # Ids the index does not hold (deleted tiles) count for nothing.
    asked = np.concatenate([allowed, [5, 10**12]])
    queries = clustered(20, seed=4)
    scores, found = built[kind].search(queries, 10, allowed=asked)
    valid = found >= 0
    assert (valid.sum(axis=1) == min(10, n_allowed)).all()
    assert np.isin(found[valid], allowed).all()
    assert np.isneginf(scores[~valid]).all()
    if kind not in LOSSY:  # small filters are scored exactly on the stored (lossy types: decoded) vectors
        rows = np.isin(ids, allowed)
        want_scores, want_ids = brute_force(x[rows], ids[rows], queries, min(10, n_allowed))
        assert (found[:, : want_ids.shape[1]] == want_ids).all()
        np.testing.assert_allclose(scores[:, : want_ids.shape[1]], want_scores, atol=1e-5)


@pytest.mark.parametrize("kind", INDEX_TYPES)
def test_allowed_through_faiss_selector(built, data, kind: str, monkeypatch) -> None:
    # Large filters go through FAISS's IDSelector; lower the threshold so small data takes that path.
    monkeypatch.setattr(vectors, "EXACT_FILTER_MAX", 0)
    ids, x = data
    allowed = ids[::3]
    queries = clustered(30, seed=5)
    scores, found = built[kind].search(queries, 10, allowed=allowed)
    assert (found >= 0).all() and np.isin(found, allowed).all()
    _, truth = brute_force(x[::3], allowed, queries, 10)
    recall = np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= (1.0 if kind == "flat" else 0.85)


def test_short_selector_rows_fall_back_to_exact(data, monkeypatch) -> None:
    # One probed list out of ~76 holds few of 60 scattered allowed ids: the rows come back short
    # from FAISS and must be completed by exact scoring.
    monkeypatch.setattr(vectors, "EXACT_FILTER_MAX", 0)
    ids, x = data
    index = VectorIndex.build(ids, x, "ivf", device="cpu", nprobe=1)
    assert index.nprobe == 1
    allowed = np.random.default_rng(6).choice(ids, 60, replace=False)
    queries = clustered(10, seed=7)
    scores, found = index.search(queries, 50, allowed=allowed)
    rows = np.isin(ids, allowed)
    want_scores, want_ids = brute_force(x[rows], ids[rows], queries, 50)
    assert (found == want_ids).all()
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
@pytest.mark.parametrize("every", [2, 40])
def test_allowed_by_over_fetching(built, data, kind: str, every: int, monkeypatch) -> None:
    # GPU indexes take no selector: they over-fetch and filter. A CPU clone stands in for the GPU
    # replica here, so the path runs without a GPU.
    monkeypatch.setattr(vectors, "EXACT_FILTER_MAX", 0)
    ids, x = data
    index = VectorIndex(built[kind]._cpu, gpu_index=faiss.clone_index(built[kind]._cpu))
    allowed = ids[::every]
    queries = clustered(30, seed=12)
    scores, found = index.search(queries, 20, allowed=allowed)
    assert (found >= 0).all() and np.isin(found, allowed).all()
    _, truth = brute_force(x[::every], allowed, queries, 20)
    recall = np.mean([len(np.intersect1d(f, t)) / 20 for f, t in zip(found, truth, strict=True)])
    assert recall >= (1.0 if kind == "flat" else 0.9)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_allowed_covering_everything_or_nothing(built, data) -> None:
    ids, x = data
    queries = clustered(5, seed=8)
    assert (built["ivf"].search(queries, 10, allowed=ids)[1] == built["ivf"].search(queries, 10)[1]).all()
    scores, found = built["ivf"].search(queries, 10, allowed=np.array([1, 2, 3]))
    assert (found == -1).all() and np.isneginf(scores).all()


@pytest.mark.parametrize("kind", INDEX_TYPES)
def test_reconstruct_by_tile_id(built, data, kind: str) -> None:
    ids, x = data
    pick = ids[[5, 2999, 0, 1234]]
    got = built[kind].reconstruct(pick)
    want = x[[5, 2999, 0, 1234]]
    np.testing.assert_allclose(got, want, atol=0.2 if kind in LOSSY else 1e-6)
    assert (built[kind].ids == ids).all()
    with pytest.raises(NotFound, match=r"\[12\]"):
        built[kind].reconstruct(np.array([ids[0], 12]))


@pytest.mark.parametrize("kind", INDEX_TYPES)
def test_save_load_round_trip(built, tmp_path, kind: str) -> None:
    path = tmp_path / "sub" / "index.faiss"
    built[kind].save(path)
    assert [p.name for p in path.parent.iterdir()] == ["index.faiss"]  # no temporary left behind
    loaded = VectorIndex.load(path, device="cpu")
    assert (loaded.index_type, loaded.ntotal, loaded.dim, loaded.nprobe) == (
        kind,
        built[kind].ntotal,
        DIM,
        built[kind].nprobe,
    )
    queries = clustered(20, seed=9)
    for got, want in zip(loaded.search(queries, 10), built[kind].search(queries, 10), strict=True):
        np.testing.assert_array_equal(got, want)
    assert (loaded.ids == built[kind].ids).all()


def test_ivf_build_is_deterministic(data) -> None:
    ids, x = data
    queries = clustered(20, seed=10)
    first = VectorIndex.build(ids, x, "ivf", device="cpu").search(queries, 10)
    second = VectorIndex.build(ids, x, "ivf", device="cpu").search(queries, 10)
    np.testing.assert_array_equal(first[1], second[1])


def test_load_rejects_missing_and_corrupt_files(tmp_path) -> None:
    with pytest.raises(IndexUnavailable, match="histosearch index"):
        VectorIndex.load(tmp_path / "nope.faiss")
    bad = tmp_path / "bad.faiss"
    bad.write_bytes(b"not an index")
    with pytest.raises(IndexUnavailable, match="bad.faiss: not a readable FAISS index"):
        VectorIndex.load(bad)


def test_bad_inputs(data) -> None:
    ids, x = data
    with pytest.raises(BadInput, match="unique"):
        VectorIndex.build(np.array([1, 1, 2]), x[:3], "flat")
    with pytest.raises(BadInput, match="do not match"):
        VectorIndex.build(ids[:3], x[:4], "flat")
    with pytest.raises(BadInput, match="at least 256 vectors"):
        VectorIndex.build(ids[:100], x[:100], "ivfpq")
    index = VectorIndex.build(ids[:10], x[:10], "flat", device="cpu")
    with pytest.raises(BadQuery, match="dimension 32"):
        index.search(np.zeros((1, 16), np.float32), 3)
    with pytest.raises(BadQuery):
        index.search(x[:1], -1)
    with pytest.raises(ConfigError, match="device 'tpu'"):
        VectorIndex.build(ids[:10], x[:10], "flat", device="tpu")


@pytest.mark.skipif(not gpu_available(), reason="needs the GPU FAISS build and a GPU")
@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_gpu_matches_cpu(data, kind: str, monkeypatch) -> None:
    ids, x = data
    gpu = VectorIndex.build(ids, x, kind, device="cuda")
    cpu = VectorIndex.build(ids, x, kind, device="cpu")
    assert gpu.device == "cuda"
    queries = clustered(50, seed=11)
    _, want = cpu.search(queries, 10)
    _, got = gpu.search(queries, 10)
    assert np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(got, want, strict=True)]) >= 0.95
    monkeypatch.setattr(vectors, "EXACT_FILTER_MAX", 0)  # the over-fetch path
    allowed = ids[::5]
    scores, found = gpu.search(queries, 10, allowed=allowed)
    assert (found >= 0).all() and np.isin(found, allowed).all()
