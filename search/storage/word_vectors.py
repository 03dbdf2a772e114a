"""Vectors of single words under one model, embedded ahead of queries: the words of the text corpora (the
built-in vocabulary, captions), so that a text query made of known words gets its per-word scores ("why this
hit") without a second pass through the text tower.

One file per model, ``<data_dir>/words/<sha256 of the model fingerprint>.npz`` (words and float32 vectors),
replaced atomically by the indexer; the engine reads it when the live build changes. It is a cache: a lost or
damaged file only means the words are embedded again when a query needs them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FOLDER = "words"


class WordVectors:
    def __init__(self, data_dir: Path, fingerprint: str) -> None:
        name = hashlib.sha256(fingerprint.encode()).hexdigest()
        self.path = Path(data_dir) / FOLDER / f"{name}.npz"

    def load(self) -> dict[str, np.ndarray]:
        """Word -> vector; empty when there is no file, or it cannot be read (logged)."""
        try:
            with np.load(self.path, allow_pickle=False) as f:
                words, vectors = f["words"], f["vectors"]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("%s: unreadable word vectors (%s); words are embedded as queries need them", self.path, exc)
            return {}
        return dict(zip(words.tolist(), vectors, strict=True))

    def add(self, words: list[str], vectors: np.ndarray) -> None:
        """Merge ``words`` and their vectors into the file (written to a temporary name, then renamed)."""
        known = self.load()
        known.update(zip(words, np.asarray(vectors, np.float32), strict=True))
        if not known:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.stem}.tmp-{os.getpid()}.npz")
        np.savez(tmp, words=np.array(list(known), dtype=str), vectors=np.stack(list(known.values())))
        os.replace(tmp, self.path)
