"""The kinds of FAISS index over tile embeddings: which to build, how each is made, its sizes and training.

Embeddings are L2-normalised float32, so similarity is the inner product. Every index is an
``IndexIDMap2`` whose ids are tile ids (int64, not contiguous: ids are never reused after deletes);
``IDMap2`` keeps the reverse map that ``reconstruct`` needs.

Index types:

- ``flat``: exact inner product. The ``auto`` choice up to ``exact_max`` vectors.
- ``ivf``: IVF-Flat (inverted lists of raw vectors). The ``auto`` choice past ``exact_max``: in
  ``bench/ann.py`` at 1M vectors it keeps recall@10 >= 0.95 while searching >= 10x faster than ``flat``.
- ``ivfpq``: IVF with product-quantised codes of ``dim // 4`` bytes (16x smaller than raw vectors); for
  archives whose raw vectors do not fit in memory, at a recall cost (0.88 at 100k, 0.81 at 1M, 512-d).
- ``ivfsq8``: IVF with 8-bit scalar-quantised vectors (4x smaller than raw ones; trains no more than ``ivf``).
- ``hnsw``: HNSW graph (M=32) over raw vectors; CPU only (FAISS has no GPU HNSW).
"""

from __future__ import annotations

import math

try:
    import faiss
except ImportError:  # neither FAISS build: they are extras so that the two never land together
    raise ImportError(
        "FAISS is not installed: pip install 'histosearch[cpu]' (or 'histosearch[gpu]' on a CUDA machine, never both)"
    ) from None

from search.core.errors import ConfigError

INDEX_TYPES = ("flat", "ivf", "ivfpq", "ivfsq8", "hnsw")
# Types built on inverted lists: trained by k-means, searched with nprobe.
IVF_TYPES = frozenset({"ivf", "ivfpq", "ivfsq8"})
# `python -m bench.ann` at 1M synthetic 512-d vectors on 2 CPU cores: ivf (default nprobe 25) had the best
# recall@10, 0.994, at 15x exact's batch and 96x its single-query speed; hnsw was faster (24x / 196x) at
# recall 0.980 but is CPU-only, and its graph walk suffers more from filters and from text queries that
# lie outside the image distribution; ivfpq reached 0.81.
APPROXIMATE_DEFAULT = "ivf"

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
# k-means gets this many training points per inverted list (FAISS warns below 39, caps at 256):
# a 1M-vector IVF build then takes about 2 minutes on 2 CPU cores.
TRAIN_POINTS_PER_LIST = 64
TRAIN_SEED = 1234


def choose_index_type(n: int, requested: str = "auto", exact_max: int = 200_000) -> str:
    """The index type to build for ``n`` vectors: ``requested`` itself, or for ``auto`` exact search
    while ``n <= exact_max`` and the measured approximate default past it."""
    if requested == "auto":
        return "flat" if n <= exact_max else APPROXIMATE_DEFAULT
    if requested not in INDEX_TYPES:
        raise ConfigError(f"unknown index type {requested!r}: use one of auto, {', '.join(INDEX_TYPES)}")
    return requested


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: about 4*sqrt(n), with enough points per list to train."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39, 65_536))


def default_nprobe(nlist: int) -> int:
    """Lists probed per query: grows like sqrt(nlist) (16 up to 1,600 lists, 25 at 4,000: the
    benchmark's 1M size, recall@10 0.993), so the scanned share of the index shrinks as it grows."""
    return min(nlist, max(16, round(0.4 * math.sqrt(nlist))))


def pq_subquantizers(dim: int) -> int:
    """PQ code bytes per vector: sub-vectors of 4 dims (2 below 128-d, where 4-dim codebooks
    trained on a small index lose too much recall)."""
    target = dim // (4 if dim >= 128 else 2)
    return next(m for m in range(max(1, target), 0, -1) if dim % m == 0)


def _new_index(kind: str, dim: int, n: int, nprobe: int | None) -> faiss.IndexIDMap2:
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, HNSW_M, ip)
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        nlist = ivf_nlist(n)
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            inner = faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
        elif kind == "ivfsq8":
            inner = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, ip)
        else:
            inner = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_subquantizers(dim), 8, ip)
            inner.pq.cp.seed = TRAIN_SEED
        inner.own_fields = True
        quantizer.this.disown()
        inner.cp.seed = TRAIN_SEED
        inner.nprobe = min(nlist, nprobe or default_nprobe(nlist))
    index = faiss.IndexIDMap2(inner)
    index.own_fields = True
    inner.this.disown()
    return index


def _inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index)


def _kind_of(index: faiss.Index) -> str | None:
    if not isinstance(index, faiss.IndexIDMap2) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    inner = _inner(index)
    # An IndexFlatIP, or the plain IndexFlat a GPU index copies back to, is an IndexFlat.
    for cls, kind in (
        (faiss.IndexFlat, "flat"),
        (faiss.IndexIVFPQ, "ivfpq"),
        (faiss.IndexIVFScalarQuantizer, "ivfsq8"),
        (faiss.IndexIVFFlat, "ivf"),
        (faiss.IndexHNSWFlat, "hnsw"),
    ):
        if isinstance(inner, cls):
            return kind
    return None
