import json
import multiprocessing
import os
import pickle
import random
import struct
import tarfile
import tracemalloc
import zlib

import pytest

from search.archives.readers import FolderReader, Skipped, TarReader, TileEntry, ZipReader, open_reader
from search.archives.readers.tar import sample_key
from search.core.errors import BadInput
from search.core.settings import Settings, load_settings
from tests.archives import (
    files_under,
    image_bytes,
    make_hostile_tar,
    make_hostile_zip,
    make_image,
    make_tar,
    make_tiles,
    make_wds_shard,
    make_zip,
    wds_sidecar,
)


@pytest.fixture
def settings() -> Settings:
    return load_settings(tile_size=64)


@pytest.fixture
def tiles(tmp_path):
    root = tmp_path / "tiles"
    make_tiles(root, 8)
    return root


def split(entries):
    found = list(entries)
    return [e for e in found if isinstance(e, TileEntry)], [e for e in found if isinstance(e, Skipped)]


def _read_in_child(reader, locator):
    return reader.read(locator)


def _read_to_file(reader, locator, out):
    out.write_bytes(reader.read(locator))


# Folders


def test_folder_lists_every_tile_of_a_nested_tree(tiles, settings):
    (tiles / "case0" / "notes.txt").write_text("not a tile")
    (tiles / "case0" / ".hidden.png").write_bytes(b"x")
    (tiles / "UPPER.JPG").write_bytes(image_bytes(make_image(16), "jpg"))
    (tiles / "extra.jpeg").write_bytes(image_bytes(make_image(16), "jpg"))
    entries, skipped = split(FolderReader(tiles, settings).scan())
    assert skipped == []
    expected = {
        *(p.relative_to(tiles).as_posix() for p in tiles.rglob("tile_*")),
        "UPPER.JPG",
        "extra.jpeg",
    }
    assert {e.path for e in entries} == expected
    assert {e.path.rsplit(".", 1)[1] for e in entries} == {"jpg", "png", "tif", "webp", "JPG", "jpeg"}
    assert all(e.locator == e.path and e.slide_path is None and e.meta == {} for e in entries)
    assert entries == split(FolderReader(tiles, settings).scan())[0]


def test_folder_read_returns_the_file_bytes(tiles, settings):
    reader = FolderReader(tiles, settings)
    for entry in reader.scan():
        assert reader.read(entry.locator) == (tiles / entry.path).read_bytes()


def test_folder_fingerprint_follows_the_file(tiles, settings):
    before = {e.path: e.fingerprint for e in FolderReader(tiles, settings).scan()}
    changed = tiles / "case1" / "slide1" / "tile_001.png"
    changed.write_bytes(changed.read_bytes() + b"\0")
    after = {e.path: e.fingerprint for e in FolderReader(tiles, settings).scan()}
    assert {p for p in before if before[p] != after[p]} == {"case1/slide1/tile_001.png"}


def test_folder_refuses_links_out_of_the_tree(tmp_path, tiles, settings):
    outside = tmp_path / "outside"
    make_tiles(outside, 2)
    os.symlink(outside, tiles / "escape")
    os.symlink(outside / "case0" / "slide0" / "tile_000.jpg", tiles / "leak.jpg")
    os.symlink(tiles / "case0", tiles / "case0_again")  # walked at its own path
    os.symlink(tiles, tiles / "case1" / "loop")
    os.symlink(tiles / "case1" / "slide1" / "tile_001.png", tiles / "alias.png")  # inside: read
    os.symlink(tiles / "missing.png", tiles / "broken.png")
    os.mkfifo(tiles / "pipe.png")
    entries, skipped = split(FolderReader(tiles, settings).scan())
    reasons = {s.path: s.reason for s in skipped}
    assert set(reasons) == {"escape", "leak.jpg", "case0_again", "case1/loop", "broken.png", "pipe.png"}
    assert "outside the input folder" in reasons["escape"]
    assert "outside the input folder" in reasons["leak.jpg"]
    assert "walked at its own path" in reasons["case1/loop"]
    assert "not a regular file" in reasons["pipe.png"]
    assert {e.path for e in entries} == {p.relative_to(tiles).as_posix() for p in tiles.rglob("tile_*")} | {"alias.png"}


