"""The query engine: the one API the web UI and the CLI both call.

Text, image and tile queries become one L2-normalised vector, FAISS ranks the live build's tiles by
cosine similarity, and the store turns the ids back into tiles. Every method returns a plain dict,
which is exactly what the JSON API serves. The encoder loads on the first text or image query, so
``similar``, tile pages and status work on a machine without the model weights.
"""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from search.archives.decode import content_hash, decode_image
from search.archives.readers import Reader, open_reader
from search.conch.config import get_model_cfg
from search.conch.encoder import DEFAULT_TEMPLATES, Encoder, resolve_device
from search.core.errors import BadInput, BadQuery, ConfigError, HistosearchError, IndexUnavailable, NotFound
from search.core.settings import Settings
from search.storage.index_directory import IndexDirectory
from search.storage.store import Store
from search.storage.vectors import LiveIndex

# Pages are served down to this rank: deeper paging would make FAISS return ever larger k.
MAX_DEPTH = 10_000
THUMBNAIL_PX = 192
MAX_PER_CASE = 50
# Rendered tiles kept in memory; a thumbnail is ~10 kB, a full tile ~100 kB.
IMAGE_CACHE_BYTES = 64 * 1024 * 1024
QUERY_CACHE_SIZE = 1024
# Texts and facet values are re-read after this long, so corpora added without a reindex show up.
CACHE_SECONDS = 60.0
# Formats a browser shows as they are; anything else (TIFF, whole-slide regions) is re-encoded.
_WEB_FORMATS = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


@dataclass(frozen=True)
class Filters:
    """Restricts a query to tiles of one source (uri or id), slide, case and/or tile meta values."""

    source: str | None = None
    slide: str | None = None
    case: str | None = None
    meta: Mapping[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.source or self.slide or self.case or self.meta)

    def to_dict(self) -> dict:
        out = {"source": self.source, "slide": self.slide, "case": self.case, "meta": dict(self.meta)}
        return {key: value for key, value in out.items() if value}


