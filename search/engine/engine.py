"""The query engine: the one API the web UI and the CLI both call.

Text, image and tile queries become one L2-normalised vector (``query.py``), FAISS ranks the live
build's tiles by cosine similarity (``ranking.py``), and the store turns the ids back into tiles. Every
method returns a plain dict of ids and data; the web layer adds the URLs. The encoder loads on the
first text or image query, so ``similar``, tile pages and status work on a machine without the model
weights.
"""

from __future__ import annotations

import threading
import time

from PIL import Image

from search.conch.config import get_model_cfg
from search.conch.encoder import Encoder, resolve_device
from search.core.errors import BadQuery, ConfigError, HistosearchError
from search.core.settings import Settings
from search.storage.index_directory import IndexDirectory
from search.storage.segmented import live_tile_index
from search.storage.store import Store

from .cache import CACHE_SECONDS
from .calibration import Calibration
from .cases import MAX_PER_CASE, group_cases
from .describe import TextRanker
from .explain import Explainer
from .filters import Filters
from .options import SearchOptions
from .query import Query, QueryVectors
from .query_log import QueryLog
from .ranking import MAX_DEPTH, AllowedIds, check_page, hit, hits_of, nearest
from .results import ResultPages
from .slides import SlideSearch
from .tiles import TileImages, get_tile

# Refused files of the last run listed on /status (all are counted).
REFUSED_SHOWN = 50


