"""The decode pool: workers that keep their reader, progressive JPEGs kept off the device, worker sizing."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from indexer import pipeline
from indexer.pipeline import CHUNK, Decoded, DecodePool, decode_tile, default_workers
from search.archives.readers import FolderReader
from search.conch.config import get_model_cfg
from search.conch.preprocess import Preprocess
from search.core.settings import load_settings
from tests.archives import make_image, make_tiles


class CountingReader(FolderReader):
    """A folder reader that notes in a file each time a process unpickles it."""

    log: Path

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")


@pytest.fixture
def preprocess() -> Preprocess:
    return Preprocess(64, get_model_cfg("conch_tiny").pretrained_cfg)


def test_each_worker_unpickles_a_source_reader_once(tmp_path, preprocess):
    make_tiles(tmp_path / "tiles", 8, size=16)
    settings = load_settings(data_dir=tmp_path / "data")
    readers = []
    for name in ("a", "b"):
        reader = CountingReader(tmp_path / "tiles", settings)
        reader.log = tmp_path / f"unpickled-{name}.log"
        readers.append(reader)
    locators = [e.locator for e in readers[0].scan()] * (3 * CHUNK // 8)  # 12 chunks of the same tiles
    with DecodePool(2, preprocess, settings.max_image_pixels) as pool:
        for reader in readers:
            results = list(pool.decode(reader, locators))
            assert [r.locator for r in results] == locators
            assert all(isinstance(r, Decoded) and r.pixels.shape == (64, 64, 3) for r in results)
    for name in ("a", "b"):
        pids = (tmp_path / f"unpickled-{name}.log").read_text().split()
        assert 1 <= len(pids) <= 2 and len(set(pids)) == len(pids), pids


def _jpeg(progressive: bool, size: int = 64, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    make_image(size, 3).convert(mode).save(buf, "JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


class BytesReader:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def read(self, locator: str) -> bytes:
        return self.files[locator]


def test_passthrough_sends_baseline_rgb_jpegs_only(preprocess):
    reader = BytesReader(
        {
            "baseline.jpg": _jpeg(False),
            "large.jpg": _jpeg(False, size=100),
            "progressive.jpg": _jpeg(True),
            "grey.jpg": _jpeg(False, mode="L"),
            "png.png": _png(),
        }
    )
    results = {loc: decode_tile(reader, loc, preprocess, 10**8, jpeg_passthrough=True) for loc in reader.files}
    # Baseline RGB JPEGs of any size go to the device, with their size from the header.
    assert results["baseline.jpg"].jpeg is not None and results["baseline.jpg"].pixels is None
    large = results["large.jpg"]
    assert large.jpeg is not None and (large.width, large.height) == (100, 100)
    # nvJPEG decodes progressive JPEGs one at a time on the host: the worker decodes them instead.
    for name in ("progressive.jpg", "grey.jpg", "png.png"):
        assert results[name].jpeg is None and results[name].pixels.shape == (64, 64, 3), name
    # A JPEG past the pixel limit is not sent on: the worker refuses it as a bomb.
    too_big = decode_tile(reader, "large.jpg", preprocess, 100 * 99, jpeg_passthrough=True)
    assert not isinstance(too_big, Decoded) and "too many pixels" in too_big.reason


def _png() -> bytes:
    buf = io.BytesIO()
    make_image(64, 4).save(buf, "PNG")
    return buf.getvalue()


def test_default_workers_follow_the_cpu_affinity(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the host's CPUs, not this process's
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert default_workers() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert default_workers() == 1


def test_worker_keeps_two_readers_and_closes_older_ones(tmp_path, preprocess, monkeypatch):
    import pickle

    make_tiles(tmp_path / "tiles", 2, size=16)
    settings = load_settings(data_dir=tmp_path / "data")
    pipeline._init_worker(preprocess, settings.max_image_pixels, False)
    closed = []
    monkeypatch.setattr(FolderReader, "close", lambda self: closed.append(self))
    reader = FolderReader(tmp_path / "tiles", settings)
    locator = next(iter(reader.scan())).locator
    for key in (1, 2, 1, 3):
        (result,) = pipeline._worker_chunk(key, pickle.dumps(reader), [locator])
        assert isinstance(result, Decoded)
    assert list(pipeline._worker["readers"]) == [1, 3] and len(closed) == 1


@pytest.mark.parametrize("shared", [True, False])
def test_pixels_from_workers_match_in_process_decoding(tmp_path, preprocess, shared):
    make_tiles(tmp_path / "tiles", 40, size=48)
    settings = load_settings(data_dir=tmp_path / "data")
    reader = FolderReader(tmp_path / "tiles", settings)
    locators = [e.locator for e in reader.scan()] * 3  # more chunks than blocks: blocks are reused
    with DecodePool(0, preprocess, settings.max_image_pixels) as inline:
        want = [r.pixels.copy() for r in inline.decode(reader, locators)]
    with DecodePool(2, preprocess, settings.max_image_pixels, shared=shared) as pool:
        assert (pool._blocks is not None) == shared
        names = [block.name for block in pool._blocks.blocks] if shared else []
        # Stopped early, then run again: blocks still being written are not handed out twice.
        early = pool.decode(reader, locators)
        next(early)
        early.close()
        # Pixels in shared memory are valid until the next result: copied as they come, as the indexer does.
        got = [r.pixels.copy() for r in pool.decode(reader, locators)]
    assert len(got) == len(want) and all((a == b).all() for a, b in zip(got, want, strict=True))
    for name in names:  # the blocks are gone with the pool
        assert not Path("/dev/shm", name.lstrip("/")).exists()


def test_no_shared_memory_when_dev_shm_is_too_small(tmp_path, preprocess, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(64 << 20, 0, 64 << 20))
    with DecodePool(1, Preprocess(448, get_model_cfg("conch_tiny").pretrained_cfg), 10**8) as pool:
        assert pool._blocks is None  # a 64 MB /dev/shm: pixels travel pickled, no SIGBUS


PARENT = textwrap.dedent(
    """
    import os, sys, time
    from indexer.pipeline import DecodePool
    from search.conch.config import get_model_cfg
    from search.conch.preprocess import Preprocess

    pool = DecodePool(2, Preprocess(64, get_model_cfg("conch_tiny").pretrained_cfg), 1000)
    futures = [pool._executor.submit(os.getpid) for _ in range(8)]
    print(" ".join(str(p) for p in sorted({f.result() for f in futures})), flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes: it holds no memory and is waiting to be reaped.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_decode_workers_exit_when_their_parent_is_killed():
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], env=env, stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert workers and all(_alive(p) for p in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        # Polled, not timed: the workers must be gone well within the minute they are given.
        deadline = time.monotonic() + 60
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in workers if _alive(p)]
    finally:
        parent.kill()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"decode workers {left} outlived their killed parent"
