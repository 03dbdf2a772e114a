"""A small real index for engine and web tests: PNG tiles in a folder, embedded, stored and published.

Two cases with two slides each. Slide ``C1-S1`` is a 3 x 3 grid of tiles with level/x/y so it has
neighbours; the others are plain tile files. Every tile carries an ``organ`` in its meta; one carries
markup in its meta and one caption carries markup, for the escaping tests. The steps are the ones the
indexer takes (store rows + vectors, texts, FAISS build, publish, mark live), kept small so the
indexer itself can replace this function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from search.conch.encoder import Encoder
from search.core.settings import Settings
from search.storage.build_checks import publish_build
from search.storage.index_directory import IndexDirectory
from search.storage.store import Store
from search.storage.vectors import VectorIndex

TILE_PX = 64
GRID_STEP = 64
HOSTILE = "<script>alert('x')</script>"
CASES = {"C1": "breast", "C2": "colon"}
SLIDES = {"C1-S1": "C1", "C1-S2": "C1", "C2-S1": "C2", "C2-S2": "C2"}
CAPTIONS = [
    "cribriform glands with comedonecrosis",
    "normal colonic mucosa",
    "dense lymphocytic infiltrate",
    "sheets of pleomorphic tumour cells",
    f"{HOSTILE} glandular epithelium",
]
TERMS = ["necrosis", "mitosis", "adipose tissue", "stroma"]


@dataclass
class IndexedArchive:
    settings: Settings
    store: Store
    folder: Path
    ids: dict[str, int]  # tile path -> tile id
    vectors: dict[int, np.ndarray]  # tile id -> stored vector
    build: dict
    fingerprint: str

    def image(self, path: str) -> Image.Image:
        with Image.open(self.folder / path) as im:
            return im.convert("RGB")


def tile_image(seed: int) -> Image.Image:
    """A distinct coloured and patterned tile: a base colour, stripes at a seed-dependent period, noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 216, size=3)
    yy, xx = np.mgrid[0:TILE_PX, 0:TILE_PX]
    period = 4 + seed % 7
    stripes = ((xx + (yy if seed % 2 else 0)) // period) % 2
    pixels = base + stripes[..., None] * rng.integers(-40, 40, size=3) + rng.integers(-25, 25, (TILE_PX, TILE_PX, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _tiles() -> list[dict]:
    """(path, slide, grid position or None, meta) for every tile."""
    tiles = []
    for gy in range(3):
        for gx in range(3):
            tiles.append({"path": f"C1/C1-S1/tile_{gx}_{gy}.png", "slide": "C1-S1", "grid": (gx, gy)})
    for slide in ("C1-S2", "C2-S1", "C2-S2"):
        case = SLIDES[slide]
        tiles += [{"path": f"{case}/{slide}/t{n}.png", "slide": slide, "grid": None} for n in range(7)]
    for tile in tiles:
        tile["meta"] = {"organ": CASES[SLIDES[tile["slide"]]]}
    tiles[-1]["meta"]["comment"] = HOSTILE
    return tiles


def build_index(settings: Settings, encoder: Encoder, folder: Path) -> IndexedArchive:
    """Write ~30 tiles under ``folder`` and index them into ``settings.data_dir``; returns what tests need."""
    tiles = _tiles()
    images = []
    for seed, tile in enumerate(tiles):
        path = folder / tile["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        image = tile_image(seed)
        image.save(path)
        images.append(image)
    vectors = encoder.encode_images(images)

    store = Store(settings.db_url)
    source_id = store.get_or_create_source("folder", str(folder))
    case_ids = {case: store.upsert_case(case) for case in CASES}
    slide_ids = {
        slide: store.upsert_slide(slide, source_id, case_ids[case], str(folder / case / slide), mpp=0.5)
        for slide, case in SLIDES.items()
    }
    rows = []
    for tile in tiles:
        grid = tile["grid"]
        size = (folder / tile["path"]).stat().st_size
        rows.append(
            {
                "source_id": source_id,
                "locator": tile["path"],
                "path": tile["path"],
                "slide_id": slide_ids[tile["slide"]],
                "level": 0 if grid else None,
                "x": grid[0] * GRID_STEP if grid else None,
                "y": grid[1] * GRID_STEP if grid else None,
                "width": TILE_PX,
                "height": TILE_PX,
                "size": size,
                "mpp": 0.5,
                "content_hash": f"hash-{tile['path']}",
                "fingerprint": f"{size}:0",
                "meta": tile["meta"],
            }
        )
    ids = store.add_tiles(rows, vectors, encoder.fingerprint)
    # What the store keeps (float16): the vectors every stored-vector path sees.
    vectors = store.get_embeddings(ids, encoder.fingerprint)
    for corpus, texts in (("captions", CAPTIONS), ("terms", TERMS)):
        store.add_texts(corpus, [(t, {}) for t in texts], encoder.encode_texts(texts), encoder.fingerprint)

    index = VectorIndex.build(np.asarray(ids, dtype=np.int64), vectors, "flat")
    directory = IndexDirectory(settings.data_dir / "index")
    publish_build(
        store,
        directory,
        index,
        np.asarray(ids, dtype=np.int64),
        vectors,
        encoder.fingerprint,
        calibration_size=settings.calibration_sample,
        min_recall=settings.min_recall,
        recall_queries=settings.recall_queries,
    )
    return IndexedArchive(
        settings=settings,
        store=store,
        folder=folder,
        ids={tile["path"]: tile_id for tile, tile_id in zip(tiles, ids, strict=True)},
        vectors=dict(zip(ids, vectors, strict=True)),
        build=store.live_build(),
        fingerprint=encoder.fingerprint,
    )
