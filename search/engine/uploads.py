"""Uploaded query images kept on disk by content hash, so a permalink (``?image=<ref>``) works after a
restart. The folder is capped in bytes (setting ``upload_store_bytes``); the oldest uploads are dropped
first (reading one back writes nothing, so a GET request leaves the data folder as it was). Images are
stored as lossless PNG of the decoded pixels, so the reference, a prefix of the pixel hash, names the
same image before and after a restart.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from PIL import Image

REF_CHARS = 20
_REF = re.compile(rf"[0-9a-f]{{{REF_CHARS}}}")


class UploadStore:
    """``root/<ref>.png`` for each kept upload; ``capacity`` bytes at most (0: keep nothing)."""

    def __init__(self, root: Path, capacity: int) -> None:
        self.root = Path(root)
        self.capacity = capacity
        self._lock = threading.Lock()

    def path(self, ref: str) -> Path | None:
        return self.root / f"{ref}.png" if _REF.fullmatch(ref) else None

    def save(self, ref: str, image: Image.Image) -> None:
        """Keep ``image`` under ``ref`` (written once; a repeat upload changes nothing)."""
        path = self.path(ref)
        if path is None or self.capacity == 0:
            return
        with self._lock:
            if path.is_file():
                return
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            try:
                image.convert("RGB").save(tmp, "PNG")
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            self._prune()

    def load(self, ref: str) -> Image.Image | None:
        """The image kept under ``ref``, or None when it was never kept or has been dropped."""
        path = self.path(ref)
        if path is None:
            return None
        try:
            with Image.open(path) as image:
                image.load()
                out = image.convert("RGB")
        except (FileNotFoundError, OSError):
            return None
        return out

    def _prune(self) -> None:
        files = []
        for entry in os.scandir(self.root):
            if entry.name.endswith(".png") and entry.is_file():
                st = entry.stat()
                files.append((st.st_mtime_ns, st.st_size, Path(entry.path)))
        used = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if used <= self.capacity:
                break
            path.unlink(missing_ok=True)
            used -= size
