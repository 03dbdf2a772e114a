"""Vectors of an evaluation set: embedded by the model (cached by content), or read from the live index's store.

The cache key is the model fingerprint, the ordered content hashes of the images and the
test-time augmentation, never a path: a renamed copy of a set reuses its vectors, an edited image
misses. Comparing two index types therefore embeds a set once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from search.archives.decode import decode_image
from search.conch.encoder import Encoder
from search.core.errors import BadInput
from search.storage.store import Store
from search.storage.vectors import VectorIndex


class EmbeddingCache:
    """``<root>/<model fingerprint>/<key>.npy`` files, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, fingerprint: str, hashes: Sequence[str], variant: str) -> Path:
        key = hashlib.sha256("\n".join([variant, *hashes]).encode()).hexdigest()[:32]
        return self.root / fingerprint / f"{key}.npy"

    def load(self, fingerprint: str, hashes: Sequence[str], variant: str) -> np.ndarray | None:
        path = self.path(fingerprint, hashes, variant)
        try:
            vectors = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # absent, or a half-written file from a killed run: embed again
        return vectors if vectors.ndim == 2 and len(vectors) == len(hashes) else None

    def save(self, fingerprint: str, hashes: Sequence[str], variant: str, vectors: np.ndarray) -> Path:
        path = self.path(fingerprint, hashes, variant)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.npy")
        try:
            np.save(tmp, np.ascontiguousarray(vectors, dtype=np.float32))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def _tta_views(image: Image.Image) -> list[Image.Image]:
    """The tile, its horizontal and vertical mirror images and its 180-degree turn: H&E has no up or left."""
    return [
        image,
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        image.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        image.transpose(Image.Transpose.ROTATE_180),
    ]


def embed_images(
    encoder: Encoder,
    paths: Sequence[Path],
    *,
    max_pixels: int,
    tta: bool = False,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """float32 [n, dim] image embeddings, a batch at a time; with ``tta`` the renormalised mean over the views."""
    out = np.empty((len(paths), encoder.dim), np.float32)
    for start in range(0, len(paths), encoder.batch_size):
        batch = paths[start : start + encoder.batch_size]
        images = []
        for path in batch:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise BadInput(f"{path}: cannot read ({exc.strerror})") from None
            images.append(decode_image(data, str(path), max_pixels).convert("RGB"))
        if tta:
            views = encoder.encode_images([view for image in images for view in _tta_views(image)])
            mean = views.reshape(len(images), 4, -1).mean(axis=1)
            vectors = mean / np.linalg.norm(mean, axis=1, keepdims=True)
        else:
            vectors = encoder.encode_images(images)
        out[start : start + len(batch)] = vectors
        if progress is not None:
            progress(len(batch))
    return out


def cached_image_vectors(
    encoder: Encoder,
    cache: EmbeddingCache,
    paths: Sequence[Path],
    hashes: Sequence[str],
    *,
    max_pixels: int,
    tta: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, bool]:
    """(vectors, whether they came from the cache)."""
    variant = "tta4" if tta else "plain"
    vectors = cache.load(encoder.fingerprint, hashes, variant)
    if vectors is not None:
        return vectors, True
    vectors = embed_images(encoder, paths, max_pixels=max_pixels, tta=tta, progress=progress)
    cache.save(encoder.fingerprint, hashes, variant, vectors)
    return vectors, False


def indexed_vectors(
    store: Store, index: VectorIndex, model_fingerprint: str, hashes: Sequence[str], where: str
) -> tuple[np.ndarray, np.ndarray]:
    """(tile ids, stored vectors) of the images with these content hashes in the live index.

    BadInput names how many are missing: the set must be indexed first (or evaluated with --exact).
    """
    found = store.tile_ids_by_content_hash(list(dict.fromkeys(hashes)))
    ids = np.array([found.get(h, -1) for h in hashes], np.int64)
    ids[~np.isin(ids, index.ids)] = -1
    missing = int((ids < 0).sum())
    if missing:
        raise BadInput(
            f"{where}: {missing} of {len(hashes)} images are not in the live index: index them with "
            "`histosearch index FOLDER` (same bytes), or evaluate the set on its own with --exact"
        )
    return ids, store.get_embeddings(ids.tolist(), model_fingerprint)
