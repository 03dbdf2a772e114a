import multiprocessing
import pickle

import numpy as np
import openslide
import pytest
import tifffile

from search.archives.readers import FolderReader, Skipped, SlideReader, TileEntry, open_reader
from search.archives.readers.base import SlideInfo
from search.archives.readers.slide import otsu_threshold, parse_locator, plan_tiles, tissue_from_rgb
from search.core.errors import BadInput
from search.core.settings import load_settings
from tests.archives import LABEL_RGB, MACRO_RGB, TISSUE_RGB, image_bytes, make_image, make_slide, make_svs_with_label

TISSUE = (512, 768, 1280, 1280)  # x0, y0, x1, y1 in level-0 pixels of the 2048 px, 0.25 um/px slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return make_slide(tmp_path_factory.mktemp("slides") / "s.tif", tissue=TISSUE)


@pytest.fixture(scope="module")
def bare_slide(tmp_path_factory):
    return make_slide(tmp_path_factory.mktemp("bare") / "bare.tif", mpp=None, tissue=TISSUE)


def settings(**kw):
    return load_settings(**{"tile_size": 64, **kw})


def tiles_of(reader):
    found = list(reader.scan())
    assert not [e for e in found if isinstance(e, Skipped)]
    return found


def grid_inside(step, tissue=TISSUE):
    x0, y0, x1, y1 = tissue
    return {(x, y) for x in range(x0, x1, step) for y in range(y0, y1, step)}


def test_the_test_slide_is_a_pyramid_openslide_reads(slide):
    assert openslide.OpenSlide.detect_format(str(slide)) == "generic-tiff"
    with openslide.OpenSlide(str(slide)) as s:
        assert s.level_dimensions == ((2048, 2048), (1024, 1024), (512, 512))
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)


def test_tiles_cover_exactly_the_tissue(slide):
    reader = open_reader(slide, settings(target_mpp=0.5))
    assert isinstance(reader, SlideReader)
    entries = tiles_of(reader)
    # 0.5 um/px from a 0.25 um/px slide: level 1 (0.5 um/px), 64 px there, 128 px at level 0.
    assert {(e.x, e.y) for e in entries} == grid_inside(128)
    assert len(entries) == 24
    for e in entries:
        assert (e.level, e.size, e.mpp) == (1, 64, pytest.approx(0.5))
        assert e.path == e.slide_path == "s.tif"
        assert e.locator == f"s.tif@L1:{e.x},{e.y}:64"
        assert e.fingerprint.endswith(f":L1:{e.x},{e.y}:64")
        assert e.slide_info == SlideInfo(width=2048, height=2048, mpp=0.25)
    assert [(e.y, e.x) for e in entries] == sorted((e.y, e.x) for e in entries)


@pytest.mark.parametrize(
    ("target", "level", "size", "step"),
    [(0.25, 0, 64, 64), (1.0, 2, 64, 256), (0.75, 1, 96, 192), (2.0, 2, 128, 512)],
)
def test_tiles_come_from_the_coarsest_level_fine_enough(slide, target, level, size, step):
    entries = tiles_of(SlideReader(slide, settings(target_mpp=target)))
    assert {(e.level, e.size) for e in entries} == {(level, size)}
    assert all(e.mpp == pytest.approx(target) for e in entries)
    # Keep cells whose overlap with the tissue rectangle is at least the default 25 %.
    x0, y0, x1, y1 = TISSUE
    expected = set()
    for gx in range(0, 2048, step):
        for gy in range(0, 2048, step):
            overlap_x = max(0, min(gx + step, x1) - max(gx, x0))
            overlap_y = max(0, min(gy + step, y1) - max(gy, y0))
            if overlap_x * overlap_y >= 0.25 * step * step:
                expected.add((gx, gy))
    assert {(e.x, e.y) for e in entries} == expected


