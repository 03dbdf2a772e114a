"""Synthetic slides built from known tile mixtures, for slide-vector and slide-search tests.

Each slide is a grid of tiles whose vectors are drawn around a few orthogonal "tissue" prototypes in set
proportions, so which slides resemble which is known in advance. The tile vectors are stored as a model's
embeddings and published as the live tile index, the way the indexer leaves them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from search.core.settings import Settings
from search.storage.index_directory import IndexDirectory
from search.storage.store import Store
from search.storage.vectors import VectorIndex

DIM = 16
PITCH = 448
FINGERPRINT = "synthetic-model"
# slide key -> (case key, {prototype: tile count}); tiles laid out row-major on a 4-column grid.
MIXTURES = {
    "A-1": ("case-A", {0: 7, 1: 3}),
    "A-2": ("case-A", {0: 7, 1: 3}),  # same case, same mixture as A-1
    "B-1": ("case-B", {0: 6, 1: 4}),  # other case, nearly A-1's mixture
    "C-1": ("case-C", {1: 2, 2: 8}),
    "D-1": ("case-D", {3: 9, 2: 1}),
}


@dataclass
class SyntheticSlides:
    store: Store
    slide_ids: dict[str, int]
    tiles: dict[str, list[int]]  # slide key -> tile ids, in grid order
    vectors: dict[int, np.ndarray]  # tile id -> unit vector
    source_id: int


def prototypes() -> np.ndarray:
    return np.eye(DIM, dtype=np.float32)[:4]


def add_slide(store: Store, source_id: int, key: str, case: str, mixture: dict[int, int], seed: int,
              fingerprint: str = FINGERPRINT) -> tuple[int, list[int], dict[int, np.ndarray]]:  # fmt: skip
    rng = np.random.default_rng(seed)
    case_id = store.upsert_case(case)
    slide_id = store.upsert_slide(key, source_id, case_id, f"{case}/{key}")
    kinds = [p for p, n in mixture.items() for _ in range(n)]
    vectors = prototypes()[kinds] + 0.15 * rng.normal(size=(len(kinds), DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [
        {
            "source_id": source_id, "locator": f"{key}/t{n}.png", "path": f"{key}/t{n}.png", "slide_id": slide_id,
            "level": 0, "x": (n % 4) * PITCH, "y": (n // 4) * PITCH, "width": 224, "height": 224, "size": 100,
            "mpp": 0.5, "content_hash": f"{key}-{n}", "fingerprint": "f", "meta": {},
        }
        for n in range(len(kinds))
    ]  # fmt: skip
    ids = store.add_tiles(rows, vectors, fingerprint)
    return slide_id, ids, dict(zip(ids, vectors, strict=True))


def publish_tiles(store: Store, settings: Settings, fingerprint: str = FINGERPRINT) -> None:
    ids, vectors = zip(*((i, v) for chunk in store.iter_embeddings(fingerprint) for i, v in zip(*chunk, strict=True)),
                       strict=True)  # fmt: skip
    index = VectorIndex.build(np.array(ids), np.stack(vectors), "flat", device="cpu")
    directory = IndexDirectory(settings.data_dir / "index")
    build_id = store.add_build(fingerprint, index.index_type, index.ntotal, "", index.device)
    index.save(directory.build_path(build_id))
    directory.publish(build_id)
    store.set_build_status(build_id, "live")


def synthetic_slides(settings: Settings) -> SyntheticSlides:
    store = Store(settings.db_url)
    source_id = store.get_or_create_source("folder", str(settings.data_dir / "nowhere"))
    slide_ids, tiles, vectors = {}, {}, {}
    for seed, (key, (case, mixture)) in enumerate(MIXTURES.items()):
        slide_ids[key], tiles[key], v = add_slide(store, source_id, key, case, mixture, seed)
        vectors.update(v)
    publish_tiles(store, settings)
    return SyntheticSlides(store, slide_ids, tiles, vectors, source_id)