class _LRU:
    """A thread-safe least-recently-used map bounded by the summed ``size`` of its values."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any, size: int = 1) -> None:
        if size > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._used -= old[1]
            self._items[key] = (value, size)
            self._used += size
            while self._used > self.capacity:
                _, (_, dropped) = self._items.popitem(last=False)
                self._used -= dropped


@dataclass
class _Texts:
    """The text corpora embedded under one model, as a matrix for image -> text ranking."""

    key: tuple
    loaded_at: float
    ids: np.ndarray
    vectors: np.ndarray
    corpus_index: np.ndarray
    corpora: list[str]


class Engine:
    def __init__(self, settings: Settings, store: Store | None = None, encoder: Encoder | None = None) -> None:
        self.settings = settings
        self._owns_store = store is None
        self.store = store if store is not None else Store(settings.db_url)
        self._encoder = encoder
        self._encoder_lock = threading.Lock()
        # One forward pass at a time: parallel passes on a few CPU cores only slow each other down.
        self._model_lock = threading.Lock()
        self.index_directory = IndexDirectory(settings.data_dir / "index")
        self.live_index = LiveIndex(self.index_directory, settings.device)
        self._text_vectors = _LRU(QUERY_CACHE_SIZE)
        self._image_vectors = _LRU(QUERY_CACHE_SIZE)
        self._images = _LRU(IMAGE_CACHE_BYTES)
        self._readers: dict[str, tuple[Reader, threading.Lock]] = {}
        self._readers_lock = threading.Lock()
        self._texts: _Texts | None = None
        self._facets: tuple[tuple, float, dict] | None = None
        self._cache_lock = threading.Lock()

    # --- queries -----------------------------------------------------------------------------

    def search_text(self, query: str, k: int = 24, offset: int = 0, filters: Filters | None = None) -> dict:
        """Tiles ranked by similarity to a morphology description (prompt-ensembled)."""
        text = self._clean_text(query)
        self._check_page(k, offset)
        self._live_build(for_encoder=True)
        vector = self._text_vector(text)
        return self._ranked({"text": text}, vector, k, offset, filters)

    def search_image(
        self, image: Image.Image | str, k: int = 24, offset: int = 0, filters: Filters | None = None
    ) -> dict:
        """Tiles ranked by similarity to an image, or to the ``image_ref`` an earlier image query returned."""
        self._check_page(k, offset)
        self._live_build(for_encoder=True)
        ref, vector = self._image_vector(image)
        return self._ranked({"image": ref}, vector, k, offset, filters)

    def similar(self, tile_id: int, k: int = 24, offset: int = 0, filters: Filters | None = None) -> dict:
        """Tiles like an indexed tile, from its stored vector (no re-embedding); the tile itself is left out."""
        self._check_page(k, offset)
        build = self._live_build()
        vector = self._stored_vector(tile_id, build)
        return self._ranked({"tile_id": tile_id}, vector, k, offset, filters, exclude=tile_id)

    def image_ref(self, image: Image.Image) -> str:
        """Embed an uploaded image and keep its vector in memory under the returned reference, so that
        later GET requests (paging, cases, describe) can name it without uploading it again."""
        self._live_build(for_encoder=True)
        return self._image_vector(image)[0]

    def cases(
        self,
        *,
        text: str | None = None,
        image: Image.Image | str | None = None,
        tile_id: int | None = None,
        top_tiles: int = 200,
        per_case: int = 3,
        k: int = 20,
        filters: Filters | None = None,
    ) -> dict:
        """Cases ranked by their best tiles among the ``top_tiles`` nearest to the query.

        A case's score is the mean of its best ``per_case`` tile scores. When the search stopped at
        ``top_tiles``, a case with fewer hits has its missing ones counted at the lowest score
        retrieved: no tile left out can score higher, so a single lucky tile does not outrank a case
        with several good ones.
        """
        if sum(x is not None for x in (text, image, tile_id)) != 1:
            raise BadQuery("give exactly one query: text, image or tile_id")
        self._check_page(k, 0)
        if not 1 <= per_case <= MAX_PER_CASE:
            raise BadQuery(f"per_case must be between 1 and {MAX_PER_CASE}, got {per_case}")
        if not 1 <= top_tiles <= MAX_DEPTH:
            raise BadQuery(f"top_tiles must be between 1 and {MAX_DEPTH}, got {top_tiles}")
        if text is not None:
            text = self._clean_text(text)
            self._live_build(for_encoder=True)
            query: dict = {"text": text}
            vector = self._text_vector(text)
        elif image is not None:
            self._live_build(for_encoder=True)
            ref, vector = self._image_vector(image)
            query = {"image": ref}
        else:
            vector = self._stored_vector(tile_id, self._live_build())
            query = {"tile_id": tile_id}
        hits, total = self._nearest(vector, top_tiles, filters, exclude=tile_id)
        truncated = len(hits) == top_tiles and total > top_tiles
        cutoff = hits[-1][1] if hits else 0.0
        tiles = {t["id"]: t for t in self.store.get_tiles([i for i, _ in hits])}
        groups: dict[str, list[dict]] = {}
        unassigned = 0
        for rank, (tile_id_, score) in enumerate(hits, start=1):
            tile = tiles.get(tile_id_)
            if tile is None:
                continue
            if not tile["case_key"]:
                unassigned += 1
                continue
            groups.setdefault(tile["case_key"], []).append(self._result(tile, score, rank))
        ranked = []
        for case_key, members in groups.items():
            best = [r["score"] for r in members[:per_case]]
            if truncated:
                best += [cutoff] * (per_case - len(best))
            ranked.append((float(np.mean(best)), members[0]["score"], case_key, members))
        ranked.sort(key=lambda c: (-c[0], -c[1], c[2]))
        results = []
        for rank, (score, best_score, case_key, members) in enumerate(ranked[:k], start=1):
            slides: dict[str | None, list[dict]] = {}
            for r in members:
                slides.setdefault(r["slide"], []).append(r)
            results.append(
                {
                    "case": case_key,
                    "rank": rank,
                    "score": score,
                    "best_score": best_score,
                    "hits": len(members),
                    "tiles": members[:per_case],
                    "slides": [
                        {"slide": slide, "hits": len(rs), "best_score": rs[0]["score"], "tiles": rs[:per_case]}
                        for slide, rs in slides.items()
                    ],
                }
            )
        return {
            "query": query,
            "filters": (filters or Filters()).to_dict(),
            "k": k,
            "top_tiles": top_tiles,
            "per_case": per_case,
            "cutoff": cutoff,
            "unassigned": unassigned,
            "total": len(groups),
            "results": results,
        }

    def describe(
        self, tile_id: int | None = None, image: Image.Image | str | None = None, k: int = 10, corpus: str | None = None
    ) -> dict:
        """Image -> text: the embedded captions and terms ranked by cosine similarity to a tile or an image."""
        if (tile_id is None) == (image is None):
            raise BadQuery("give exactly one of tile_id or image")
        self._check_page(k, 0)
        if tile_id is not None:
            build = self._live_build()
            vector = self._stored_vector(tile_id, build)
            query: dict = {"tile_id": tile_id}
        else:
            build = self._live_build(for_encoder=True)
            ref, vector = self._image_vector(image)
            query = {"image": ref}
        texts = self._text_corpora(build)
        if corpus and corpus not in texts.corpora:
            known = ", ".join(texts.corpora) or "none"
            raise BadQuery(f"no text corpus named {corpus!r} for this model; embedded corpora: {known}")
        candidates = np.arange(len(texts.ids))
        if corpus:
            candidates = np.flatnonzero(texts.corpus_index == texts.corpora.index(corpus))
        scores = texts.vectors[candidates] @ vector if len(candidates) else np.zeros(0, np.float32)
        top = _top(scores, k)
        chosen = texts.ids[candidates[top]]
        results = [
            {
                "text_id": item["id"],
                "text": item["text"],
                "corpus": item["corpus"],
                "tags": item["tags"],
                "score": float(score),
                "rank": rank,
            }
            for rank, (item, score) in enumerate(
                zip(self.store.get_texts(chosen.tolist()), scores[top], strict=True), start=1
            )
        ]
        return {"query": query, "k": k, "corpus": corpus, "corpora": texts.corpora, "results": results}

    # --- tiles -------------------------------------------------------------------------------

    def tile(self, tile_id: int) -> dict:
        """A tile's metadata, and its neighbours on the grid of the same slide and level (WSI tiles)."""
        tile = self._get_tile(tile_id)
        out = self._result(tile)
        out.update(
            source_kind=tile["source"]["kind"],
            locator=tile["locator"],
            created_at=tile["created_at"],
            image_url=f"/images/tiles/{tile_id}.jpg",
        )
        out["neighbours"] = [
            {
                "tile_id": n["id"],
                "dx": n["dx"],
                "dy": n["dy"],
                "x": n["x"],
                "y": n["y"],
                "thumbnail_url": f"/images/thumbs/{n['id']}.jpg",
                "url": f"/tiles/{n['id']}",
            }
            for n in self.store.neighbours(tile_id)
        ]
        return out

    def tile_bytes(self, tile_id: int, thumbnail: bool = False) -> tuple[bytes, str]:
        """(image bytes, content type) of a tile, re-read from its archive; thumbnails are 192 px JPEGs."""
        key = (tile_id, thumbnail)
        cached = self._images.get(key)
        if cached is not None:
            return cached
        tile = self._get_tile(tile_id)
        where = f"{tile['source']['uri']}: {tile['path']}"
        reader, lock = self._reader(tile["source"]["uri"])
        try:
            with lock:
                data = reader.read(tile["locator"])
            image = decode_image(data, where, self.settings.max_image_pixels)
        except BadInput as exc:
            raise NotFound(
                f"tile {tile_id} is indexed but its image cannot be read: {exc.message}; if the archive moved, "
                "run `histosearch index` on its new location"
            ) from None
        if thumbnail:
            small = image.convert("RGB")
            small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
            out = (_encode(small, "JPEG", quality=85), "image/jpeg")
        elif isinstance(data, bytes) and image.format in _WEB_FORMATS:
            out = (data, _WEB_FORMATS[image.format])
        else:
            out = (_encode(image.convert("RGB"), "JPEG", quality=92), "image/jpeg")
        self._images.put(key, out, size=len(out[0]))
        return out

    # --- status and facets ---------------------------------------------------------------------

    def status(self) -> dict:
        """What the status page shows: counts, model, device, live index, jobs and recent errors."""
        cfg = get_model_cfg(self.settings.model)
        try:
            device = str(resolve_device(self.settings.device))
        except ConfigError as exc:
            device = f"{self.settings.device} (unavailable: {exc.message})"
        build = self.store.live_build()
        running = self.store.running_job()
        if running is not None:
            running["progress"] = running["done"] / running["total"] if running["total"] else None
        encoder = self._encoder
        return {
            "counts": self.store.counts(),
            "model": {
                "name": cfg.name,
                "embed_dim": cfg.embed_dim,
                "image_size": cfg.vision_cfg.image_size,
                "loaded": encoder is not None,
                "fingerprint": encoder.fingerprint if encoder is not None else None,
            },
            "device": device,
            "index": None
            if build is None
            else {
                "build_id": build["id"],
                "type": build["index_type"],
                "size": build["count"],
                "built_at": build["created_at"],
                "model_fingerprint": build["model_fingerprint"],
                "device": build["device"],
            },
            "last_job": self.store.last_job(),
            "running_job": running,
            "recent_errors": self.store.recent_errors(),
            "sources": self.store.sources(),
        }

    def facets(self) -> dict:
        """Filter values for the UI (sources, slides, cases, meta), cached per live build for a minute."""
        build = self.store.live_build()
        key = (build["id"] if build else None,)
        with self._cache_lock:
            if self._facets and self._facets[0] == key and time.monotonic() - self._facets[1] < CACHE_SECONDS:
                return self._facets[2]
        values = self.store.facet_values()
        with self._cache_lock:
            self._facets = (key, time.monotonic(), values)
        return values

    def warm_up(self) -> list[str]:
        """Load the model and the live index now rather than on the first query; returns what could not be
        loaded (each message says what to do), so a server can start without weights or an index."""
        problems = []
        for load in (self.encoder, self.live_index.get):
            try:
                load()
            except HistosearchError as exc:
                problems.append(exc.message)
        return problems

    def close(self) -> None:
        """Close the archive readers, and the store when this engine opened it."""
        with self._readers_lock:
            for reader, _ in self._readers.values():
                reader.close()
            self._readers.clear()
        if self._owns_store:
            self.store.close()

    # --- internals -----------------------------------------------------------------------------

    def encoder(self) -> Encoder:
        """The encoder, built from the settings on first use."""
        if self._encoder is None:
            with self._encoder_lock:
                if self._encoder is None:
                    self._encoder = Encoder.from_settings(self.settings)
        return self._encoder

    def _clean_text(self, query: str) -> str:
        text = " ".join((query or "").split())
        if not text:
            raise BadQuery("empty query: describe the morphology to look for, e.g. 'cribriform glands'")
        if len(text) > self.settings.max_query_chars:
            raise BadQuery(
                f"the query is {len(text)} characters long; the limit is {self.settings.max_query_chars} "
                "(setting max_query_chars)"
            )
        return text

    def _check_page(self, k: int, offset: int) -> None:
        if not 1 <= k <= self.settings.max_k:
            raise BadQuery(f"k must be between 1 and {self.settings.max_k} (setting max_k), got {k}")
        if offset < 0:
            raise BadQuery(f"offset must be 0 or more, got {offset}")
        if offset + k > MAX_DEPTH:
            raise BadQuery(f"results are served down to rank {MAX_DEPTH}; offset + k is {offset + k}")

    def _live_build(self, *, for_encoder: bool = False) -> dict:
        build = self.store.live_build()
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
        return ref, vector

    def _stored_vector(self, tile_id: int, build: dict) -> np.ndarray:
        self._get_tile(tile_id)
        return self.store.get_embeddings([tile_id], build["model_fingerprint"])[0]

    def _get_tile(self, tile_id: int) -> dict:
        found = self.store.get_tiles([tile_id])
        if not found:
            raise NotFound(f"no tile with id {tile_id}")
        return found[0]

    def _nearest(
        self, vector: np.ndarray, depth: int, filters: Filters | None, exclude: int | None = None
    ) -> tuple[list[tuple[int, float]], int]:
        """The ``depth`` nearest (id, score) pairs, best first, and how many tiles were searchable."""
        index = self.live_index.get()
        allowed = None
        total = index.ntotal
        if filters:
            allowed = self.store.tile_ids_matching(filters.source, filters.slide, filters.case, dict(filters.meta))
            total = len(allowed)
            if total == 0:
                return [], 0
        ask = min(depth + (exclude is not None), total)
        scores, ids = index.search(vector[None, :].astype(np.float32), ask, allowed=allowed)
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0 and i != exclude]
        if exclude is not None and total:
            total -= 1
        return hits[:depth], total

    def _ranked(
        self,
        query: dict,
        vector: np.ndarray,
        k: int,
        offset: int,
        filters: Filters | None,
        exclude: int | None = None,
    ) -> dict:
        hits, total = self._nearest(vector, offset + k, filters, exclude)
        page = hits[offset:]
        tiles = {t["id"]: t for t in self.store.get_tiles([i for i, _ in page])}
        results = [
            self._result(tiles[i], score, offset + n)
            for n, (i, score) in enumerate(page, start=1)
            if i in tiles  # a tile deleted since the build: skipped until the next reindex
        ]
        return {
            "query": query,
            "filters": (filters or Filters()).to_dict(),
            "k": k,
            "offset": offset,
            "total": total,
            "results": results,
        }

    @staticmethod
    def _result(tile: dict, score: float | None = None, rank: int | None = None) -> dict:
        tile_id = tile["id"]
        out: dict[str, Any] = {"tile_id": tile_id}
        if score is not None:
            out.update(score=score, rank=rank)
        out.update(
            source=tile["source"]["uri"],
            path=tile["path"],
            slide=tile["slide_key"],
            case=tile["case_key"],
            level=tile["level"],
            x=tile["x"],
            y=tile["y"],
            width=tile["width"],
            height=tile["height"],
            mpp=tile["mpp"],
            meta=tile["meta"],
            thumbnail_url=f"/images/thumbs/{tile_id}.jpg",
            url=f"/tiles/{tile_id}",
        )
        return out

    def _text_corpora(self, build: dict) -> _Texts:
        key = (build["model_fingerprint"], build["id"])
        with self._cache_lock:
            texts = self._texts
            if texts and texts.key == key and time.monotonic() - texts.loaded_at < CACHE_SECONDS:
                return texts
        ids, vectors = self.store.text_matrix(build["model_fingerprint"])
        corpus_of = {item["id"]: item["corpus"] for item in self.store.get_texts(ids.tolist())}
        corpora = sorted(set(corpus_of.values()))
        position = {name: n for n, name in enumerate(corpora)}
        corpus_index = np.fromiter((position[corpus_of[int(i)]] for i in ids), dtype=np.int32, count=len(ids))
        if vectors.size == 0:
            vectors = np.zeros((0, 1), np.float32)
        texts = _Texts(key, time.monotonic(), ids, vectors, corpus_index, corpora)
        with self._cache_lock:
            self._texts = texts
        return texts

    def _reader(self, uri: str) -> tuple[Reader, threading.Lock]:
        with self._readers_lock:
            entry = self._readers.get(uri)
            if entry is None:
                entry = (open_reader(Path(uri), self.settings), threading.Lock())
                self._readers[uri] = entry
            return entry


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest scores, best first."""
    if len(scores) <= k:
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def filters_from(params: Mapping[str, Any]) -> Filters:
    """Filters from flat request parameters: ``source``, ``slide``, ``case`` and ``meta.<key>``.

    Empty values (a filter dropdown left at "any") and non-text values (an uploaded file) are ignored.
    """
    text = {key: value for key, value in params.items() if isinstance(value, str) and value}
    meta = {key[5:]: value for key, value in text.items() if key.startswith("meta.") and key[5:]}
    return Filters(source=text.get("source"), slide=text.get("slide"), case=text.get("case"), meta=meta)
