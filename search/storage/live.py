"""The index a server holds over the published build (builds on disk: index_directory.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from search.core.errors import IndexUnavailable
from search.storage.index_directory import REPAIR, IndexDirectory
from search.storage.vectors import VectorIndex


@dataclass(frozen=True)
class _Loaded:
    stamp: tuple[int, int, int]
    build_id: int
    index: Any


class LiveIndex:
    """What a server holds: the live build, loaded lazily and reloaded when the pointer changes
    (one stat per call). Thread-safe: while one thread loads a new build, others keep using the old.

    ``load`` reads a build id into an index (a build of segments: ``segmented.SegmentedIndex.load``);
    by default the build's single ``index.faiss``. ``checksums``: a build's recorded sha256 (the store's
    ``build_checksum``), checked at each load.
    """

    def __init__(
        self,
        directory: IndexDirectory,
        device: str = "auto",
        checksums: Callable[[int], str | None] | None = None,
        load: Callable[[int], Any] | None = None,
    ) -> None:
        self.directory = directory
        self.device = device
        self.checksums = checksums
        self._load = load or (lambda build_id: VectorIndex.load(directory.build_path(build_id), device))
        self._loaded: _Loaded | None = None
        self._reload_lock = threading.Lock()

    @property
    def build_id(self) -> int | None:
        """The build id of the index ``get`` last returned."""
        loaded = self._loaded
        return loaded.build_id if loaded else None

    def get(self) -> Any:
        loaded = self._loaded
        if loaded is not None and loaded.stamp == self.directory.pointer_stamp():
            return loaded.index
        if not self._reload_lock.acquire(blocking=loaded is None):
            return loaded.index
        try:
            return self._reload()
        finally:
            self._reload_lock.release()

    def _reload(self) -> Any:
        # A few tries: two publishes in quick succession can remove the build the pointer named
        # between reading the pointer and loading the file.
        for _ in range(3):
            stamp = self.directory.pointer_stamp()
            loaded = self._loaded
            if loaded is not None and loaded.stamp == stamp:
                return loaded.index
            build_id = self.directory.live_build_id()
            if stamp is None or build_id is None:
                raise IndexUnavailable(f"no index in {self.directory.root}: run `histosearch index PATH` first")
            if loaded is not None and loaded.build_id == build_id:
                index = loaded.index
            else:
                if not self.directory.has_build(build_id):
                    continue
                expected = self.checksums(build_id) if self.checksums is not None else None
                if expected is not None and self.directory.checksum(build_id) != expected:
                    raise IndexUnavailable(
                        f"{self.directory.build_dir(build_id)}: damaged (it does not match its recorded checksum): "
                        f"{REPAIR}"
                    )
                index = self._load(build_id)
            self._loaded = _Loaded(stamp, build_id, index)
            return index
        raise IndexUnavailable(
            f"{self.directory.pointer} names build {self.directory.live_build_id()}, whose index file is "
            f"missing: {REPAIR}"
        )
