"""The store's row for each embedded tile, with the case and slide that the manifest or the path pattern
(indexer/manifest.py) names for it."""

from __future__ import annotations

from pathlib import Path

from indexer.manifest import Manifest, identity, manifest_mpp
from indexer.pipeline import Decoded
from search.archives.readers import TileEntry
from search.storage.store import Store


class TileRows:
    """Tile rows with their case and slide, resolved once per slide/case key per run."""

    def __init__(self, store: Store, source_id: int, manifest: Manifest | None, pattern: str) -> None:
        self.store = store
        self.source_id = source_id
        self.manifest = manifest
        self.pattern = pattern
        self._cases: dict[str, int] = {}
        self._slides: dict[str, int] = {}

    def row(self, entry: TileEntry, decoded: Decoded) -> dict:
        wsi = entry.slide_path is not None
        case_key, slide_key, extra = identity(entry.slide_path or entry.path, self.manifest, self.pattern, slide=wsi)
        case_id = None
        if case_key:
            if case_key not in self._cases:
                self._cases[case_key] = self.store.upsert_case(case_key)
            case_id = self._cases[case_key]
        slide_id = None
        if slide_key:
            if slide_key not in self._slides:
                # A whole slide's level-0 scale and size come from the slide; a folder of tiles has none.
                info = entry.slide_info
                self._slides[slide_key] = self.store.upsert_slide(
                    slide_key,
                    self.source_id,
                    case_id,
                    entry.slide_path or str(Path(entry.path).parent),
                    mpp=info.mpp if info else None,
                    width=info.width if info else None,
                    height=info.height if info else None,
                )
            slide_id = self._slides[slide_key]
        return {
            "source_id": self.source_id,
            "locator": entry.locator,
            "path": entry.path,
            "slide_id": slide_id,
            "level": entry.level,
            "x": entry.x,
            "y": entry.y,
            "size": entry.size,
            "mpp": entry.mpp if entry.mpp is not None else manifest_mpp(extra),
            "width": decoded.width,
            "height": decoded.height,
            "content_hash": decoded.content_hash,
            "fingerprint": entry.fingerprint,
            "meta": {**extra, **entry.meta},
        }
