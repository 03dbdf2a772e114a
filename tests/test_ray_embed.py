"""`index --ray`: tiles embedded by Ray Data actors on a local Ray instance (CPU, the tiny model) give the same
store and index as a plain run, also when a worker dies mid-run, and a driver killed mid-run resumes to the same
result."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import indexer.indexer
from indexer.indexer import Indexer
from search.archives.readers.folder import FolderReader
from search.core.settings import load_settings
from search.storage.store import Store
from tests.archives import TILE_FORMATS, image_bytes, make_image

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]' to run the Ray tests")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance on two CPUs whose workers import this checkout; shut down with the module."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    yield
    ray.shutdown()


def _indexed(store: Store, fingerprint: str) -> dict[str, tuple]:
    """locator -> (what the store holds about the tile, its vector)."""
    ids, vectors = next(store.iter_embeddings(fingerprint, batch=10**6))
    by_id = dict(zip(ids.tolist(), vectors, strict=True))
    keys = ("id", "path", "content_hash", "fingerprint", "width", "height", "slide_key", "case_key", "meta")
    return {t["locator"]: (tuple(t[k] for k in keys), by_id[t["id"]]) for t in store.get_tiles(ids.tolist())}


def _assert_same_index(plain: Indexer, other: Indexer, fingerprint: str) -> None:
    a, b = _indexed(plain.store, fingerprint), _indexed(other.store, fingerprint)
    assert set(a) == set(b) and len(a) > 0
    for locator in a:
        assert a[locator][0] == b[locator][0], locator
        np.testing.assert_allclose(a[locator][1], b[locator][1], atol=1e-6)
    assert other.store.live_build()["count"] == plain.store.live_build()["count"] == len(a)


def _ray_indexer(tiny_settings, tiny_encoder, data_dir: Path) -> Indexer:
    settings = load_settings(
        **{**tiny_settings.model_dump(), "data_dir": data_dir, "ray_address": "auto", "ray_actors": 2}
    )
    return Indexer(settings, encoder=tiny_encoder)


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "tiles"
    for i in range(20):
        ext = TILE_FORMATS[i % len(TILE_FORMATS)]
        path = root / f"case{i % 2}" / f"slide{i % 4}" / f"tile_{i:03d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(make_image(64, i), ext))
    (root / "case9" / "slide9").mkdir(parents=True)
    (root / "case9" / "slide9" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def test_ray_run_equals_a_plain_run(local_ray, tiny_settings, tiny_encoder, archive, tmp_path):
    plain = Indexer(tiny_settings, encoder=tiny_encoder)
    expected = plain.run([archive]).sources[0]
    distributed = _ray_indexer(tiny_settings, tiny_encoder, tmp_path / "ray")
    report = distributed.run([archive]).sources[0]
    assert (report.new, report.errors) == (expected.new, expected.errors) == (20, 1)
    _assert_same_index(plain, distributed, tiny_encoder.fingerprint)
    assert [e["path"] for e in distributed.store.recent_errors()] == [e["path"] for e in plain.store.recent_errors()]
    # Ray stays up for whoever started it: the indexer used the running instance and left it running.
    assert ray.is_initialized()


def test_a_killed_ray_driver_resumes_to_the_same_result(local_ray, tiny_settings, tiny_encoder, archive, tmp_path):
    plain = Indexer(tiny_settings, encoder=tiny_encoder)
    plain.run([archive])
    crashed = _ray_indexer(tiny_settings, tiny_encoder, tmp_path / "ray")
    add_tiles = crashed.store.add_tiles
    calls = []

    def killed_after_one_commit(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # stands for kill -9 of the driver after its first commit
        calls.append(1)
        return add_tiles(*args, **kwargs)

    crashed.store.add_tiles = killed_after_one_commit
    with pytest.raises(KeyboardInterrupt):
        crashed.run([archive])
    committed = crashed.store.counts()["tiles"]
    assert 0 < committed < 20
    resumed = _ray_indexer(tiny_settings, tiny_encoder, tmp_path / "ray")
    report = resumed.run([archive]).sources[0]
    assert report.new == 20 - committed and report.unchanged == committed
    _assert_same_index(plain, resumed, tiny_encoder.fingerprint)
    assert [j["status"] for j in (resumed.store.last_job(),)] == ["done"]


class CrashOnceReader(FolderReader):
    """A folder reader whose process dies, as a lost worker's does, the first time any copy of it reads a tile (a
    marker file remembers it across the actors' processes). Ray pickles it to the actors by this module's name."""

    marker: Path

    def read(self, locator: str):
        if not self.marker.exists():
            self.marker.touch()
            os._exit(1)
        return super().read(locator)


def test_a_lost_worker_costs_only_its_batches(local_ray, tiny_settings, tiny_encoder, archive, tmp_path, monkeypatch):
    plain = Indexer(tiny_settings, encoder=tiny_encoder)
    plain.run([archive])
    marker = tmp_path / "crashed"
    real_open = indexer.indexer.open_reader

    def open_crashing(path, settings):
        reader = real_open(path, settings)
        reader.__class__ = CrashOnceReader
        reader.marker = marker
        return reader

    monkeypatch.setattr(indexer.indexer, "open_reader", open_crashing)
    distributed = _ray_indexer(tiny_settings, tiny_encoder, tmp_path / "ray")
    report = distributed.run([archive]).sources[0]
    assert marker.exists()  # a worker died mid-run; Ray restarted its actor and ran its batch again
    assert (report.new, report.errors) == (20, 1)
    _assert_same_index(plain, distributed, tiny_encoder.fingerprint)
