"""Query vectors: a text, an image or an indexed tile as one L2-normalised vector to rank tiles by.

The encoder loads on the first text or image query, so tile queries work on a machine without the model
weights. Text and image vectors are cached, and an uploaded image is kept under a reference (a prefix of
its pixel hash) that later requests (paging, cases, describe, a permalink after a restart) can name
instead of uploading the image again. Texts have their abbreviations expanded first; an image query may
be averaged over its eight rotations and flips; any query may be composed with weighted texts.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from search.archives.decode import content_hash, decode_image
from search.conch.encoder import DEFAULT_TEMPLATES, Encoder
from search.conch.words import content_words
from search.core.errors import BadQuery, HistosearchError, IndexUnavailable, NotFound
from search.core.settings import Settings
from search.storage.index_directory import IndexDirectory
from search.storage.store import Store
from search.storage.word_vectors import WordVectors

from .abbreviations import Abbreviations
from .cache import LRU
from .compose import DEFAULT_WEIGHT, compose
from .tiles import get_tile
from .tta import dihedral_views
from .uploads import REF_CHARS, UploadStore

QUERY_CACHE_SIZE = 1024
# Uploaded patches are kept as small JPEGs to show beside their results (~10 kB each).
PREVIEW_PX = 192


@dataclass(frozen=True)
class Query:
    """A query as answers name it (``{"text": ..., "searched": ...}``, ``{"image": ref}`` or
    ``{"tile_id": id}``, plus any composition), its vector, the live build it was checked against,
    the tile to leave out of its own results, its scale (um/px) when known, and for a text query
    the words it was searched with."""

    names: dict
    vector: np.ndarray
    build: dict
    exclude: int | None = None
    mpp: float | None = None
    words: tuple[str, ...] = field(default=())


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
        self.abbreviations = Abbreviations(settings.abbreviations_file)
        self.uploads = UploadStore(settings.data_dir / "uploads", settings.upload_store_bytes)
        self._image_previews = LRU(QUERY_CACHE_SIZE)
        # Why the model could not be loaded, as its error said: for /status and the page banners.
        self.load_error: str | None = None
        self._directory = IndexDirectory(settings.data_dir / "index")
        # Words embedded ahead of queries (search/storage/word_vectors.py), read again when the live build changes.
        self._word_vectors: tuple[int | None, dict[str, np.ndarray]] = (None, {})
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
            # After a restart (or once evicted from memory) the preview is made again from the kept upload.
            kept = self.uploads.load(ref)
            if kept is None:
                raise NotFound(f"image {ref!r} is not (or no longer) held by this server: upload the image again")
            found = _preview(kept)
            self._image_previews.put(ref, found)
        return found

    def query_vector(
        self,
        *,
        text: str | None = None,
        image: Image.Image | str | None = None,
        tile_id: int | None = None,
        tta: bool | None = None,
        plus: tuple[str, ...] | list[str] = (),
        minus: tuple[str, ...] | list[str] = (),
        weight: float = DEFAULT_WEIGHT,
        mpp: float | None = None,
    ) -> Query:
        """The vector of exactly one of: a morphology description, an image (or the reference an earlier
        image query returned), or an indexed tile (its stored vector, no re-embedding); composed with the
        ``plus`` and ``minus`` texts at ``weight`` when given. ``mpp`` states an image's scale."""
        if sum(x is not None for x in (text, image, tile_id)) != 1:
            raise BadQuery("give exactly one query: text, image or tile_id")
        if text is not None:
            text = self.clean_text(text)
            build = self.live_build(for_encoder=True)
            self._refresh_word_vectors(build)
            searched = self.abbreviations.expand(text)
            words = content_words(searched)
            vector = self._text_vector(searched, words)
            query = Query({"text": text, "searched": searched}, vector, build, words=words)
        elif image is not None:
            build = self.live_build(for_encoder=True)
            use_tta = self.tta_default() if tta is None else tta
            ref, vector = self._image_vector(image, use_tta)
            names: dict = {"image": ref, "tta": use_tta}
            try:
                shown = self.preview(ref)
            except NotFound:
                shown = None
            if shown is not None:
                names.update(width=shown["width"], height=shown["height"])
            query = Query(names, vector, build, mpp=mpp)
        else:
            build = self.live_build()
            tile = get_tile(self.store, tile_id)
            vector = self.store.get_embeddings([tile_id], build["model_fingerprint"])[0]
            query = Query({"tile_id": tile_id}, vector, build, exclude=tile_id, mpp=tile["mpp"])
        if not plus and not minus:
            return query
        plus = [self.abbreviations.expand(self.clean_text(t)) for t in plus]
        minus = [self.abbreviations.expand(self.clean_text(t)) for t in minus]
        self.live_build(for_encoder=True)
        vector = compose(
            query.vector, [self._text_vector(t) for t in plus], [self._text_vector(t) for t in minus], weight
        )
        names = {**query.names, "plus": plus, "minus": minus, "weight": weight}
        return Query(names, vector, query.build, query.exclude, query.mpp, query.words)

    def tta_default(self, *, load: bool = True) -> bool:
        """Rotation/flip averaging for image queries: the setting ``tta``, else on only for a GPU encoder
        (on a CPU it costs eight forward passes). ``load=False`` answers without building the encoder
        (off until it is built), for pages that only show the default."""
        if self.settings.query_tta is not None:
            return self.settings.query_tta
        if not load and self._encoder is None:
            return False
        return self.encoder().device.type == "cuda"

    def image_ref(self, image: Image.Image, tta: bool | None = None) -> str:
        """Embed an uploaded image, keep it on disk and its vector in memory under the returned reference."""
        self.live_build(for_encoder=True)
        return self._image_vector(image, self.tta_default() if tta is None else tta)[0]

    def text_vectors(self, texts: list[str]) -> np.ndarray:
        """Plain (not ensembled) vectors of short texts, one forward pass for those not cached."""
        # Keyed as a query text embedded without ensembling: a one-word query's word is already cached.
        missing = [t for t in dict.fromkeys(texts) if self._plain_vector(t) is None]
        if missing:
            encoder = self.encoder()
            with self._model_lock:
                vectors = encoder.encode_texts(missing)
            for t, v in zip(missing, vectors, strict=True):
                self._text_vectors.put((False, t), v)
        return np.stack([self._plain_vector(t) for t in texts]) if texts else np.zeros((0, 1))

    def _plain_vector(self, text: str) -> np.ndarray | None:
        """A text's cached vector without ensembling, or a word's embedded ahead of queries; None if neither."""
        found = self._text_vectors.get((False, text))
        return found if found is not None else self._word_vectors[1].get(text)

    def _refresh_word_vectors(self, build: dict) -> None:
        if self._word_vectors[0] != build["id"]:
            self._word_vectors = (build["id"], WordVectors(self.settings.data_dir, build["model_fingerprint"]).load())

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

    def _text_vector(self, text: str, words: tuple[str, ...] = ()) -> np.ndarray:
        """The vector of a query text; its ``words`` not yet cached are embedded in the same forward pass
        (for their per-word scores): on a CPU, reading the text tower's weights costs a short batch about
        what it costs one text, so a second pass for the words would nearly double the query's time."""
        ensemble = self.settings.prompt_ensemble
        vector = self._text_vectors.get((ensemble, text)) if ensemble else self._plain_vector(text)
        # Without ensembling a one-word query is its own word: the same cache entry, embedded once.
        missing = [w for w in words if self._plain_vector(w) is None and (ensemble or w != text)]
        if vector is not None and not missing:
            return vector
        phrasings = [] if vector is not None else [t.format(text) for t in DEFAULT_TEMPLATES] if ensemble else [text]
        encoder = self.encoder()
        with self._model_lock:
            embedded = encoder.encode_texts(phrasings + missing)
        if vector is None:
            mean = embedded[: len(phrasings)].mean(axis=0)
            # The same average as Encoder.encode_texts(templates=...); one phrasing is its own vector.
            vector = mean / np.linalg.norm(mean) if ensemble else embedded[0]
            self._text_vectors.put((ensemble, text), vector)
        for word, word_vector in zip(missing, embedded[len(phrasings) :], strict=True):
            self._text_vectors.put((False, word), word_vector)
        return vector

    def _image_vector(self, image: Image.Image | str, tta: bool) -> tuple[str, np.ndarray]:
        if isinstance(image, str):
            ref = image
            vector = self._image_vectors.get((ref, tta))
            if vector is not None:
                return ref, vector
            kept = self.uploads.load(ref)
            if kept is None:
                raise BadQuery(f"image {ref!r} is not (or no longer) held by this server: upload the image again")
            image = kept
        else:
            decode_image(image, "uploaded image", self.settings.max_image_pixels)
            image = image.convert("RGB")
            ref = content_hash(image)[:REF_CHARS]
            self.uploads.save(ref, image)
        vector = self._image_vectors.get((ref, tta))
        if vector is None:
            encoder = self.encoder()
            pixels = encoder.preprocess.resize_crop(image)
            with self._model_lock:
                if tta:
                    views = encoder.encode_uint8(dihedral_views(pixels))
                    mean = views.mean(axis=0)
                    vector = mean / np.linalg.norm(mean)
                else:
                    vector = encoder.encode_uint8(pixels[None])[0]
            self._image_vectors.put((ref, tta), vector)
        if self._image_previews.get(ref) is None:
            self._image_previews.put(ref, _preview(image))
        return ref, vector


def _preview(image: Image.Image) -> dict:
    small = image.convert("RGB")
    small.thumbnail((PREVIEW_PX, PREVIEW_PX))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=85)
    return {"width": image.width, "height": image.height, "jpeg": buffer.getvalue()}
