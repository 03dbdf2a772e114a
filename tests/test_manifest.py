import pytest

from indexer.manifest import Manifest, identity
from search.core.errors import BadInput, ConfigError
from search.core.settings import Settings

PATTERN = Settings.model_fields["path_pattern"].default


def write(tmp_path, text, name="manifest.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def manifest(tmp_path):
    return Manifest.load(
        write(
            tmp_path,
            "path,case_id,slide_id,Diagnosis\n"
            "caseA/slide1/tile_000.png,A,S1,tumour\n"
            "slides/TCGA-01.svs,TCGA-P1,,normal\n"
            "bare-stem,B,S9,\n"
            "caseC/slide3,C,S3,necrosis\n"
            "x/dup.png,D1,,\n"
            "y/dup.png,D2,,\n",
        )
    )


def test_lookup_by_path_then_name_then_stem_then_folder(manifest):
    assert manifest.lookup("caseA/slide1/tile_000.png") == {
        "case_id": "A",
        "slide_id": "S1",
        "diagnosis": "tumour",
    }
    assert manifest.lookup("./caseA/slide1/tile_000.png")["case_id"] == "A"
    # The slide is elsewhere in this archive: matched by file name.
    assert manifest.lookup("other/TCGA-01.svs") == {"case_id": "TCGA-P1", "diagnosis": "normal"}
    assert manifest.lookup("deep/bare-stem.ndpi") == {"case_id": "B", "slide_id": "S9"}
    # Tiles of a folder listed in the manifest.
    assert manifest.lookup("caseC/slide3/tile_042.jpg")["slide_id"] == "S3"
    assert manifest.lookup("elsewhere/slide3/t.jpg")["slide_id"] == "S3"
    assert manifest.lookup("nowhere/t.png") == {}
    assert len(manifest) == 6


def test_an_ambiguous_name_matches_only_by_full_path(manifest):
    assert manifest.lookup("z/dup.png") == {}
    assert manifest.lookup("y/dup.png") == {"case_id": "D2"}


def test_lookup_returns_a_copy(manifest):
    manifest.lookup("caseA/slide1/tile_000.png").clear()
    assert manifest.lookup("caseA/slide1/tile_000.png")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("m.csv", "\ufeffFile , Case_ID\nslide.svs,P1\n"),
        ("m.tsv", "slide\tcase_id\nslide.svs\tP1\n"),
        ("m.csv", 'filename,case_id\n"slide.svs","P1"\n\n'),
    ],
)
def test_key_column_names_and_formats(tmp_path, name, text):
    assert Manifest.load(write(tmp_path, text, name)).lookup("slide.svs") == {"case_id": "P1"}


