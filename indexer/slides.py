"""Slide vectors at index time: computed for new or changed slides, dropped with their slides, and published
as one exact FAISS index per kind beside the tile index (same atomic pointer swap, so servers reload live).

Built-in kinds (``mean``, ``medoid``) come from the stored CONCH tile vectors. The ``wsc`` kind runs the
Whole Slide Concepts model on a bag of the slide's tiles, re-read from their archives, when the
``wsc_weights`` setting names a local weights file (docs/slides.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from search.archives.decode import decode_image
from search.archives.readers import open_reader
from search.conch.encoder import resolve_device
from search.core.errors import BadInput
from search.core.settings import Settings
from search.slides.aggregate import MEDOID_FRACTION, METHODS, slide_vector
from search.storage.slides import slide_index_directory, tiles_digest
from search.storage.store import Store
from search.storage.vectors import VectorIndex
from search.wsc.bag import BagParams, attention_per_tile, bag_from_tiles
from search.wsc.cache import load_wsc, sha256_bytes
from search.wsc.model import MMM_VERSION

BUILTIN_METHODS = {"mean": "mean", "medoid": f"medoid(fraction={MEDOID_FRACTION})"}


@dataclass
class SlideReport:
    updated: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def publish_slide_index(store: Store, settings: Settings, kind: str) -> bool:
    """Build the exact index of ``kind``'s slide vectors and publish it; unpublish when none are left."""
    directory = slide_index_directory(settings.data_dir, kind)
    ids, vectors = store.slide_vectors(kind)
    if len(ids) == 0:
        directory.unpublish()
        return False
    index = VectorIndex.build(ids, vectors, "flat", device="cpu")
    build_id = max([*directory.build_ids(), directory.live_build_id() or 0]) + 1
    index.save(directory.build_path(build_id))
    directory.publish(build_id)
    return True


def _stale(store: Store, kind: str, fingerprint: str, method: str, groups: dict[int, list[tuple[int, str]]]
           ) -> tuple[dict[int, str], list[int]]:  # fmt: skip
    stored = store.slide_vector_digests(kind)
    todo = {}
    for slide_id, pairs in groups.items():
        digest = tiles_digest(pairs, fingerprint)
        if stored.get(slide_id) != (digest, fingerprint, method):
            todo[slide_id] = digest
    return todo, [s for s in stored if s not in groups]


def _finish(store: Store, settings: Settings, kind: str, todo: dict, gone: list[int], report: SlideReport) -> None:
    store.delete_slide_vectors(kind, gone)
    report.updated[kind] = len(todo)
    report.removed[kind] = len(gone)
    directory = slide_index_directory(settings.data_dir, kind)
    if (todo or gone or directory.live_build_id() is None) and publish_slide_index(store, settings, kind):
        report.published.append(kind)


def _tile_vectors(store: Store, fingerprint: str, wanted: dict[int, int]) -> dict[int, list[np.ndarray]]:
    """The stored vectors of the tiles in ``wanted`` (tile id -> slide id), grouped by slide, one pass."""
    out: dict[int, list[np.ndarray]] = {}
    for ids, vectors in store.iter_embeddings(fingerprint):
        for tile_id, vector in zip(ids.tolist(), vectors, strict=True):
            slide_id = wanted.get(tile_id)
            if slide_id is not None:
                out.setdefault(slide_id, []).append(vector)
    return out


def sync_builtin(store: Store, settings: Settings, fingerprint: str, report: SlideReport) -> None:
    groups = store.tiles_by_slide()
    plans = {kind: _stale(store, kind, fingerprint, BUILTIN_METHODS[kind], groups) for kind in METHODS}
    needed = set().union(*(todo for todo, _ in plans.values()))
    wanted = {tile_id: slide_id for slide_id in needed for tile_id, _ in groups[slide_id]}
    vectors = _tile_vectors(store, fingerprint, wanted) if wanted else {}
    for kind, (todo, gone) in plans.items():
        done = {}
        for slide_id, digest in todo.items():
            if slide_id not in vectors:
                gone.append(slide_id)  # no embedded tile (all failed to read): no slide vector
                continue
            tiles = np.stack(vectors[slide_id])
            store.set_slide_vector(slide_id, kind, slide_vector(tiles, kind), model_fingerprint=fingerprint,
                                   method=BUILTIN_METHODS[kind], tiles_digest=digest, n_tiles=len(tiles))  # fmt: skip
            done[slide_id] = digest
        _finish(store, settings, kind, done, gone, report)


