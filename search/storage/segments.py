"""Stored tile vectors: append-only float16 segment files, memory-mapped for reading.

A segment is one file ``<root>/seg-<id>.f16`` of raw little-endian float16 rows of one model's
dimension, no header; the ``vector_segments`` table holds its model, dimension and the number of
rows committed. An ``embeddings`` row names its tile's (segment, position). Rows are only ever
appended: a replaced or deleted tile leaves its old row behind as garbage.

A writer appends and fsyncs the rows *before* the database transaction that references them
commits, while holding that transaction's write lock. A crash in between leaves rows past the
committed count; the next append truncates them (:meth:`VectorSegments.append`), and readers never
look past the committed count, so they are never seen.

float16 keeps 11 significant bits: on unit vectors the cosine of a query with a stored vector moves
by at most a few 1e-4 (``tests/test_segments.py`` and ``bench/scale.py`` measure it), well below the
gaps between neighbouring results, at half the bytes of float32.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

DTYPE = np.dtype("<f2")
# A new segment is started once the open one holds this many rows (1 GB at 512-d float16).
SEGMENT_ROWS = 1 << 20


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VectorSegments:
    """The segment files under ``root``: append (one writer at a time) and memory-mapped reads (any thread)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._maps: dict[int, np.memmap] = {}
        self._lock = threading.Lock()

    def path(self, segment_id: int) -> Path:
        return self.root / f"seg-{int(segment_id):06d}.f16"

    def append(self, segment_id: int, committed: int, matrix: np.ndarray) -> int:
        """Write ``matrix`` (rows of floats) after the ``committed`` rows of the segment and fsync it;
        returns the position of its first row. Rows past ``committed`` (a crashed writer's) are cut off first.

        The caller holds the database write lock and commits ``committed + len(matrix)`` afterwards.
        """
        rows = np.ascontiguousarray(matrix, dtype=DTYPE)
        width = rows.shape[1] * DTYPE.itemsize
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(segment_id)
        created = not path.exists()
        with open(path, "ab") as f:
            if f.tell() != committed * width:
                f.truncate(committed * width)
                f.seek(committed * width)
            f.write(rows.tobytes())
            f.flush()
            os.fsync(f.fileno())
        if created:
            _fsync_dir(self.root)
        return committed

    def read(self, segment_id: int, dim: int, positions: np.ndarray, dtype: type = np.float32) -> np.ndarray:
        """``dtype`` (float32, or the stored float16) [len(positions), dim] copies of the rows at ``positions``
        (all below the committed count)."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == 0:
            return np.zeros((0, dim), dtype)
        need = int(positions.max()) + 1
        with self._lock:
            mapped = self._maps.get(segment_id)
            if mapped is None or len(mapped) < need:
                # The file grew since it was mapped (segments are appended to): map its current length.
                rows = os.path.getsize(self.path(segment_id)) // (dim * DTYPE.itemsize)
                if rows < need:
                    raise OSError(
                        f"{self.path(segment_id)}: holds {rows} vectors, the database names row {need - 1}; "
                        "the vector files do not match the database (restored from different backups?)"
                    )
                mapped = np.memmap(self.path(segment_id), dtype=DTYPE, mode="r", shape=(rows, dim))
                self._maps[segment_id] = mapped
        return mapped[positions].astype(dtype, copy=False)

    def remove_unknown(self, known: set[int]) -> list[Path]:
        """Delete segment files that no database row names (a transaction that created one rolled back)."""
        removed = []
        if not self.root.is_dir():
            return removed
        for path in self.root.glob("seg-*.f16"):
            number = path.stem.removeprefix("seg-")
            if number.isdigit() and int(number) not in known:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("seg-*.f16")) if self.root.is_dir() else 0

    def close(self) -> None:
        with self._lock:
            self._maps.clear()