def test_a_finer_target_than_the_scan_upsamples_level_0(slide):
    with openslide.OpenSlide(str(slide)) as s:
        plan = plan_tiles(s, tile_size=64, target_mpp=0.1)
    assert (plan.level, plan.size) == (0, 26)
    assert plan.mpp == pytest.approx(26 * 0.25 / 64)


def test_read_returns_a_tile_size_rgb_image_of_the_tissue(slide):
    for target in (0.5, 0.75):
        reader = SlideReader(slide, settings(target_mpp=target))
        x0, y0, x1, y1 = TISSUE
        entry = next(
            e for e in reader.scan() if x0 <= e.x and e.x + 2 * e.size <= x1 and y0 <= e.y and e.y + 2 * e.size <= y1
        )
        tile = reader.read(entry.locator)
        assert tile.size == (64, 64) and tile.mode == "RGB"
        mean = np.asarray(tile).reshape(-1, 3).mean(axis=0)
        assert np.abs(mean - np.array(TISSUE_RGB)).max() < 8


def test_read_past_the_edge_is_white_glass(slide):
    reader = SlideReader(slide, settings())
    tile = np.asarray(reader.read("s.tif@L0:2016,2016:64"))
    assert (tile[40:, 40:] == 255).all()  # beyond the slide
    assert (tile[:30, :30] == 250).all()  # the slide's own background


def test_read_refuses_foreign_locators(slide):
    reader = SlideReader(slide, settings())
    for locator in ("other.svs@L0:0,0:64", "s.tif", "s.tif@L7:0,0:64"):
        with pytest.raises(BadInput, match="s.tif|other.svs"):
            reader.read(locator)


def test_tissue_min_fraction_zero_keeps_the_whole_grid(slide):
    entries = tiles_of(SlideReader(slide, settings(target_mpp=0.5, tissue_min_fraction=0)))
    assert len(entries) == 16 * 16


def test_a_slide_without_mpp_is_tiled_at_level_0(bare_slide):
    with openslide.OpenSlide(str(bare_slide)) as s:
        assert openslide.PROPERTY_NAME_MPP_X not in s.properties
    entries = tiles_of(open_reader(bare_slide, settings(target_mpp=0.5)))
    assert {(e.level, e.size, e.mpp) for e in entries} == {(0, 64, None)}
    assert {e.slide_info for e in entries} == {SlideInfo(width=2048, height=2048, mpp=None)}
    assert {(e.x, e.y) for e in entries} == grid_inside(64)


def test_otsu_splits_two_populations():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(40, 8, 5000), rng.normal(180, 10, 3000)]).clip(0, 255).astype(np.uint8)
    threshold = otsu_threshold(values)
    assert values[:5000].max() <= threshold < values[5000:].min()
    assert otsu_threshold(np.full(100, 7, dtype=np.uint8)) <= 7


def test_blank_glass_has_no_tissue():
    rng = np.random.default_rng(0)
    glass = (245 + rng.normal(0, 3, size=(64, 64, 3))).clip(0, 255).astype(np.uint8)
    assert not tissue_from_rgb(glass).any()
    glass[10:20, 10:30] = TISSUE_RGB
    assert tissue_from_rgb(glass).sum() == 200


def test_a_folder_tiles_the_slides_it_holds(tmp_path, slide):
    root = tmp_path / "input"
    (root / "case1").mkdir(parents=True)
    (root / "case1" / "s.tif").write_bytes(slide.read_bytes())
    (root / "case1" / "tile.tif").write_bytes(image_bytes(make_image(32), "tif"))
    # A single-level tiled TIFF is one tile, not a slide.
    tifffile.imwrite(root / "case1" / "tiled.tif", np.asarray(make_image(64)), tile=(16, 16))
    (root / "broken.svs").write_bytes(b"not a slide")
    reader = FolderReader(root, settings(target_mpp=0.5))
    found = list(reader.scan())
    skipped = [e for e in found if isinstance(e, Skipped)]
    entries = [e for e in found if isinstance(e, TileEntry)]
    assert [s.path for s in skipped] == ["broken.svs"]
    assert "OpenSlide" in skipped[0].reason
    assert {e.path for e in entries if e.slide_path is None} == {"case1/tile.tif", "case1/tiled.tif"}
    slide_tiles = [e for e in entries if e.slide_path is not None]
    assert {(e.x, e.y) for e in slide_tiles} == grid_inside(128)
    assert {e.path for e in slide_tiles} == {"case1/s.tif"}
    assert {e.slide_info for e in slide_tiles} == {SlideInfo(width=2048, height=2048, mpp=0.25)}
    assert all(e.slide_info is None for e in entries if e.slide_path is None)
    locator = slide_tiles[0].locator
    assert parse_locator(locator).slide == "case1/s.tif"
    assert reader.read(locator).size == (64, 64)
    assert reader.read("case1/tile.tif") == (root / "case1" / "tile.tif").read_bytes()


