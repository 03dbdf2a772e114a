"""ANN benchmark: build time, latency, throughput and recall@10 of each FAISS index type.

    python -m bench.ann [--sizes 100000 1000000] [--queries 1000] [--types flat ivf hnsw]

Vectors are synthetic 512-d embeddings shaped like a pathology archive: a few thousand tissue
clusters (gaussian, of very uneven sizes) grouped under a few dozen tissue families, each cluster
spread along its own 16-dimensional subspace plus isotropic noise, all sharing a common direction
(CLIP-like embeddings occupy a cone), then L2-normalised. Queries are fresh draws from the same mixture.
Each size is compared with exact ``flat`` search on the same device in the same run; GPU rows appear
when the GPU FAISS build sees a GPU.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from bench._machine import describe_machine
from search.storage.gpu import gpu_available
from search.storage.index_types import INDEX_TYPES, choose_index_type
from search.storage.vectors import VectorIndex

K = 10


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


class SyntheticEmbeddings:
    """A fixed mixture of clusters; ``sample`` draws from it in chunks to bound memory."""

    def __init__(
        self,
        dim: int = 512,
        n_clusters: int = 2048,
        n_families: int = 48,
        rank: int = 16,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        common = _normalise(rng.standard_normal((1, dim), dtype=np.float32))
        families = _normalise(rng.standard_normal((n_families, dim), dtype=np.float32))
        parent = rng.integers(n_families, size=n_clusters)
        offsets = _normalise(rng.standard_normal((n_clusters, dim), dtype=np.float32))
        self.centres = _normalise(0.6 * common + families[parent] + 0.9 * offsets)
        # Within a cluster: norm ~0.7 along a low-rank subspace, ~0.25 of isotropic noise.
        self.bases = rng.standard_normal((n_clusters, rank, dim), dtype=np.float32) * (0.7 / np.sqrt(rank * dim))
        self.noise = 0.25 / np.sqrt(dim)
        weights = rng.pareto(1.2, n_clusters) + 1.0
        self.weights = weights / weights.sum()
        self.dim, self.rank = dim, rank

    def sample(self, n: int, seed: int, chunk: int = 65_536) -> np.ndarray:
        out = np.empty((n, self.dim), np.float32)
        for start in range(0, n, chunk):
            rng = np.random.default_rng([seed, start])
            m = min(chunk, n - start)
            labels = rng.choice(len(self.weights), size=m, p=self.weights)
            x = rng.standard_normal((m, self.dim), dtype=np.float32)
            x *= self.noise
            x += self.centres[labels]
            z = rng.standard_normal((m, self.rank), dtype=np.float32)
            order = np.argsort(labels, kind="stable")
            for rows in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1):
                x[rows] += z[rows] @ self.bases[labels[rows[0]]]
            out[start : start + m] = _normalise(x)
        return out


@dataclass(frozen=True)
class AnnRow:
    size: int
    index_type: str
    device: str
    build_s: float
    batch_ms_per_query: float
    single_p50_ms: float
    qps: float
    recall_at_10: float
    batch_speedup: float  # exact flat batch time / this batch time, same size and device
    single_speedup: float  # exact flat single-query p50 / this p50
    is_default: bool  # what choose_index_type('auto') picks at this size


def _time_search(index: VectorIndex, queries: np.ndarray, singles: int) -> tuple[float, float, np.ndarray]:
    index.search(queries[:1], K)  # warm-up: first-call allocations
    start = time.perf_counter()
    _, ids = index.search(queries, K)
    batch = time.perf_counter() - start
    # FAISS searches one query on one thread anyway; with the pool at 1 no OpenMP barrier waits for
    # a thread the OS has preempted, which on a busy machine adds a whole time slice (~8 ms).
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        times = []
        for q in queries[:singles]:
            start = time.perf_counter()
            index.search(q[None, :], K)
            times.append(time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(threads)
    return batch, float(np.median(times)), ids


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / K for f, t in zip(found, truth, strict=True)]))


def ann_results(
    sizes: Sequence[int] = (100_000,),
    n_queries: int = 1000,
    *,
    types: Sequence[str] = INDEX_TYPES,
    dim: int = 512,
    singles: int = 100,
    devices: Sequence[str] | None = None,
    seed: int = 0,
    exact_max: int = 200_000,
    progress: bool = False,
) -> list[AnnRow]:
    """Measure each index type at each size (flat is always measured first, as the reference)."""
    devices = list(devices or (["cpu", "cuda"] if gpu_available() else ["cpu"]))
    mixture = SyntheticEmbeddings(dim=dim, seed=seed)
    queries = mixture.sample(n_queries, seed=seed + 1)
    rows: list[AnnRow] = []
    for size in sizes:
        vectors = mixture.sample(size, seed=seed + 2)
        # Tile ids are not contiguous in a real index.
        ids = np.arange(size, dtype=np.int64) * 3 + 7
        default = choose_index_type(size, "auto", exact_max)
        for device in devices:
            reference: tuple[float, float, np.ndarray] | None = None
            for kind in ["flat", *[t for t in types if t != "flat"]]:
                if device != "cpu" and kind == "hnsw":
                    continue  # FAISS has no GPU HNSW
                start = time.perf_counter()
                index = VectorIndex.build(ids, vectors, kind, device=device)
                build = time.perf_counter() - start
                batch, single, found = _time_search(index, queries, singles)
                if reference is None:
                    reference = (batch, single, found)
                rows.append(
                    AnnRow(
                        size=size,
                        index_type=kind,
                        device=index.device,
                        build_s=build,
                        batch_ms_per_query=1000 * batch / n_queries,
                        single_p50_ms=1000 * single,
                        qps=n_queries / batch,
                        recall_at_10=_recall(found, reference[2]),
                        batch_speedup=reference[0] / batch,
                        single_speedup=reference[1] / single,
                        is_default=kind == default,
                    )
                )
                if progress:
                    print(format_table(rows[-1:], header=False), flush=True)
                del index
                gc.collect()
        del vectors
        gc.collect()
    return rows


_COLUMNS = (
    f"{'size':>9} {'type':<6} {'dev':<4} {'build s':>8} {'batch ms/q':>10} {'1-query p50 ms':>14} "
    f"{'q/s':>9} {'recall@10':>9} {'x flat batch':>12} {'x flat 1-q':>10}"
)


def format_table(rows: Sequence[AnnRow], header: bool = True) -> str:
    lines = [_COLUMNS] if header else []
    for r in rows:
        lines.append(
            f"{r.size:>9} {r.index_type + ('*' if r.is_default else ''):<6} {r.device:<4} {r.build_s:>8.1f} "
            f"{r.batch_ms_per_query:>10.3f} {r.single_p50_ms:>14.3f} {r.qps:>9.0f} {r.recall_at_10:>9.3f} "
            f"{r.batch_speedup:>12.1f} {r.single_speedup:>10.1f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--singles", type=int, default=100, help="queries timed one at a time for the p50")
    parser.add_argument("--types", nargs="+", choices=INDEX_TYPES, default=list(INDEX_TYPES))
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args(argv)
    print(describe_machine())
    print(_COLUMNS, flush=True)
    rows = ann_results(args.sizes, args.queries, types=args.types, dim=args.dim, singles=args.singles, progress=True)
    print()
    print(format_table(rows))
    print("* = what index type 'auto' builds at this size; ratios are against exact flat on the same device")


if __name__ == "__main__":
    main()