def test_a_manifest_keyed_by_slide_id_or_case_id_names_the_key_it_used(tmp_path):
    by_slide = Manifest.load(write(tmp_path, "slide_id,case_id,grade\nslide1,P1,3\nTCGA-01,P2,4\n"))
    assert by_slide.key == "slide_id"
    assert identity("caseA/slide1/tile_000.png", by_slide, PATTERN) == ("P1", "slide1", {"grade": "3"})
    assert identity("TCGA-01.svs", by_slide, PATTERN) == ("P2", "TCGA-01", {"grade": "4"})
    by_case = Manifest.load(write(tmp_path, "Case_ID,diagnosis\ncaseA,tumour\n", "cases.csv"))
    assert by_case.key == "case_id"
    assert identity("caseA/slide1/tile_000.png", by_case, PATTERN) == ("caseA", "slide1", {"diagnosis": "tumour"})
    assert Manifest.load(write(tmp_path, "path,slide_id\na.png,S\n", "p.csv")).key == "path"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("case,diagnosis\nA,S\n", "line 1: no key column; name one of path, file, slide, filename, slide_id, case_id"),
        ("path,case_id\na.png,A\nb.png,B,extra\n", "line 3: 3 fields where the header has 2"),
        ("path,case_id\na.png,A\n,B\n", "line 3: empty 'path'"),
        ("path,case_id\na.png,A\nb.png,B\n./a.png,C\n", "line 4: 'a.png' is already on line 2"),
        ("path,case,case\na.png,A,B\n", "line 1: empty or repeated column names"),
        ('path,case_id\na.png,"A\n', "line 2: bad CSV"),
        ('path,note\na.png,"two\nlines"\nb.png,x,y\n', "line 4: 3 fields"),
    ],
)
def test_bad_manifests_name_the_file_and_line(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(BadInput, match=f"manifest {path}.*{message}"):
        Manifest.load(path)


def test_missing_or_binary_manifest(tmp_path):
    with pytest.raises(BadInput, match="absent.csv: no such file"):
        Manifest.load(tmp_path / "absent.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BadInput, match="bin.csv: cannot read it as UTF-8"):
        Manifest.load(tmp_path / "bin.csv")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("caseX/slideY/tile.png", ("caseX", "slideY")),
        ("slideY/tile.png", (None, "slideY")),
        ("root/caseX/slideY/tile.png", ("caseX", "slideY")),
        ("tile.png", (None, None)),
        # A slide file stands where the folder of its tiles would.
        ("caseX/S1.svs", ("caseX", "S1")),
        ("S1.svs", (None, "S1")),
        ("a/caseX/S1.ndpi", ("caseX", "S1")),
    ],
)
def test_identity_from_the_path_pattern(path, expected):
    assert identity(path, None, PATTERN) == (*expected, {})


def test_identity_of_a_pyramidal_tiff_needs_the_slide_flag():
    assert identity("caseX/S1.tif", None, PATTERN) == (None, "caseX", {})
    assert identity("caseX/S1.tif", None, PATTERN, slide=True) == ("caseX", "S1", {})


def test_identity_manifest_first_pattern_fills_the_rest(manifest):
    assert identity("caseA/slide1/tile_000.png", manifest, PATTERN) == ("A", "S1", {"diagnosis": "tumour"})
    # slide_id left empty in the manifest: the slide file's stem.
    assert identity("slides/TCGA-01.svs", manifest, PATTERN) == ("TCGA-P1", "TCGA-01", {"diagnosis": "normal"})
    # case_id from the manifest, slide_id from the path.
    assert identity("x/dup.png", manifest, PATTERN) == ("D1", "x", {})
    assert identity("caseZ/slideZ/t.png", manifest, PATTERN) == ("caseZ", "slideZ", {})


def test_identity_with_a_custom_pattern():
    pattern = r"(?P<case_id>TCGA-\w\w-\w{4})-(?P<slide_id>\d\d)"
    assert identity("batch1/TCGA-AB-1234-01/t.png", None, pattern) == ("TCGA-AB-1234", "01", {})
    assert identity("other/t.png", None, pattern) == (None, None, {})
    with pytest.raises(ConfigError, match="path_pattern"):
        identity("a/b.png", None, "(?P<case_id>")


def test_mpp_or_magnification_columns_give_the_tile_scale(tmp_path):
    from indexer.manifest import manifest_mpp

    m = Manifest.load(write(tmp_path, "path,mpp,magnification\na.png,0.3,\nb.png,,20x\nc.png,,40\nd.png,,\n"))
    scales = {}
    for name in ("a.png", "b.png", "c.png", "d.png"):
        _, _, extra = identity(name, m, PATTERN)
        scales[name] = manifest_mpp(extra)
        assert "mpp" not in extra  # the scale is a tile column, not metadata
    assert scales == {"a.png": 0.3, "b.png": 0.5, "c.png": 0.25, "d.png": None}
    with pytest.raises(BadInput, match=r"line 2: magnification 'high' is not a positive number"):
        Manifest.load(write(tmp_path, "path,magnification\na.png,high\n", "bad.csv"))
    with pytest.raises(BadInput, match=r"line 3: mpp '-1' is not a positive number"):
        Manifest.load(write(tmp_path, "path,mpp\na.png,0.5\nb.png,-1\n", "bad2.csv"))