# (weights, cache dir, trusted sha256, device) -> (model with embed_bag, weights sha256)
WscLoader = Callable[[Path, Path, "str | None", str], tuple[object, str]]


def _default_wsc_loader(weights: Path, cache_dir: Path, trusted: str | None, device: str) -> tuple[object, str]:
    return load_wsc(weights, cache_dir, trusted, device)


def wsc_fingerprint(weights_sha256: str, params: BagParams) -> str:
    return f"wsc:{weights_sha256[:16]}:mmm{MMM_VERSION}:{params.describe()}"


def sync_wsc(store: Store, settings: Settings, report: SlideReport, loader: WscLoader = _default_wsc_loader) -> None:
    """WSC vectors for slides whose tiles changed since their vector was made (or all, for new weights)."""
    params = BagParams(settings.wsc_mpp, settings.wsc_max_tiles, settings.wsc_seed)
    weights = Path(settings.wsc_weights)
    if not weights.is_file():
        report.errors.append(f"{weights}: no such WSC weights file (wsc_weights): WSC slide vectors not updated")
        return
    fingerprint = wsc_fingerprint(sha256_bytes(weights.read_bytes()), params)
    groups = store.tiles_by_slide()
    todo, gone = _stale(store, "wsc", fingerprint, "wsc", groups)
    model = None
    if todo:
        device = str(resolve_device(settings.device))
        model, _ = loader(weights, settings.cache_dir, settings.wsc_trusted_sha256, device)
    done = {}
    for slide_id, tiles_hash in todo.items():
        tiles = store.get_tiles([tile_id for tile_id, _ in groups[slide_id]])
        images, mpps, ids = _read_tiles(tiles, settings, report)
        if not images:
            gone.append(slide_id)
            continue
        bag, source = bag_from_tiles(images, mpps, params)
        embedding = model.embed_bag(bag)
        weights = attention_per_tile(embedding.attention, source, len(ids))
        vector = embedding.vector.numpy().astype(np.float32)
        vector /= max(float(np.linalg.norm(vector)), 1e-12)
        store.set_slide_vector(slide_id, "wsc", vector, model_fingerprint=fingerprint, method="wsc",
                               tiles_digest=tiles_hash, n_tiles=len(bag),
                               attention=(np.array(ids, dtype=np.int64), weights))  # fmt: skip
        done[slide_id] = tiles_hash
    _finish(store, settings, "wsc", done, gone, report)


def _read_tiles(tiles: list[dict], settings: Settings, report: SlideReport
                ) -> tuple[list[Image.Image], list[float | None], list[int]]:  # fmt: skip
    images, mpps, ids = [], [], []
    readers: dict[str, object] = {}
    try:
        for tile in tiles:
            uri = tile["source"]["uri"]
            try:
                if uri not in readers:
                    readers[uri] = open_reader(Path(uri), settings)
                data = readers[uri].read(tile["locator"])
                images.append(decode_image(data, f"{uri}: {tile['path']}", settings.max_image_pixels).convert("RGB"))
            except BadInput as exc:
                report.errors.append(exc.message)
                continue
            mpps.append(tile["mpp"])
            ids.append(tile["id"])
    finally:
        for reader in readers.values():
            reader.close()
    return images, mpps, ids


def sync_slide_vectors(store: Store, settings: Settings, fingerprint: str, wsc_loader: WscLoader | None = None
                       ) -> SlideReport:  # fmt: skip
    report = SlideReport()
    sync_builtin(store, settings, fingerprint, report)
    if settings.wsc_weights is not None:
        sync_wsc(store, settings, report, wsc_loader or _default_wsc_loader)
    return report