def test_open_reader_refuses_what_openslide_cannot_read(tmp_path):
    (tmp_path / "broken.svs").write_bytes(b"not a slide")
    with pytest.raises(BadInput, match="broken.svs: OpenSlide does not recognise"):
        open_reader(tmp_path / "broken.svs", settings())
    (tmp_path / "tile.tif").write_bytes(image_bytes(make_image(32), "tif"))
    with pytest.raises(BadInput, match="tile.tif: a single tile image"):
        open_reader(tmp_path / "tile.tif", settings())


def _read_to_file(reader, locator, out):
    out.write_bytes(reader.read(locator).tobytes())


def test_slide_reader_pickles_and_reads_in_a_forked_child(tmp_path, slide):
    reader = SlideReader(slide, settings())
    locator = next(iter(reader.scan())).locator
    expected = reader.read(locator).tobytes()  # the parent holds an open slide now
    assert pickle.loads(pickle.dumps(reader)).read(locator).tobytes() == expected
    child = multiprocessing.get_context("fork").Process(
        target=_read_to_file, args=(reader, locator, tmp_path / "tile.bin")
    )
    child.start()
    child.join()
    assert child.exitcode == 0
    assert (tmp_path / "tile.bin").read_bytes() == expected
    reader.close()


def test_grid_covers_partial_edge_tiles(tmp_path):
    # 1000 px is not a multiple of the 128 px pitch: the last cell sticks out past the edge, and
    # its tissue (104 x 104 px) fills 66 % of it, the part past the edge counting as glass.
    path = make_slide(tmp_path / "odd.tif", size=1000, tissue=(896, 896, 1000, 1000), levels=2)
    kept = tiles_of(SlideReader(path, settings(target_mpp=0.5, tissue_min_fraction=0.6)))
    assert [(e.x, e.y) for e in kept] == [(896, 896)]
    assert tiles_of(SlideReader(path, settings(target_mpp=0.5, tissue_min_fraction=0.7))) == []


def test_label_and_macro_images_are_never_read(tmp_path, monkeypatch):
    # Label and macro images hold patient names and barcodes: the reader tiles the pyramid levels only.
    path = make_svs_with_label(tmp_path / "patient.svs")
    with openslide.OpenSlide(str(path)) as s:
        assert openslide.OpenSlide.detect_format(str(path)) == "aperio"
        assert {"label", "macro"} <= set(s.associated_images)
        assert tuple(np.asarray(s.associated_images["label"].convert("RGB"))[0, 0]) == LABEL_RGB

    def refuse(self):
        raise AssertionError("an associated image (label/macro) was read")

    monkeypatch.setattr(openslide.OpenSlide, "associated_images", property(refuse))
    reader = open_reader(path, settings(target_mpp=0.5))
    entries = tiles_of(reader)
    assert entries and all(e.mpp == pytest.approx(0.5) for e in entries)
    for entry in entries:
        pixels = np.asarray(reader.read(entry.locator).convert("RGB")).reshape(-1, 3)
        for colour in (LABEL_RGB, MACRO_RGB):
            assert not (np.abs(pixels.astype(int) - colour).sum(axis=1) < 30).any(), entry.locator
