"""Slides as search objects: slide -> slide, text -> slide, and where on a slide a query matches.

Slide vectors of each kind (``mean``, ``medoid``, ``wsc``) sit in their own exact FAISS index, reloaded
live like the tile index. Text -> slide ranks slides by their best tiles: the tile index's top hits are
grouped by slide and a slide scores the mean of its best ``PER_SLIDE`` tile scores; slides with WSC
attention can instead be ranked by their tiles' scores weighted by that attention. A heatmap is the cosine
similarity of a query to every tile of a slide, laid out on the slide's tile grid. Everything returns ids
and data; the web UI builds the URLs.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from search.archives.readers.slide import SLIDE_EXTENSIONS, TIFF_EXTENSIONS, open_slide
from search.core.errors import BadInput, BadQuery, IndexUnavailable, NotFound
from search.core.settings import Settings
from search.slides.aggregate import DESCRIPTIONS
from search.storage.live import LiveIndex
from search.storage.slides import slide_index_directory
from search.storage.store import Store
from search.storage.vectors import VectorIndex

from .query import QueryVectors
from .ranking import AllowedIds, check_page, nearest
from .tiles import TileImages

KINDS = ("mean", "medoid", "wsc")
PER_SLIDE = 5  # a slide's text score: the mean of its best this-many tile scores
TILE_DEPTH = 2000  # tile hits gathered for text -> slide
THUMBNAIL_SIDE = 1024
# The heatmap colour scale, low to high (blue -> teal -> yellow), shared by the PNG and the page's legend.
COLOUR_STOPS = ((0.0, (48, 18, 120)), (0.5, (33, 145, 140)), (1.0, (253, 231, 37)))


def colourise(values: np.ndarray) -> np.ndarray:
    """RGB uint8 for values in [0, 1] along COLOUR_STOPS."""
    positions = [p for p, _ in COLOUR_STOPS]
    return np.stack([np.interp(values, positions, [c[i] for _, c in COLOUR_STOPS]) for i in range(3)], axis=-1).astype(
        np.uint8
    )


def tile_grid(tiles: list[dict]) -> dict | None:
    """Rows, columns and level-0 pitch of the tiles' grid, each tile's cell; None for tiles without position.

    The pitch is the smallest gap between tile positions (tiles are cut on a regular grid); a slide whose
    tiles share one position on an axis falls back to the tile width.
    """
    placed = [t for t in tiles if t["x"] is not None and t["y"] is not None]
    if not placed:
        return None
    gaps = []
    for axis in ("x", "y"):
        values = np.unique([t[axis] for t in placed])
        if len(values) > 1:
            gaps.append(float(np.diff(values).min()))
    pitch = min(gaps) if gaps else float(placed[0]["width"] or 1)
    cells = {t["id"]: (int(round(t["y"] / pitch)), int(round(t["x"] / pitch))) for t in placed}
    rows = max(r for r, _ in cells.values()) + 1
    cols = max(c for _, c in cells.values()) + 1
    return {"rows": rows, "cols": cols, "pitch": pitch, "cells": cells}


class SlideSearch:
    """The slide half of the engine; it shares the engine's store, tile index, query vectors and tile images."""

    def __init__(self, settings: Settings, store: Store, live_index: LiveIndex, allowed_ids: AllowedIds,
                 queries: QueryVectors, images: TileImages) -> None:  # fmt: skip
        self.settings = settings
        self.store = store
        self.live_index = live_index
        self.allowed_ids = allowed_ids
        self.queries = queries
        self.images = images
        self._indexes = {kind: LiveIndex(slide_index_directory(self.settings.data_dir, kind), "cpu") for kind in KINDS}

    # --- slides ------------------------------------------------------------------------------------

    def kinds(self) -> dict[str, dict]:
        """The slide-vector kinds with a published index: count, method, model fingerprint, description."""
        stored = self.store.slide_vector_kinds()
        out = {}
        for kind in KINDS:
            if kind in stored and self._indexes[kind].directory.live_build_id() is not None:
                out[kind] = {**stored[kind], "description": DESCRIPTIONS[kind]}
        return out

    def slide(self, slide: int | str) -> dict:
        """A slide with its tile grid, its tiles' cells and the slide-vector kinds available."""
        info = self.store.get_slide(slide)
        tiles = self.store.slide_tiles(info["id"])
        grid = tile_grid(tiles)
        out = {**info, "kinds": self.kinds(), "grid": None}
        if grid is not None:
            width, height = _extent(info, grid)
            out["grid"] = {"rows": grid["rows"], "cols": grid["cols"], "pitch": grid["pitch"],
                           "extent": [width, height]}  # fmt: skip
            out["tiles"] = [{"tile_id": i, "row": r, "col": c} for i, (r, c) in grid["cells"].items()]
        else:
            out["tiles"] = [{"tile_id": t["id"], "row": None, "col": None} for t in tiles]
        return out

    def similar(self, slide: int | str, kind: str = "mean", k: int = 10, same_case: bool = False) -> dict:
        """Slides nearest to ``slide`` by ``kind``'s slide vectors; other slides of its case are left out
        unless ``same_case``."""
        info = self.store.get_slide(slide)
        index = self._index(kind)
        check_page(k, 0, self.settings.max_k)
        try:
            vector = index.reconstruct(np.array([info["id"]]))[0]
        except NotFound:
            raise NotFound(
                f"slide {info['slide_key']} has no {kind} slide vector yet: run `histosearch reindex`"
            ) from None
        # Deep enough to fill k after leaving out the slide itself and its case's other slides (slides are few).
        scores, ids = index.search(vector[None, :], min(index.ntotal, k + 1 + 1000))
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0 and i != info["id"]]
        slides = self.store.get_slides([i for i, _ in hits])
        results = []
        for slide_id, score in hits:
            other = slides.get(slide_id)
            if other is None:
                continue
            if not same_case and info["case_id"] is not None and other["case_id"] == info["case_id"]:
                continue
            results.append({**_slide_result(other), "score": score, "rank": len(results) + 1})
            if len(results) == k:
                break
        return {
            "query": {"slide_id": info["id"], "slide_key": info["slide_key"]},
            "kind": kind,
            "method": self.kinds()[kind],
            "same_case": same_case,
            "k": k,
            "results": results,
        }

    def search_text(self, query: str, k: int = 10, method: str = "tiles") -> dict:
        """Slides ranked for a text query: by their best tiles (``tiles``), or by WSC-attention-weighted tile
        scores (``attention``, slides with a WSC vector only)."""
        if method not in ("tiles", "attention"):
            raise BadQuery(f"unknown text -> slide method {method!r}: use 'tiles' or 'attention'")
        check_page(k, 0, self.settings.max_k)
        q = self.queries.query_vector(text=query)
        if method == "tiles":
            ranked = self._by_best_tiles(q.vector)
        else:
            ranked = self._by_attention(q.vector, q.build["model_fingerprint"])
        top = ranked[:k]
        slides = self.store.get_slides([s for s, _, _ in top])
        results = [
            {**_slide_result(slides[s]), "score": score, "rank": n, "best_tiles": best}
            for n, (s, score, best) in enumerate(top, start=1)
            if s in slides
        ]
        return {"query": q.names, "method": method, "per_slide": PER_SLIDE, "k": k, "results": results}

    def _by_best_tiles(self, vector: np.ndarray) -> list[tuple[int, float, list[dict]]]:
        hits, _ = nearest(self.live_index, self.allowed_ids, vector, TILE_DEPTH, None)
        tiles = {t["id"]: t["slide_id"] for t in self.store.get_tiles([i for i, _ in hits])}
        per_slide: dict[int, list[tuple[int, float]]] = {}
        for tile_id, score in hits:  # best first, so each slide's list is sorted
            slide_id = tiles.get(tile_id)
            if slide_id is not None and len(per_slide.setdefault(slide_id, [])) < PER_SLIDE:
                per_slide[slide_id].append((tile_id, score))
        ranked = [
            (s, float(np.mean([sc for _, sc in best])), [{"tile_id": t, "score": sc} for t, sc in best])
            for s, best in per_slide.items()
        ]
        return sorted(ranked, key=lambda r: -r[1])

    def _by_attention(self, vector: np.ndarray, fingerprint: str) -> list[tuple[int, float, list[dict]]]:
        slide_ids, _ = self.store.slide_vectors("wsc")
        if len(slide_ids) == 0:
            raise IndexUnavailable(
                "no WSC slide vectors: set wsc_weights and run `histosearch reindex` (docs/slides.md)"
            )
        ranked = []
        for slide_id, weights in self.store.slide_attention(slide_ids.tolist()).items():
            tile_ids = [t for t, w in weights.items() if w > 0]
            scores = self.store.get_embeddings(tile_ids, fingerprint) @ vector
            w = np.array([weights[t] for t in tile_ids], dtype=np.float32)
            order = np.argsort(-scores)[:PER_SLIDE]
            best = [{"tile_id": tile_ids[i], "score": float(scores[i]), "attention": float(w[i])} for i in order]
            ranked.append((slide_id, float((w * scores).sum() / max(w.sum(), 1e-12)), best))
        return sorted(ranked, key=lambda r: -r[1])

    # --- where on the slide ------------------------------------------------------------------------

    def heatmap(self, slide: int | str, *, text: str | None = None, tile_id: int | None = None,
                image: Image.Image | str | None = None) -> dict:  # fmt: skip
        """The query's cosine similarity to every tile of the slide, on the slide's tile grid."""
        info = self.store.get_slide(slide)
        tiles = self.store.slide_tiles(info["id"])
        grid = tile_grid(tiles)
        if grid is None:
            raise BadQuery(f"slide {info['slide_key']}: its tiles have no grid positions, so there is no heatmap")
        if sum(q is not None for q in (text, tile_id, image)) != 1:
            raise BadQuery("a heatmap needs exactly one query: text, tile_id or an image")
        q = self.queries.query_vector(text=text, image=image, tile_id=tile_id)
        ids = list(grid["cells"])
        scores = self.store.get_embeddings(ids, q.build["model_fingerprint"]) @ q.vector
        cells = [
            {"tile_id": i, "row": grid["cells"][i][0], "col": grid["cells"][i][1], "score": float(s)}
            for i, s in zip(ids, scores, strict=True)
        ]
        return {
            "slide_id": info["id"],
            "slide_key": info["slide_key"],
            "query": q.names,
            "grid": {"rows": grid["rows"], "cols": grid["cols"], "pitch": grid["pitch"]},
            "min": float(scores.min()),
            "max": float(scores.max()),
            "cells": cells,
        }

    @staticmethod
    def heatmap_png(heatmap: dict) -> bytes:
        """One pixel per grid cell (cols x rows), coloured on the slide's min..max scale; no tile: transparent."""
        rows, cols = heatmap["grid"]["rows"], heatmap["grid"]["cols"]
        rgba = np.zeros((rows, cols, 4), dtype=np.uint8)
        span = heatmap["max"] - heatmap["min"]
        for cell in heatmap["cells"]:
            value = (cell["score"] - heatmap["min"]) / span if span > 0 else 1.0
            rgba[cell["row"], cell["col"], :3] = colourise(np.array([value]))[0]
            rgba[cell["row"], cell["col"], 3] = 255
        out = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(out, format="PNG")
        return out.getvalue()

    def thumbnail(self, slide: int | str) -> tuple[bytes, str]:
        """A JPEG of the whole slide: its lowest-resolution level for a whole-slide file, else a mosaic of
        its tiles on the grid."""
        info = self.store.get_slide(slide)
        image = self._wsi_thumbnail(info) or self._mosaic(info)
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=85)
        return out.getvalue(), "image/jpeg"

    def _wsi_thumbnail(self, info: dict) -> Image.Image | None:
        path = _wsi_path(info)
        if path is None:
            return None
        with open_slide(path) as wsi:
            return wsi.get_thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))

    def _mosaic(self, info: dict) -> Image.Image:
        tiles = self.store.slide_tiles(info["id"])
        grid = tile_grid(tiles)
        if grid is None:
            raise NotFound(f"slide {info['slide_key']}: no tile grid to draw a thumbnail from")
        cell = max(8, min(128, THUMBNAIL_SIDE // max(grid["rows"], grid["cols"])))
        canvas = Image.new("RGB", (grid["cols"] * cell, grid["rows"] * cell), "white")
        for tile_id, (row, col) in grid["cells"].items():
            data, _ = self.images.tile_bytes(tile_id, thumbnail=True)
            with Image.open(io.BytesIO(data)) as im:
                canvas.paste(im.convert("RGB").resize((cell, cell)), (col * cell, row * cell))
        return canvas

    def _index(self, kind: str) -> VectorIndex:
        if kind not in KINDS:
            raise BadQuery(f"unknown slide-vector kind {kind!r}: one of {', '.join(KINDS)}")
        live = self._indexes[kind]
        try:
            return live.get()
        except IndexUnavailable:
            raise IndexUnavailable(
                f"no {kind} slide vectors are published: run `histosearch reindex`"
                + (" with wsc_weights set (docs/slides.md)" if kind == "wsc" else "")
            ) from None


def _wsi_path(info: dict) -> Path | None:
    """The whole-slide file of a slide from a slide source, if it is one."""
    root = Path(info["source_uri"])
    for candidate in (root / info["path"], root, Path(info["path"])):
        if candidate.is_file() and (
            candidate.suffix.lower() in SLIDE_EXTENSIONS or candidate.suffix.lower() in TIFF_EXTENSIONS
        ):
            try:
                with open_slide(candidate):
                    return candidate
            except BadInput:
                return None
    return None


def _extent(info: dict, grid: dict) -> tuple[float, float]:
    """Level-0 width and height the thumbnail shows: the slide's for a whole-slide file, else the grid's."""
    path = _wsi_path(info)
    if path is not None:
        with open_slide(path) as wsi:
            return float(wsi.dimensions[0]), float(wsi.dimensions[1])
    return grid["cols"] * grid["pitch"], grid["rows"] * grid["pitch"]


def _slide_result(slide: dict) -> dict[str, Any]:
    return {key: slide[key] for key in ("id", "slide_key", "case_key", "n_tiles")}
