"""Indexing real archives end to end with the tiny CONCH config and synthetic weights, on SQLite and Postgres."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from sqlalchemy import create_engine, text

from indexer.indexer import Indexer
from search.conch.encoder import Encoder
from search.core.errors import BadInput, IndexBusy
from search.core.settings import load_settings
from search.storage.index_directory import IndexDirectory
from search.storage.segmented import SegmentedIndex
from search.storage.store import Store
from tests.archives import (
    bomb_png,
    files_under,
    image_bytes,
    make_hostile_zip,
    make_image,
    make_slide,
    make_tar,
    make_tiles,
    make_wds_shard,
    make_zip,
    wds_sidecar,
)


@pytest.fixture(params=["sqlite", "postgres"])
def tiny_settings(request, tiny_settings):
    """The suite runs on both databases: the tiny-model settings, on SQLite and on a Postgres database."""
    if request.param == "sqlite":
        return tiny_settings
    return tiny_settings.model_copy(update={"database_url": request.getfixturevalue("postgres").new_database()})


@pytest.fixture
def other_database(request, tiny_settings) -> str | None:
    """A second, empty database of the same kind, for a second index to compare with (None: SQLite in data_dir)."""
    return tiny_settings.database_url and request.getfixturevalue("postgres").new_database()


@pytest.fixture
def indexer(tiny_settings, tiny_encoder):
    return Indexer(tiny_settings, encoder=tiny_encoder)


def _tiles(store: Store) -> dict[str, dict]:
    ids = store.tile_ids_matching()
    return {t["locator"]: t for t in store.get_tiles(list(map(int, ids)))}


def _slides(settings) -> dict[str, tuple]:
    """slide_key -> (path, mpp, width, height), read with plain SQL as any client of the database would."""
    engine = create_engine(settings.db_url)
    try:
        with engine.connect() as db:
            rows = db.execute(text("SELECT slide_key, path, mpp, width, height FROM slides")).all()
    finally:
        engine.dispose()
    return {key: tuple(rest) for key, *rest in rows}


def _live_index(settings) -> SegmentedIndex:
    directory = IndexDirectory(settings.data_dir / "index")
    return SegmentedIndex.load(directory.build_dir(directory.live_build_id()))


def test_folder_tiles_metadata_and_self_retrieval(indexer, tiny_settings, tiny_encoder, tmp_path):
    paths = make_tiles(tmp_path / "tiles", 12)
    report = indexer.run([tmp_path / "tiles"])
    assert report.sources[0].new == 12 and report.errors == 0
    tiles = _tiles(indexer.store)
    expected = {p.relative_to(tmp_path / "tiles").as_posix() for p in paths}
    assert set(tiles) == expected
    first = tiles["case0/slide0/tile_000.jpg"]
    assert (first["case_key"], first["slide_key"]) == ("case0", "slide0")
    assert first["width"] == first["height"] == 64 and len(first["content_hash"]) == 64
    index = _live_index(tiny_settings)
    assert index.ntotal == 12
    for path in paths[:4]:
        query = tiny_encoder.encode_images([path])
        scores, ids = index.search(query, 1)
        assert tiles[path.relative_to(tmp_path / "tiles").as_posix()]["id"] == ids[0, 0]
        assert scores[0, 0] == pytest.approx(1.0, abs=1e-3)  # stored as float16
    assert report.build["count"] == 12 and report.build["model_fingerprint"] == tiny_encoder.fingerprint
    # The built-in vocabulary is indexed by default for image -> text.
    text_ids, text_vectors = indexer.store.text_matrix(tiny_encoder.fingerprint)
    assert len(text_ids) >= 300 and text_vectors.shape[1] == 32


def test_zip_tar_and_webdataset_in_one_run(indexer, tmp_path):
    make_tiles(tmp_path / "src", 6)
    files = files_under(tmp_path / "src")
    make_zip(tmp_path / "a.zip", files)
    make_tar(tmp_path / "b.tar.gz", files, gz=True)
    keys = make_wds_shard(tmp_path / "shard-000.tar", 5)
    report = indexer.run([tmp_path / "a.zip", tmp_path / "b.tar.gz", tmp_path / "shard-000.tar"])
    assert [s.new for s in report.sources] == [6, 6, 5]
    assert [s.kind for s in report.sources] == ["zip", "tar", "tar"]
    # The job counts the whole run, not its last source.
    job = indexer.store.last_job()
    assert (job["done"], job["errors"]) == (17, 0)
    tiles = _tiles(indexer.store)
    assert len(indexer.store.tile_ids_matching()) == 17
    sample = next(t for t in tiles.values() if t["locator"].startswith(keys[3]))
    assert sample["meta"]["label"] == wds_sidecar(3)["label"]
    assert len(indexer.store.tile_ids_matching(source=str((tmp_path / "a.zip").resolve()))) == 6


def test_a_source_named_twice_is_synced_once(indexer, tmp_path):
    make_tiles(tmp_path / "src", 4)
    make_zip(tmp_path / "a.zip", files_under(tmp_path / "src"))
    (tmp_path / "sub").mkdir()
    report = indexer.run([tmp_path / "a.zip", tmp_path / "src", tmp_path / "sub" / ".." / "a.zip"])
    assert [(s.uri, s.new) for s in report.sources] == [
        (str((tmp_path / "a.zip").resolve()), 4),
        (str((tmp_path / "src").resolve()), 4),
    ]


def test_whole_slide_tiles_keep_position(indexer, tiny_settings, tmp_path):
    (tmp_path / "slides").mkdir()
    make_slide(tmp_path / "slides" / "S1.tiff", size=1024, mpp=0.25, tissue=(256, 256, 768, 768), levels=2)
    report = indexer.run([tmp_path / "slides" / "S1.tiff"])
    assert report.sources[0].kind == "slide" and report.sources[0].new > 0
    tiles = list(_tiles(indexer.store).values())
    assert all(t["slide_key"] == "S1" and t["mpp"] == pytest.approx(0.5) for t in tiles)
    assert all(t["x"] is not None and t["y"] is not None and t["level"] is not None for t in tiles)
    # Tissue only: every tile lies over the tissue rectangle (tile size 64 at 0.5 um/px = 128 level-0 px).
    assert all(128 <= t["x"] < 768 and 128 <= t["y"] < 768 for t in tiles)
    assert indexer.store.neighbours(tiles[0]["id"])
    # The slide row carries the scan's level-0 scale and size, not the tiles' scale.
    assert _slides(tiny_settings) == {"S1": ("S1.tiff", 0.25, 1024, 1024)}


def test_reindex_adds_removes_and_changes(indexer, tiny_encoder, tmp_path):
    root = tmp_path / "tiles"
    paths = make_tiles(root, 8)
    indexer.run([root])
    before = _tiles(indexer.store)
    paths[0].unlink()
    changed = paths[1]
    changed.write_bytes(image_bytes(make_image(64, 999), "png"))
    added = make_tiles(tmp_path / "more", 2, seed=7)
    for i, p in enumerate(added):
        p.rename(root / f"new_{i}.{p.suffix[1:]}")
    os.utime(paths[2])  # touched, same bytes: not re-embedded
    report = indexer.run(kind="reindex")
    src = report.sources[0]
    assert (src.new, src.removed, src.changed, src.reembedded) == (2, 1, 1, 0)
    after = _tiles(indexer.store)
    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    assert rel(paths[0]) not in after and {"new_0.jpg", "new_1.png"} <= set(after)
    assert after[rel(changed)]["id"] != before[rel(changed)]["id"]
    assert after[rel(paths[2])]["id"] == before[rel(paths[2])]["id"]
    index = _live_index(indexer.settings)
    assert index.ntotal == 9
    _, ids = index.search(tiny_encoder.encode_images([changed]), 1)
    assert ids[0, 0] == after[rel(changed)]["id"]
    # Nothing changed: a reindex embeds nothing and keeps the live build.
    again = indexer.run(kind="reindex")
    assert again.sources[0].unchanged == 9 and again.build["id"] == report.build["id"]


def test_a_run_killed_before_publishing_is_published_by_the_next(indexer, tiny_settings, tiny_encoder, tmp_path):
    root = tmp_path / "tiles"
    paths = make_tiles(root, 4)
    indexer.run([root])
    paths[0].write_bytes(image_bytes(make_image(64, 321), "jpg"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for kill -9 after the tiles were committed

    crashed = Indexer(tiny_settings, encoder=tiny_encoder)
    crashed.build_index = killed
    with pytest.raises(KeyboardInterrupt):
        crashed.run(kind="reindex")
    new_id = _tiles(indexer.store)["case0/slide0/tile_000.jpg"]["id"]
    assert new_id not in set(_live_index(tiny_settings).ids.tolist())
    report = Indexer(tiny_settings, encoder=tiny_encoder).run(kind="reindex")
    assert report.sources[0].changed == 0  # nothing left to embed, yet the index is rebuilt
    assert set(_live_index(tiny_settings).ids.tolist()) == set(indexer.store.tile_ids_matching().tolist())


def test_other_checkpoint_means_full_reembed(indexer, tiny_settings, tiny_state_dict, tokenizer_path, tmp_path):
    make_tiles(tmp_path / "tiles", 5)
    indexer.run([tmp_path / "tiles"])
    other = tmp_path / "other.bin"
    state = dict(tiny_state_dict)
    state["visual.proj_contrast"] = state["visual.proj_contrast"].flip(0)
    torch.save(state, other)
    settings = load_settings(**{**tiny_settings.model_dump(), "checkpoint": other})
    encoder = Encoder.from_settings(settings)
    report = Indexer(settings, encoder=encoder).run(kind="reindex")
    assert report.sources[0].reembedded == 5
    assert report.build["model_fingerprint"] == encoder.fingerprint
    assert indexer.store.counts()["embedded_by_model"] == {encoder.fingerprint: 5}
    assert len(indexer.store.texts_missing_embeddings(encoder.fingerprint)) == 0


def test_bad_files_are_recorded_and_skipped(indexer, tiny_settings, tmp_path):
    root = tmp_path / "tiles"
    make_tiles(root, 3)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = image_bytes(make_image(64, 3), "jpg")
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "bomb.png").write_bytes(bomb_png())
    make_hostile_zip(tmp_path / "hostile.zip")
    report = indexer.run([root, tmp_path / "hostile.zip"])
    assert report.sources[0].new == 3 and report.sources[1].new == 1
    # Per-run counts add up: files read well + files refused = files seen, and each refusal is on record.
    job = indexer.store.last_job()
    assert report.errors >= 3 + 4 and job["errors"] == report.errors
    assert job["done"] == 4
    assert indexer.store.count_errors(job["id"]) == report.errors
    errors = {e["path"]: e["reason"] for e in indexer.store.recent_errors(50)}
    # A folder's file by its own path, an archive member as archive:member; the reason does not repeat it.
    folder, archive = str(root.resolve()), str((tmp_path / "hostile.zip").resolve())
    assert errors[f"{folder}/corrupt.png"].startswith("unreadable image header")
    assert errors[f"{folder}/truncated.jpg"].startswith("corrupt or truncated image")
    assert "decompression bomb" in errors[f"{folder}/bomb.png"]
    assert errors[f"{archive}:../evil.png"] == "member path with '..' refused"
    assert not any(reason.startswith(("corrupt.png", "hostile.zip", "bomb.png")) for reason in errors.values())
    # An error is a state of a file: a no-op reindex records the same errors, not a second row each.
    report = indexer.run(kind="reindex")
    assert report.errors == len(errors) and len(indexer.store.recent_errors(50)) == len(errors)
    # A file that reads well again has no error any more.
    (root / "corrupt.png").unlink()
    indexer.run([root], kind="reindex")
    assert f"{folder}/corrupt.png" not in {e["path"] for e in indexer.store.recent_errors(50)}
    # A tile that goes bad later keeps its indexed vector.
    victim = root / "case0" / "slide0" / "tile_000.jpg"
    victim.write_bytes(b"broken now")
    report = indexer.run([root], kind="reindex")
    assert report.sources[0].errors >= 1
    assert "case0/slide0/tile_000.jpg" in _tiles(indexer.store)


def test_job_counts_cover_the_whole_run_and_are_saved(indexer, tmp_path):
    make_tiles(tmp_path / "a", 5)
    (tmp_path / "a" / "bad1.png").write_bytes(b"not a png")
    make_tiles(tmp_path / "b", 4, seed=7)
    for i in range(3):
        (tmp_path / "b" / f"bad{i}.jpg").write_bytes(b"not a jpeg")
    make_hostile_zip(tmp_path / "hostile.zip")
    report = indexer.run([tmp_path / "a", tmp_path / "b", tmp_path / "hostile.zip"])
    job = indexer.store.last_job()
    assert report.tiles == 10 and report.errors > 4
    assert (job["done"], job["errors"]) == (report.tiles, report.errors)


@pytest.mark.parametrize("kind", ["text", "fake zip", "fake tar.gz", "single image", "empty folder"])
def test_an_input_that_yields_no_tile_is_an_error(indexer, tmp_path, kind):
    path = {
        "text": tmp_path / "x.txt",
        "fake zip": tmp_path / "x.zip",
        "fake tar.gz": tmp_path / "x.tar.gz",
        "single image": tmp_path / "x.png",
        "empty folder": tmp_path / "empty",
    }[kind]
    if kind == "empty folder":
        path.mkdir()
        (path / "notes.txt").write_text("no tiles here")
    elif kind == "single image":
        path.write_bytes(image_bytes(make_image(64), "png"))
    else:
        path.write_bytes(b"hello, not an archive")
    with pytest.raises(BadInput, match=f"{path.name}: no tiles \\(") as raised:
        indexer.run([path])
    assert "\n" not in raised.value.message
    assert indexer.store.last_job()["status"] == "failed"
    # With another input that has tiles, the run succeeds and its summary names the one without.
    make_tiles(tmp_path / "tiles", 2)
    report = indexer.run([path, tmp_path / "tiles"])
    assert report.sources[1].new == 2
    assert f"{path.resolve()}: no tiles (" in report.summary()


def test_missing_archive_keeps_its_tiles(indexer, tmp_path):
    make_tiles(tmp_path / "src", 4)
    make_zip(tmp_path / "a.zip", files_under(tmp_path / "src"))
    indexer.run([tmp_path / "a.zip"])
    (tmp_path / "a.zip").unlink()
    report = indexer.run(kind="reindex")
    assert report.sources[0].errors == 1 and report.sources[0].removed == 0
    assert len(indexer.store.tile_ids_matching()) == 4
    assert "no such file" in indexer.store.recent_errors(1)[0]["reason"]


def test_remove_forgets_a_source_and_republishes(indexer, tmp_path):
    make_tiles(tmp_path / "a", 3)
    make_tiles(tmp_path / "b", 2, seed=3)
    indexer.run([tmp_path / "a", tmp_path / "b"])
    assert indexer.remove([tmp_path / "a"]) == {str((tmp_path / "a").resolve()): 3}
    assert [s["uri"] for s in indexer.store.sources()] == [str((tmp_path / "b").resolve())]
    assert len(indexer.store.tile_ids_matching()) == 2 and indexer.store.counts()["embedded"] == 2
    assert _live_index(indexer.settings).ntotal == 2
    with pytest.raises(BadInput, match="not an indexed source"):
        indexer.remove([tmp_path / "nowhere"])
    # The last source gone: no index is live any more, rather than one naming deleted tiles.
    indexer.remove([tmp_path / "b"])
    assert indexer.store.live_build() is None
    assert IndexDirectory(indexer.settings.data_dir / "index").live_build_id() is None


def test_second_indexer_stops_with_a_clear_message(indexer, tiny_settings, tiny_encoder, tmp_path):
    make_tiles(tmp_path / "tiles", 2)
    lock = indexer.lock()
    try:
        with pytest.raises(IndexBusy, match="--wait"):
            Indexer(tiny_settings, encoder=tiny_encoder).run([tmp_path / "tiles"])
    finally:
        lock.release()
    assert Indexer(tiny_settings, encoder=tiny_encoder).run([tmp_path / "tiles"]).sources[0].new == 2


def test_decode_workers_give_the_same_vectors(tiny_settings, tiny_encoder, other_database, tmp_path):
    make_tiles(tmp_path / "tiles", 6)
    inline = Indexer(tiny_settings, encoder=tiny_encoder)
    inline.run([tmp_path / "tiles"])
    overrides = {"workers": 2, "data_dir": tmp_path / "d2", "database_url": other_database}
    settings = load_settings(**{**tiny_settings.model_dump(), **overrides})
    pooled = Indexer(settings, encoder=tiny_encoder)
    pooled.run([tmp_path / "tiles"])
    a = np.concatenate([v for _, v in inline.store.iter_embeddings(tiny_encoder.fingerprint)])
    b = np.concatenate([v for _, v in pooled.store.iter_embeddings(tiny_encoder.fingerprint)])
    assert a.shape == (6, 32)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_kill_9_then_resume_loses_nothing_and_duplicates_nothing(tiny_model_args, tmp_path):
    n = 240
    make_tiles(tmp_path / "tiles", n, size=32)
    data = tmp_path / "data"
    env = {**os.environ, "HISTOSEARCH_DATA_DIR": str(data), "HISTOSEARCH_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        "-m",
        "search.cli",
        "index",
        str(tmp_path / "tiles"),
        *tiny_model_args,
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = data / "histosearch.db"
    deadline = time.monotonic() + 120
    count = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=1) as conn:
                    count = conn.execute("select count(*) from tiles").fetchone()[0]
            except sqlite3.OperationalError:
                count = 0
            if count >= 10:
                break
        time.sleep(0.01)
    assert proc.poll() is None, f"indexer ended before it could be killed: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(db) as conn:
        partial = conn.execute("select count(*) from tiles").fetchone()[0]
    assert 0 < partial < n
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select locator from tiles").fetchall()
        vectors = conn.execute("select count(*) from embeddings").fetchone()[0]
        statuses = [r[0] for r in conn.execute("select status from jobs order by id")]
    assert len(rows) == n and len({r[0] for r in rows}) == n and vectors == n
    assert statuses == ["interrupted", "done"]


def test_jpeg_passthrough_decodes_on_the_encoder_device_with_the_same_vectors(
    tiny_settings, tiny_encoder, other_database, tmp_path, monkeypatch
):
    """gpu_decode: baseline RGB JPEGs go undecoded to the encoder (nvJPEG on a GPU, torchvision here), which
    resizes those not at the model's size on its device; a JPEG the device decoder refuses is decoded with PIL
    and only one that PIL refuses too is an error."""
    import torchvision.io

    root = tmp_path / "tiles"
    root.mkdir()
    for i in range(5):
        (root / f"t{i}.jpg").write_bytes(image_bytes(make_image(64, i), "jpg"))
    (root / "big.jpg").write_bytes(image_bytes(make_image(96, 9), "jpg"))  # resized on the encoder's device
    refused = image_bytes(make_image(64, 7), "jpg")
    (root / "refused.jpg").write_bytes(refused)  # valid, but the stand-in for nvJPEG refuses it
    good = image_bytes(make_image(64, 5), "jpg")
    (root / "broken.jpg").write_bytes(good[:200] + b"\x00" * 50)  # a header that parses, a body that does not
    real_decode = torchvision.io.decode_jpeg
    refusals = []

    def device_decoder(data, **kwargs):
        if isinstance(data, list):
            return [device_decoder(d, **kwargs) for d in data]
        if bytes(data.numpy()) == refused:
            refusals.append(1)
            raise RuntimeError("nvjpegDecode failed: JPEG stream not supported")
        return real_decode(data, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", device_decoder)
    plain = Indexer(tiny_settings, encoder=tiny_encoder)
    plain.run([root])
    overrides = {"gpu_decode": True, "data_dir": tmp_path / "d2", "database_url": other_database}
    settings = load_settings(**{**tiny_settings.model_dump(), **overrides})
    passthrough = Indexer(settings, encoder=tiny_encoder)
    report = passthrough.run([root])
    assert refusals
    assert report.sources[0].new == 7 and report.sources[0].errors == 1
    ((path, reason),) = [(e["path"], e["reason"]) for e in passthrough.store.recent_errors()]
    assert path == str((root / "broken.jpg").resolve()) and reason.startswith("corrupt or truncated")
    a = dict(zip(*_by_locator(plain), strict=True))
    b = dict(zip(*_by_locator(passthrough), strict=True))
    assert set(a) == set(b) == {f"t{i}.jpg" for i in range(5)} | {"big.jpg", "refused.jpg"}
    for locator in a:
        if locator == "big.jpg":  # resized by torch on the device, not by PIL: equal to rounding
            assert float(a[locator] @ b[locator]) >= 0.9999
        else:
            np.testing.assert_allclose(a[locator], b[locator], atol=1e-6)


def _by_locator(indexer: Indexer) -> tuple[list[str], list[np.ndarray]]:
    locators = {t["id"]: t["locator"] for t in _tiles(indexer.store).values()}
    pairs = [
        (locators[int(i)], v)
        for ids, vectors in indexer.store.iter_embeddings(indexer.encoder.fingerprint)
        for i, v in zip(ids, vectors, strict=True)
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]
