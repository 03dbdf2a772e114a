"""A fresh store, once on a real SQLite file and once on a real Postgres server (tests/postgres.py), and rows to
fill it with (pytest fixtures ``db`` and ``src``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from search.storage.store import Store

DIM = 8


def db_url(path: Path) -> str:
    return f"sqlite:///{path}"


def random_vectors(n: int, seed: int = 0) -> np.ndarray:
    # Values float16 holds exactly, so that vectors read back from the segment files compare equal.
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float16).astype(np.float32)


def tile_row(source_id: int, locator: str, **extra: object) -> dict:
    return {
        "source_id": source_id,
        "locator": locator,
        "path": f"tiles/{locator}.png",
        "content_hash": f"h-{locator}",
        "fingerprint": f"f-{locator}",
        **extra,
    }


@pytest.fixture
def db(database_url: str) -> Iterator[Store]:
    store = Store(database_url)
    yield store
    store.close()


@pytest.fixture
def src(db: Store) -> int:
    return db.get_or_create_source("folder", "/archive/a")
