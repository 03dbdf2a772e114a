"""Query vectors: a text, an image or an indexed tile as one L2-normalised vector to rank tiles by.

The encoder loads on the first text or image query, so tile queries work on a machine without the model
weights. Text and image vectors are cached, and an uploaded image's vector is kept under a reference
that later requests (paging, cases, describe) can name instead of uploading the image again.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from search.archives.decode import content_hash, decode_image
from search.conch.encoder import DEFAULT_TEMPLATES, Encoder
from search.core.errors import BadQuery, HistosearchError, IndexUnavailable, NotFound
from search.core.settings import Settings
from search.storage.index_directory import IndexDirectory
from search.storage.store import Store

from .cache import LRU
from .tiles import get_tile

QUERY_CACHE_SIZE = 1024
# Uploaded patches are kept as small JPEGs to show beside their results (~10 kB each).
PREVIEW_PX = 192


@dataclass(frozen=True)
class Query:
    """A query as answers name it (``{"text": ...}``, ``{"image": ref}`` or ``{"tile_id": id}``), its
    vector, the live build it was checked against, and the tile to leave out of its own results."""

    names: dict
    vector: np.ndarray
    build: dict
    exclude: int | None = None


class QueryVectors:
    """Turns text, image and tile queries into vectors, under the model the live index was built with."""

    def __init__(self, settings: Settings, store: Store, encoder: Encoder | None = None) -> None:
        self.settings = settings
        self.store = store
        self._encoder = encoder
        self._encoder_lock = threading.Lock()
        # One forward pass at a time: parallel passes on a few CPU cores only slow each other down.
        self._model_lock = threading.Lock()
        self._text_vectors = LRU(QUERY_CACHE_SIZE)
        self._image_vectors = LRU(QUERY_CACHE_SIZE)
        self._image_previews = LRU(QUERY_CACHE_SIZE)
        # Why the model could not be loaded, as its error said: for /status and the page banners.
        self.load_error: str | None = None
        self._directory = IndexDirectory(settings.data_dir / "index")
        self._build_row: tuple[tuple[int, int, int], dict] | None = None

    @property
    def loaded_encoder(self) -> Encoder | None:
        """The encoder if it has been built, without building it."""
        return self._encoder

    def encoder(self) -> Encoder:
        """The encoder, built from the settings on first use."""
        if self._encoder is None:
            with self._encoder_lock:
                if self._encoder is None:
                    try:
                        self._encoder = Encoder.from_settings(self.settings)
                    except HistosearchError as exc:
                        self.load_error = exc.message
                        raise
                    self.load_error = None
        return self._encoder

    def preview(self, ref: str) -> dict:
        """An uploaded image kept under ``ref``: ``{"width", "height", "jpeg"}`` (a small JPEG to show)."""
        found = self._image_previews.get(ref)
        if found is None:
            raise NotFound(f"image {ref!r} is not (or no longer) held by this server: upload the image again")
        return found

    def query_vector(
        self, *, text: str | None = None, image: Image.Image | str | None = None, tile_id: int | None = None
    ) -> Query:
        """The vector of exactly one of: a morphology description, an image (or the reference an earlier
        image query returned), or an indexed tile (its stored vector, no re-embedding)."""
        if sum(x is not None for x in (text, image, tile_id)) != 1:
            raise BadQuery("give exactly one query: text, image or tile_id")
        if text is not None:
            text = self.clean_text(text)
            build = self.live_build(for_encoder=True)
            return Query({"text": text}, self._text_vector(text), build)
        if image is not None:
            build = self.live_build(for_encoder=True)
            ref, vector = self._image_vector(image)
            names: dict = {"image": ref}
            kept = self._image_previews.get(ref)
            if kept is not None:
                names.update(width=kept["width"], height=kept["height"])
            return Query(names, vector, build)
        build = self.live_build()
        get_tile(self.store, tile_id)
        vector = self.store.get_embeddings([tile_id], build["model_fingerprint"])[0]
        return Query({"tile_id": tile_id}, vector, build, exclude=tile_id)

    def image_ref(self, image: Image.Image) -> str:
        """Embed an uploaded image and keep its vector in memory under the returned reference."""
        self.live_build(for_encoder=True)
        return self._image_vector(image)[0]

    def clean_text(self, query: str) -> str:
        text = " ".join((query or "").split())
        if not text:
            raise BadQuery("empty query: describe the morphology to look for, e.g. 'cribriform glands'")
        if len(text) > self.settings.max_query_chars:
            raise BadQuery(
                f"the query is {len(text)} characters long; the limit is {self.settings.max_query_chars} "
                "(setting max_query_chars)"
            )
        return text

    def live_build(self, *, for_encoder: bool = False) -> dict:
        """The live build; with ``for_encoder``, also checked to be embedded by this server's model."""
        build = self._cached_live_build()
        if build is None:
            raise IndexUnavailable("no index has been built yet: run `histosearch index FOLDER` to build one")
        if for_encoder:
            fingerprint = self.encoder().fingerprint
            if build["model_fingerprint"] != fingerprint:
                raise IndexUnavailable(
                    f"the live index was built with model {build['model_fingerprint']}, but this server runs "
                    f"{fingerprint}: run `histosearch reindex` to embed the tiles with this model"
                )
        return build

    def _cached_live_build(self) -> dict | None:
        """The live build's row, read again only when the index pointer changes (one stat, not a query)."""
        stamp = self._directory.pointer_stamp()
        cached = self._build_row
        if cached is not None and cached[0] == stamp:
            return cached[1]
        build = self.store.live_build()
        try:
            pointed = self._directory.live_build_id()
        except IndexUnavailable:
            return build  # a damaged pointer: the index load says so
        # A publish swaps the pointer, then marks its row live: keep the row only once both agree.
        if build is not None and stamp is not None and build["id"] == pointed:
            self._build_row = (stamp, build)
        return build

    def _text_vector(self, text: str) -> np.ndarray:
        vector = self._text_vectors.get(text)
        if vector is None:
            encoder = self.encoder()
            with self._model_lock:
                templates = DEFAULT_TEMPLATES if self.settings.prompt_ensemble else None
                vector = encoder.encode_texts([text], templates=templates)[0]
            self._text_vectors.put(text, vector)
        return vector

    def _image_vector(self, image: Image.Image | str) -> tuple[str, np.ndarray]:
        if isinstance(image, str):
            vector = self._image_vectors.get(image)
            if vector is None:
                raise BadQuery(f"image {image!r} is not (or no longer) held by this server: upload the image again")
            return image, vector
        decode_image(image, "uploaded image", self.settings.max_image_pixels)
        ref = content_hash(image)[:20]
        vector = self._image_vectors.get(ref)
        if vector is None:
            encoder = self.encoder()
            with self._model_lock:
                vector = encoder.encode_images([image.convert("RGB")])[0]
            self._image_vectors.put(ref, vector)
        if self._image_previews.get(ref) is None:
            self._image_previews.put(ref, _preview(image))
        return ref, vector


def _preview(image: Image.Image) -> dict:
    small = image.convert("RGB")
    small.thumbnail((PREVIEW_PX, PREVIEW_PX))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=85)
    return {"width": image.width, "height": image.height, "jpeg": buffer.getvalue()}
