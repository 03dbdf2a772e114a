"""The on-disk index builds: one folder per build and a ``LIVE`` pointer naming the live one."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

from search.core.errors import IndexUnavailable

POINTER_NAME = "LIVE"
INDEX_FILE_NAME = "index.faiss"
REPAIR = "run `histosearch doctor --repair` (or `histosearch reindex`): it rebuilds the index from the stored vectors"
# A build of index segments (search/storage/segmented.py) is finished once its manifest exists.
MANIFEST_NAME = "manifest.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IndexDirectory:
    """On-disk builds under ``root``: ``builds/<build_id>/`` (a ``manifest.json`` of index segments, or
    one ``index.faiss``) plus a ``LIVE`` pointer file holding the live build id.

    A new build is written beside the live one and published by atomically replacing the pointer
    (os.replace), so a running server picks it up without restart and never sees a half-written index.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.pointer = self.root / POINTER_NAME
        # (path, inode, size, mtime) -> sha256: `status` checks the live file on every call, which must
        # not re-read gigabytes each time; any write to the file changes its stat.
        self._checksums: dict[tuple, str] = {}

    def build_path(self, build_id: int) -> Path:
        """Where build ``build_id``'s single index file goes (``VectorIndex.save`` creates the folder)."""
        return self.build_dir(build_id) / INDEX_FILE_NAME

    def build_dir(self, build_id: int) -> Path:
        return self.root / "builds" / str(int(build_id))

    def has_build(self, build_id: int) -> bool:
        """Whether build ``build_id`` is finished: its manifest or its single index file is written."""
        folder = self.build_dir(build_id)
        return (folder / MANIFEST_NAME).is_file() or (folder / INDEX_FILE_NAME).is_file()

    def build_file(self, build_id: int, name: str) -> Path:
        """A file kept beside build ``build_id``'s index (its calibration sample), removed with it."""
        return self.root / "builds" / str(int(build_id)) / name

    def build_ids(self) -> list[int]:
        """Builds on disk, oldest first."""
        builds = self.root / "builds"
        if not builds.is_dir():
            return []
        return sorted(int(p.name) for p in builds.iterdir() if p.name.isdigit() and p.is_dir())

    def publish(self, build_id: int) -> None:
        """Make ``build_id`` live: atomic pointer swap, then remove builds older than the previous one."""
        if not self.has_build(build_id):
            raise IndexUnavailable(f"{self.build_dir(build_id)}: no finished index, cannot publish build {build_id}")
        try:
            previous = self.live_build_id()
        except IndexUnavailable:
            previous = None  # a damaged pointer is what this publish repairs
        tmp = self.pointer.with_name(f"{POINTER_NAME}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "w") as f:
                f.write(f"{int(build_id)}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.pointer)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.root)
        # Keep the previous build for servers still loading it; builds newer than this one are
        # someone else's work in progress.
        for old in self.build_ids():
            if old < build_id and old != previous:
                shutil.rmtree(self.build_dir(old), ignore_errors=True)

    def unpublish(self) -> None:
        """No live index any more (every tile was removed): servers answer IndexUnavailable from the next query."""
        self.pointer.unlink(missing_ok=True)
        if self.root.is_dir():
            _fsync_dir(self.root)

    def live_build_id(self) -> int | None:
        """The live build id, or None when nothing was published."""
        try:
            text = self.pointer.read_text().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            raise IndexUnavailable(f"{self.pointer}: corrupt pointer {text[:40]!r}: {REPAIR}")
        return int(text)

    def checksum(self, build_id: int) -> str:
        """sha256 hex of build ``build_id``: of its index file, or for a build of segments of every file in
        its folder (names and contents, in name order)."""
        folder = self.build_dir(build_id)
        files = sorted(folder.iterdir()) if (folder / MANIFEST_NAME).is_file() else [self.build_path(build_id)]
        stats = [os.stat(path) for path in files]
        key = tuple((str(p), st.st_ino, st.st_size, st.st_mtime_ns) for p, st in zip(files, stats, strict=True))
        if key not in self._checksums:
            digest = hashlib.sha256()
            for path in files:
                if len(files) > 1:
                    digest.update(f"{path.name}\n".encode())
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
            self._checksums = {key: digest.hexdigest()}
        return self._checksums[key]

    def problem(self, build: dict | None) -> str | None:
        """Why the live index on disk is not ``build``, the live build the database records (with its
        ``checksum``), or None when it is: pointer, index file and checksum are checked."""
        try:
            live = self.live_build_id()
        except IndexUnavailable:
            return f"{self.pointer}: not a build id (damaged pointer)"
        if build is None:
            return None if live is None else f"{self.pointer} names build {live}, which the database has not as live"
        if live is None:
            return f"{self.pointer}: missing, though build {build['id']} is live"
        if live != build["id"]:
            return f"{self.pointer} names build {live}, the database build {build['id']}"
        path = self.build_dir(live)
        if not self.has_build(live):
            return f"{path}: missing"
        if build.get("checksum") and self.checksum(live) != build["checksum"]:
            return f"{path}: does not match its recorded checksum (damaged or truncated)"
        return None

    def pointer_stamp(self) -> tuple[int, int, int] | None:
        """A cheap fingerprint of the pointer file (inode, mtime, size) that changes with each publish."""
        try:
            st = os.stat(self.pointer)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size