def test_folder_symlink_loop_is_recorded_and_the_scan_goes_on(tiles, settings):
    os.symlink("b_loop.png", tiles / "a_loop.png")
    os.symlink("a_loop.png", tiles / "b_loop.png")
    os.symlink("self", tiles / "case0" / "self")
    entries, skipped = split(FolderReader(tiles, settings).scan())
    assert {s.path: s.reason for s in skipped} == {
        "a_loop.png": "symbolic link loop: not followed",
        "b_loop.png": "symbolic link loop: not followed",
        "case0/self": "symbolic link loop: not followed",
    }
    # Every tile sorted after the loops is still listed.
    assert {e.path for e in entries} == {p.relative_to(tiles).as_posix() for p in tiles.rglob("tile_*")}


def _big_member(declared: int = 12_000, body: int = 60 << 20) -> bytes:
    """A PNG whose header declares ``declared``^2 RGB pixels, followed by ``body`` bytes of IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", declared, declared, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(body))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "folder"])
def test_a_large_member_is_refused_from_its_header_without_being_read_whole(tmp_path, settings, kind):
    data = _big_member()
    if kind == "folder":
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "big.png").write_bytes(data)
        reader = FolderReader(tmp_path / "in", settings)
    elif kind == "zip":
        reader = ZipReader(make_zip(tmp_path / "big.zip", {"big.png": data}), settings)
    else:
        reader = TarReader(make_tar(tmp_path / f"big.{kind}", {"big.png": data}, gz=kind == "tar.gz"), settings)
    del data
    (entry,) = list(reader.scan())
    tracemalloc.start()
    try:
        with pytest.raises(BadInput, match="big.png: 12000x12000 is too many pixels"):
            reader.read(entry.locator)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        reader.close()
    # The 60 MiB member is refused after its first 64 KiB.
    assert peak < 4 << 20


def test_folder_read_refuses_paths_out_of_the_tree(tmp_path, tiles, settings):
    (tmp_path / "secret.png").write_bytes(b"secret")
    reader = FolderReader(tiles, settings)
    for locator in ("../secret.png", str(tmp_path / "secret.png")):
        with pytest.raises(BadInput, match="secret.png"):
            reader.read(locator)
    with pytest.raises(BadInput, match="nope.png: cannot read"):
        reader.read("nope.png")


# Zip


def test_zip_lists_and_reads_every_tile(tiles, settings, tmp_path):
    files = files_under(tiles)
    files["readme.txt"] = b"not a tile"
    archive = make_zip(tmp_path / "tiles.zip", files)
    reader = open_reader(archive, settings)
    assert isinstance(reader, ZipReader)
    entries, skipped = split(reader.scan())
    assert skipped == []
    assert [e.path for e in entries] == sorted(p for p in files if p != "readme.txt")
    for entry in entries:
        assert reader.read(entry.locator) == files[entry.path].read_bytes()
        crc, size = entry.fingerprint.split(":")
        assert int(size) == files[entry.path].stat().st_size
    reader.close()


def test_zip_refuses_hostile_members(tmp_path, settings):
    expected = make_hostile_zip(tmp_path / "hostile.zip")
    reader = ZipReader(tmp_path / "hostile.zip", settings)
    entries, skipped = split(reader.scan())
    assert [e.path for e in entries] == ["good.png"]
    assert {s.path for s in skipped} == set(expected)
    for s in skipped:
        assert expected[s.path] in s.reason
    for name in ("../evil.png", "link.png"):
        with pytest.raises(BadInput, match="hostile.zip"):
            reader.read(name)


def test_zip_refuses_oversized_members_and_slides(tmp_path):
    settings = load_settings(max_image_pixels=16)  # byte limit: 64 B + 1 MiB
    archive = make_zip(tmp_path / "big.zip", {"big.png": bytes(2 << 20), "s.svs": b"x", "ok.png": b"png"})
    entries, skipped = split(ZipReader(archive, settings).scan())
    assert [e.path for e in entries] == ["ok.png"]
    reasons = {s.path: s.reason for s in skipped}
    assert "too large" in reasons["big.png"]
    assert "whole-slide" in reasons["s.svs"]


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_an_archive_inside_an_archive_is_recorded(tmp_path, settings, kind):
    inner = make_zip(tmp_path / "inner.zip", {"t.png": image_bytes(make_image(16), "png")})
    members = {"a/inner.zip": inner, "b/inner.tar.gz": b"x", "c/inner.tgz": b"x", "d/inner.tar": b"x"}
    members["ok.png"] = image_bytes(make_image(16), "png")
    if kind == "zip":
        reader = ZipReader(make_zip(tmp_path / "outer.zip", members), settings)
    else:
        reader = TarReader(make_tar(tmp_path / f"outer.{kind}", members, gz=kind == "tar.gz"), settings)
    entries, skipped = split(reader.scan())
    assert [e.path for e in entries] == ["ok.png"]
    assert {s.path for s in skipped} == {"a/inner.zip", "b/inner.tar.gz", "c/inner.tgz", "d/inner.tar"}
    assert {s.reason for s in skipped} == {"archives inside archives are not read: extract it and index it on its own"}


def test_zip_that_is_not_one(tmp_path, settings):
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(BadInput, match="fake.zip: not a zip archive"):
        open_reader(fake, settings)


# Tar, tar.gz


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz"])
def test_tar_lists_and_reads_every_tile(tiles, settings, tmp_path, suffix):
    files = files_under(tiles)
    archive = make_tar(tmp_path / f"tiles{suffix}", files, gz=suffix != ".tar")
    reader = open_reader(archive, settings)
    assert isinstance(reader, TarReader)
    entries, skipped = split(reader.scan())
    assert skipped == []
    assert [e.path for e in entries] == sorted(files)
    # Out of order, so that gzip has to seek backwards.
    shuffled = entries[:]
    random.Random(0).shuffle(shuffled)
    for entry in shuffled:
        assert reader.read(entry.locator) == files[entry.path].read_bytes()
        assert entry.fingerprint == f"{files[entry.path].stat().st_size}:1700000000"
    with pytest.raises(BadInput, match="no such member"):
        reader.read("absent.png")


@pytest.mark.parametrize("gz", [False, True])
def test_tar_refuses_hostile_members(tmp_path, settings, gz):
    expected = make_hostile_tar(tmp_path / "hostile.tar", gz=gz)
    reader = TarReader(tmp_path / "hostile.tar", settings)
    entries, skipped = split(reader.scan())
    assert [e.path for e in entries] == ["good.png"]
    assert {s.path for s in skipped} == set(expected)
    for s in skipped:
        assert expected[s.path] in s.reason
    for name in ("../evil.png", "link.png", "hard.png"):
        with pytest.raises(BadInput, match="hostile.tar"):
            reader.read(name)
    assert reader.read("good.png")[:4] == b"\x89PNG"


def test_truncated_tar_keeps_what_is_whole(tmp_path, settings):
    files = {f"t{i}.png": image_bytes(make_image(64, i), "png") for i in range(4)}
    whole = make_tar(tmp_path / "whole.tar", files)
    with tarfile.open(whole) as archive:
        cut_at = archive.getmember("t2.png").offset_data + 100
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:cut_at])
    reader = TarReader(cut, settings)
    entries, skipped = split(reader.scan())
    assert [e.path for e in entries] == ["t0.png", "t1.png"]
    assert skipped[1] == Skipped("t2.png", "member data cut short: the archive is truncated")
    assert skipped[0].path == "cut.tar"
    assert "unreadable after member 't2.png'" in skipped[0].reason
    assert reader.read("t1.png") == files["t1.png"]
    with pytest.raises(BadInput, match="cut.tar:t2.png: .*truncated"):
        reader.read("t2.png")


def test_truncated_tar_gz_keeps_what_is_whole(tmp_path, settings):
    files = {f"t{i}.png": image_bytes(make_image(64, i), "png") for i in range(4)}
    whole = make_tar(tmp_path / "whole.tar.gz", files, gz=True).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) * 3 // 4])
    entries, skipped = split(TarReader(cut, settings).scan())
    assert 1 <= len(entries) < 4
    assert [e.path for e in entries] == sorted(files)[: len(entries)]
    assert len(skipped) == 1
    assert skipped[0].path == "cut.tar.gz"
    assert "later members lost" in skipped[0].reason


# WebDataset


def test_webdataset_sidecars_become_metadata(tmp_path, settings):
    keys = make_wds_shard(tmp_path / "shard-000000.tar", 5)
    reader = open_reader(tmp_path / "shard-000000.tar", settings)
    entries, skipped = split(reader.scan())
    assert skipped == []
    assert [e.path for e in entries] == [f"{k}.jpg" for k in keys]
    for i, entry in enumerate(entries):
        sidecar = wds_sidecar(i)
        assert entry.meta == {
            "label": sidecar["label"],
            "case_id": sidecar["case_id"],
            "score": json.dumps(sidecar["score"]),
            "cls": str(i % 3),
        }
        assert reader.read(entry.locator)[:3] == b"\xff\xd8\xff"


def test_webdataset_bad_sidecar_is_skipped_not_fatal(tmp_path, settings):
    jpg = image_bytes(make_image(16), "jpg")
    files = {
        "a/k1.jpg": jpg,
        "a/k1.json": b"{not json",
        "a/k2.jpg": jpg,
        "a/k2.seg.png": image_bytes(make_image(16), "png"),
        "a/k2.txt": b"  a caption \n",
        "a/k2.json": b'{"tags": ["x", "y"], "n": null}',
        "a/k3.jpg": jpg,
        "a/k3.json": b"[1, 2]",
    }
    entries, skipped = split(TarReader(make_tar(tmp_path / "s.tar", files), settings).scan())
    meta = {e.path: e.meta for e in entries}
    assert meta == {
        "a/k1.jpg": {},
        "a/k2.jpg": {"txt": "a caption", "tags": '["x", "y"]'},
        "a/k2.seg.png": {"txt": "a caption", "tags": '["x", "y"]'},
        "a/k3.jpg": {"json": "[1, 2]"},
    }
    assert [s.path for s in skipped] == ["a/k1.json"]


@pytest.mark.parametrize(
    ("path", "key"),
    [("a/b.seg.png", ("a/b", "seg.png")), ("x.jpg", ("x", "jpg")), ("d.e/f.cls", ("d.e/f", "cls"))],
)
def test_sample_key(path, key):
    assert sample_key(path) == key


# Factory and processes


def test_open_reader_names_what_it_accepts(tmp_path, settings):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "one.png").write_bytes(image_bytes(make_image(16), "png"))
    with pytest.raises(BadInput, match=r"notes.txt: not an input .*\.zip.*\.tar.*\.svs"):
        open_reader(tmp_path / "notes.txt", settings)
    with pytest.raises(BadInput, match="one.png: a single tile image"):
        open_reader(tmp_path / "one.png", settings)
    with pytest.raises(BadInput, match="absent.zip: no such file"):
        open_reader(tmp_path / "absent.zip", settings)
    (tmp_path / "bad.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(BadInput, match="bad.tar.gz: not a tar archive"):
        open_reader(tmp_path / "bad.tar.gz", settings)
    assert isinstance(open_reader(tmp_path, settings), FolderReader)


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "folder"])
def test_readers_pickle_and_reopen_in_forked_workers(tmp_path, tiles, settings, kind):
    files = files_under(tiles)
    if kind == "zip":
        reader = ZipReader(make_zip(tmp_path / "t.zip", files), settings)
    elif kind == "tar.gz":
        reader = TarReader(make_tar(tmp_path / "t.tar.gz", files, gz=True), settings)
    else:
        reader = FolderReader(tiles, settings)
    locators = [e.locator for e in reader.scan()]
    reader.read(locators[-1])  # the parent holds an open handle now
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read(locators[0]) == files[locators[0]].read_bytes()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.starmap(_read_in_child, [(reader, loc) for loc in locators])
    assert results == [files[loc].read_bytes() for loc in locators]
    # Inherited through fork without pickling: the child must not use the parent's open handle.
    child = multiprocessing.get_context("fork").Process(
        target=_read_to_file, args=(reader, locators[0], tmp_path / "child.bin")
    )
    child.start()
    child.join()
    assert child.exitcode == 0
    assert (tmp_path / "child.bin").read_bytes() == files[locators[0]].read_bytes()
    assert reader.read(locators[1]) == files[locators[1]].read_bytes()
    reader.close()


def test_tar_reads_in_scan_order_do_not_rescan(tmp_path, tiles, settings):
    files = files_under(tiles)
    reader = TarReader(make_tar(tmp_path / "t.tar", files), settings)
    first = next(iter(reader.scan()))
    reader.read(first.locator)
    # Only the members up to the one asked for have been indexed.
    assert len(reader._handle("tar", reader._open)._members) == 1
    assert isinstance(reader._handle("tar", reader._open).archive, tarfile.TarFile)


def test_a_forked_child_opens_its_own_handles(tmp_path, tiles, settings):
    files = files_under(tiles)
    reader = ZipReader(make_zip(tmp_path / "t.zip", files), settings)
    locator = next(iter(files))
    reader.read(locator)
    parents = reader._handles["zip"]
    reader._pid = -1  # what a forked child sees: the pid the handles were opened in is not its own
    assert reader.read(locator) == files[locator].read_bytes()
    assert reader._handles["zip"] is not parents
    assert parents.fp is not None  # the parent's handle is left alone, not closed