class Engine:
    def __init__(self, settings: Settings, store: Store | None = None, encoder: Encoder | None = None) -> None:
        self.settings = settings
        self._owns_store = store is None
        self.store = store if store is not None else Store.from_settings(settings)
        self.index_directory = IndexDirectory(settings.data_dir / "index")
        self.live_index = live_tile_index(self.index_directory, self.store, settings.device, settings.rerank_factor)
        self.allowed_ids = AllowedIds(self.store)
        self.queries = QueryVectors(settings, self.store, encoder)
        self.texts = TextRanker(self.store)
        self.images = TileImages(settings, self.store)
        self.slides = SlideSearch(settings, self.store, self.live_index, self.allowed_ids, self.queries, self.images)
        self.calibration = Calibration(self.index_directory)
        self.explainer = Explainer(self.store, self.texts, self.queries)
        self.pages = ResultPages(
            settings, self.store, self.live_index, self.allowed_ids, self.calibration, self.explainer
        )
        self.log = QueryLog(settings, self.store)
        self._facets: tuple[tuple, float, dict] | None = None
        self._facets_lock = threading.Lock()

    # --- queries -----------------------------------------------------------------------------

    def search_text(
        self,
        query: str,
        k: int = 24,
        offset: int = 0,
        filters: Filters | None = None,
        options: SearchOptions | None = None,
    ) -> dict:
        """Tiles ranked by similarity to a morphology description (abbreviations expanded; prompt-ensembled
        when the setting ``prompt_ensemble`` is on)."""
        return self._search(k, offset, filters, options, text=query)

    def search_image(
        self,
        image: Image.Image | str,
        k: int = 24,
        offset: int = 0,
        filters: Filters | None = None,
        options: SearchOptions | None = None,
    ) -> dict:
        """Tiles ranked by similarity to an image, or to the ``image_ref`` an earlier image query returned."""
        return self._search(k, offset, filters, options, image=image)

    def similar(
        self,
        tile_id: int,
        k: int = 24,
        offset: int = 0,
        filters: Filters | None = None,
        options: SearchOptions | None = None,
    ) -> dict:
        """Tiles like an indexed tile, from its stored vector (no re-embedding); the tile itself is left out,
        and with the option ``exclude_case`` its whole case."""
        return self._search(k, offset, filters, options, tile_id=tile_id)

    def image_ref(self, image: Image.Image, tta: bool | None = None) -> str:
        """Embed an uploaded image and keep it (on disk, by content hash) under the returned reference, so
        that later GET requests (paging, cases, describe, a permalink after a restart) can name it."""
        return self.queries.image_ref(image, tta)

    def upload_preview(self, ref: str) -> dict:
        """The image uploaded under ``ref``: its size and a small JPEG to show beside its results."""
        return self.queries.preview(ref)

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
        options: SearchOptions | None = None,
    ) -> dict:
        """Cases ranked by their best tiles among the ``top_tiles`` nearest to the query (see ``group_cases``)."""
        if sum(x is not None for x in (text, image, tile_id)) != 1:
            raise BadQuery("give exactly one query: text, image or tile_id")
        self._check_page(k, 0)
        if not 1 <= per_case <= MAX_PER_CASE:
            raise BadQuery(f"per_case must be between 1 and {MAX_PER_CASE}, got {per_case}")
        if not 1 <= top_tiles <= MAX_DEPTH:
            raise BadQuery(f"top_tiles must be between 1 and {MAX_DEPTH}, got {top_tiles}")
        query = self._query(options or SearchOptions(), text=text, image=image, tile_id=tile_id)
        pairs, total = nearest(self.live_index, self.allowed_ids, query.vector, top_tiles, filters, query.exclude)
        cutoff = pairs[-1][1] if pairs else 0.0
        truncated = len(pairs) == top_tiles and total > top_tiles
        grouped = group_cases(hits_of(self.store, pairs), per_case=per_case, k=k, cutoff=cutoff if truncated else None)
        return {
            "query": query.names,
            "filters": (filters or Filters()).to_dict(),
            "k": k,
            "top_tiles": top_tiles,
            "per_case": per_case,
            "cutoff": cutoff,
            **grouped,
        }

    def describe(
        self,
        tile_id: int | None = None,
        image: Image.Image | str | None = None,
        k: int = 10,
        corpus: str | None = None,
        tta: bool | None = None,
    ) -> dict:
        """Image -> text: the embedded captions and terms ranked by cosine similarity to a tile, an uploaded
        image or the reference an earlier upload returned."""
        if (tile_id is None) == (image is None):
            raise BadQuery("give exactly one of tile_id or image")
        self._check_page(k, 0)
        query = self.queries.query_vector(tile_id=tile_id, image=image, tta=tta)
        ranked = self.texts.describe(query.vector, query.build, k, corpus)
        return {"query": query.names, "k": k, "corpus": corpus, **ranked}

    # --- tiles -------------------------------------------------------------------------------

    def tile(self, tile_id: int) -> dict:
        """A tile's metadata, and its neighbours on the grid of the same slide and level (WSI tiles)."""
        tile = get_tile(self.store, tile_id)
        out = hit(tile)
        out.update(source_kind=tile["source"]["kind"], locator=tile["locator"], created_at=tile["created_at"])
        out["neighbours"] = [
            {
                "tile_id": n["id"],
                "dx": n["dx"],
                "dy": n["dy"],
                "x": n["x"],
                "y": n["y"],
                "content_hash": n["content_hash"],
            }
            for n in self.store.neighbours(tile_id)
        ]
        return out

    def tile_hash(self, tile_id: int) -> str:
        """The sha256 of the tile's content (what its image URLs and ETags name)."""
        return get_tile(self.store, tile_id)["content_hash"]

    def tile_bytes(self, tile_id: int, thumbnail: bool = False) -> tuple[bytes, str]:
        """(image bytes, content type) of a tile, re-read from its archive; thumbnails are 192 px JPEGs."""
        return self.images.tile_bytes(tile_id, thumbnail)

    # --- status and facets ---------------------------------------------------------------------

    def status(self) -> dict:
        """What the status page shows: counts, model, device, live index, jobs, recent errors and evaluation runs."""
        cfg = get_model_cfg(self.settings.model)
        try:
            device = str(resolve_device(self.settings.device))
        except ConfigError as exc:
            device = f"{self.settings.device} (unavailable: {exc.message})"
        build = self.store.live_build()
        running = self.store.running_job()
        if running is not None:
            running["progress"] = running["done"] / running["total"] if running["total"] else None
        encoder = self.queries.loaded_encoder
        last = self.store.last_job()
        if last is not None:
            # The files this run refused and why: its counts add up as done + refused = files seen.
            last["refused"] = self.store.recent_errors(limit=REFUSED_SHOWN, job_id=last["id"])
            last["refused_total"] = self.store.count_errors(last["id"])
        return {
            "counts": self.store.counts(),
            "model": {
                "name": cfg.name,
                "embed_dim": cfg.embed_dim,
                "image_size": cfg.vision_cfg.image_size,
                "loaded": encoder is not None,
                "fingerprint": encoder.fingerprint if encoder is not None else None,
                "error": self.queries.load_error,
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
                "checks": build["checks"],
            },
            # The index on disk checked against the build the database records (pointer, file, checksum).
            "index_problem": self.index_directory.problem(build),
            "slide_vectors": self.slides.kinds(),
            "last_job": last,
            "running_job": running,
            "recent_errors": self.store.recent_errors(),
            "sources": self.store.sources(),
            "eval_runs": self.store.eval_runs(limit=5),
        }

    def readiness(self) -> dict:
        """What stops queries before the first one is sent: ``{"index": bool, "model_error": str | None}``
        (the model's error is known once it was tried, which ``serve`` does at start)."""
        return {"index": self.store.live_build() is not None, "model_error": self.queries.load_error}

    def facet(self, field: str, prefix: str = "", limit: int = 50) -> dict:
        """One filter field's values containing ``prefix``, with tile counts (the filters' typeahead)."""
        return self.store.facet(field, prefix, limit)

    def facets(self) -> dict:
        """Filter values for the UI (sources, slides, cases, meta), cached per live build for a minute."""
        build = self.store.live_build()
        key = (build["id"] if build else None,)
        with self._facets_lock:
            if self._facets and self._facets[0] == key and time.monotonic() - self._facets[1] < CACHE_SECONDS:
                return self._facets[2]
        values = self.store.facet_values()
        with self._facets_lock:
            self._facets = (key, time.monotonic(), values)
        return values

    def query_log(self, limit: int = 100, offset: int = 0) -> dict:
        """The newest logged queries first (for an admin); ``enabled`` says whether queries are being logged."""
        self.log.flush()
        return {"enabled": self.settings.query_log, **self.store.query_log(limit, offset)}

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
        self.log.flush()
        self.images.close()
        if self._owns_store:
            self.store.close()

    def encoder(self) -> Encoder:
        """The encoder, built from the settings on first use."""
        return self.queries.encoder()

    # --- internals -----------------------------------------------------------------------------

    def _check_page(self, k: int, offset: int) -> None:
        check_page(k, offset, self.settings.max_k)

    def _query(self, options: SearchOptions, **query: object) -> Query:
        return self.queries.query_vector(
            **query,
            tta=options.tta,
            plus=options.plus,
            minus=options.minus,
            weight=options.weight,
            mpp=options.mpp,
        )

    def _search(
        self, k: int, offset: int, filters: Filters | None, options: SearchOptions | None, **query: object
    ) -> dict:
        self._check_page(k, offset)
        options = options or SearchOptions()
        start = time.perf_counter()
        built = self._query(options, **query)
        result = self.pages.page(built, k, offset, filters, options)
        self.log.record(built, filters, options, len(result["results"]), start)
        return result
