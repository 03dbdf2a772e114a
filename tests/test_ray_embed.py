"""`index --ray`: tiles embedded by Ray Data actors on a local Ray instance (CPU, the tiny model) give the same
store and index as a plain run, also when a worker dies mid-run, and a driver killed mid-run resumes to the same
result; one pool of actors, each loading the model once, embeds every source of a run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import indexer.source_sync
from indexer.indexer import Indexer
from search.archives.readers.folder import FolderReader
from search.conch.encoder import Encoder
from search.core.settings import load_settings
from search.storage.store import Store
from tests.archives import TILE_FORMATS, files_under, image_bytes, make_image, make_tiles, make_wds_shard, make_zip

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]' to run the Ray tests")

ROOT = Path(__file__).resolve().parents[1]
# What a tile's row must hold alike after a plain run and a Ray run.
TILE_FIELDS = (
    "id",
    "source_id",
    "path",
    "content_hash",
    "fingerprint",
    "width",
    "height",
    "slide_key",
    "case_key",
    "meta",
)
# The file each Ray worker process appends its pid to whenever it builds a model (count_model_loads).
MODEL_LOADS = "TEST_RAY_MODEL_LOADS"


def count_model_loads() -> None:
    """Run in each Ray worker process as it starts: every Encoder built there, as an actor loading the model builds
    one, appends the process's pid to the file MODEL_LOADS names."""
    build = Encoder.__init__

    def counted(self, *args, **kwargs) -> None:
        build(self, *args, **kwargs)
        with open(os.environ[MODEL_LOADS], "a") as log:
            log.write(f"{os.getpid()}\n")

    Encoder.__init__ = counted


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory) -> Path:
    """A local Ray instance on two CPUs whose workers import this checkout; shut down with the module. Yields the
    file its workers log each model they load to."""
    loads = tmp_path_factory.mktemp("ray") / "model_loads"
    loads.touch()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        log_to_driver=False,
        runtime_env={
            "env_vars": {"PYTHONPATH": str(ROOT), MODEL_LOADS: str(loads)},
            "worker_process_setup_hook": count_model_loads,
        },
    )
    yield loads
    ray.shutdown()


def _indexed(store: Store, fingerprint: str) -> dict[tuple[str, str], tuple]:
    """(source, locator) -> (what the store holds about the tile, its vector)."""
    ids, vectors = next(store.iter_embeddings(fingerprint, batch=10**6))
    by_id = dict(zip(ids.tolist(), vectors, strict=True))
    return {
        (t["source"]["uri"], t["locator"]): (tuple(t[k] for k in TILE_FIELDS), by_id[t["id"]])
        for t in store.get_tiles(ids.tolist())
    }


def _assert_same_index(plain: Indexer, other: Indexer, fingerprint: str) -> None:
    a, b = _indexed(plain.store, fingerprint), _indexed(other.store, fingerprint)
    assert set(a) == set(b) and len(a) > 0
    for tile in a:
        assert a[tile][0] == b[tile][0], tile
        # Actors run torch on one thread, the plain run on all: float32 sums in another order can
        # round to the neighbouring float16 when stored (2**-10 relative), never further.
        np.testing.assert_allclose(a[tile][1], b[tile][1], rtol=2**-10, atol=1e-6)
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
    real_open = indexer.source_sync.open_reader

    def open_crashing(path, settings):
        reader = real_open(path, settings)
        reader.__class__ = CrashOnceReader
        reader.marker = marker
        return reader

    monkeypatch.setattr(indexer.source_sync, "open_reader", open_crashing)
    distributed = _ray_indexer(tiny_settings, tiny_encoder, tmp_path / "ray")
    report = distributed.run([archive]).sources[0]
    assert marker.exists()  # a worker died mid-run; Ray restarted its actor and ran its batch again
    assert (report.new, report.errors) == (20, 1)
    _assert_same_index(plain, distributed, tiny_encoder.fingerprint)


def test_one_pool_of_actors_embeds_every_source_of_a_run(local_ray, tiny_settings, tiny_encoder, archive, tmp_path):
    make_tiles(tmp_path / "zipped", 9, seed=1)
    sources = [archive, make_zip(tmp_path / "b.zip", files_under(tmp_path / "zipped")), tmp_path / "c.tar"]
    make_wds_shard(sources[2], 7, seed=2)
    plain = Indexer(tiny_settings, encoder=tiny_encoder)
    expected = plain.run(sources).sources
    distributed = _ray_indexer(tiny_settings, tiny_encoder, tmp_path / "ray")
    before = len(local_ray.read_text().split())
    report = distributed.run(sources).sources
    # The pool of two actors loaded the model once per actor for the three sources, not once per source.
    loads = local_ray.read_text().split()[before:]
    assert 0 < len(loads) == len(set(loads)) <= 2
    assert [(s.uri, s.new, s.errors) for s in report] == [(s.uri, s.new, s.errors) for s in expected]
    assert [s.new for s in report] == [20, 9, 7]
    _assert_same_index(plain, distributed, tiny_encoder.fingerprint)
