"""Index builds of segments: incremental add and delete, retrain, merge, crash recovery, exact re-rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer import build
from search.core.settings import load_settings
from search.storage import build_writer, segmented
from search.storage.index_directory import IndexDirectory
from search.storage.index_types import default_nprobe
from search.storage.live import LiveIndex
from search.storage.segmented import SegmentedIndex
from search.storage.store import Store
from search.storage.vectors import VectorIndex
from tests.store_fixture import tile_row

DIM = 16


def unit_vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Archive:
    """A store with tiles of synthetic vectors and the index published from it."""

    def __init__(self, tmp_path: Path, **settings: object) -> None:
        self.settings = load_settings(data_dir=tmp_path / "data", device="cpu", **settings)
        self.store = Store(self.settings.db_url)
        self.source = self.store.get_or_create_source("folder", "/archive")
        self.directory = IndexDirectory(self.settings.data_dir / "index")
        self.added = 0

    def add(self, n: int, seed: int) -> list[int]:
        rows = [tile_row(self.source, f"t{self.added + i}") for i in range(n)]
        self.added += n
        return self.store.add_tiles(rows, unit_vectors(n, seed), "m1")

    def publish(self, retrain: bool = False) -> dict | None:
        return build.publish(self.store, self.directory, "m1", self.settings, retrain=retrain)

    def live(self) -> SegmentedIndex:
        folder = self.directory.build_dir(self.directory.live_build_id())
        return SegmentedIndex.load(folder, "cpu", stored=self.store.find_embeddings, located=self.store.read_located)

    def exact(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.store.embedded_ids("m1")
        scores = queries @ self.store.get_embeddings(ids.tolist(), "m1").T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), ids[order]


@pytest.fixture
def archive(tmp_path: Path):
    archive = Archive(tmp_path)
    yield archive
    archive.store.close()


def test_new_tiles_go_into_a_new_part_and_removed_ones_are_deleted_by_id(archive: Archive, monkeypatch) -> None:
    first = archive.add(300, seed=1)
    archive.publish()
    archive.add(40, seed=2)
    archive.publish()
    index = archive.live()
    assert len(index.manifest.parts) == 2 and index.ntotal == 340
    # The second build reuses the first one's files: hard links, not copies.
    one, two = archive.directory.build_dir(1), archive.directory.build_dir(2)
    assert (two / "part-1.faiss").stat().st_ino == (one / "part-1.faiss").stat().st_ino

    gone = first[:30]
    queries = archive.store.get_embeddings(gone[:10], "m1")  # each deleted tile's own vector: it would come first
    archive.store.delete_tiles(gone)
    archive.publish()
    index = archive.live()
    assert index.ntotal == 310 and index.manifest.deleted == 30
    assert not set(index.ids.tolist()) & set(gone)
    scores, ids = index.search(queries, 5)
    assert not np.isin(ids, gone).any() and (ids >= 0).all()
    expected_scores, expected_ids = archive.exact(queries, 5)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-6)
    # Past the deepest over-fetch, the part is searched with its live ids as a filter: same answers.
    monkeypatch.setattr(segmented, "_MAX_FETCH", 4)
    np.testing.assert_array_equal(index.search(queries, 5)[1], expected_ids)
    # Filters never bring a deleted tile back, and count only live ones.
    _, ids = index.search(queries[:1], 50, allowed=np.asarray(first[:40]))
    assert sorted(ids[0][ids[0] >= 0].tolist()) == sorted(first[30:40])


def test_a_part_whose_probed_lists_run_out_is_not_searched_again_by_every_live_id(tmp_path: Path) -> None:
    # Random 16-d vectors at the default nprobe: a poor IVF, whose probed lists hold few vectors.
    archive = Archive(tmp_path, index_type="ivf", min_recall=0.0, target_recall=0)
    ids = archive.add(6000, seed=3)
    archive.publish()
    archive.store.delete_tiles(ids[:900])
    archive.publish()
    index = archive.live()
    part = index.parts[0]
    calls = []
    search = part.search
    part.search = lambda queries, k, allowed=None: calls.append(allowed) or search(queries, k, allowed)
    # More than the probed lists hold: the search answers from them, as a part without deletions would.
    scores, found = index.search(unit_vectors(1, seed=5), 600)
    assert all(allowed is None for allowed in calls) and len(calls) == 1
    live = found[0][found[0] >= 0]
    assert 0 < len(live) < 600 and not set(live.tolist()) & set(ids[:900])
    archive.store.close()


def test_parts_merge_into_one_exactly_like_a_single_index(archive: Archive) -> None:
    for seed in range(5):
        archive.add(60, seed=seed)
        archive.publish()
    index = archive.live()
    assert len(index.manifest.parts) == 5
    queries = unit_vectors(20, seed=99)
    single = VectorIndex.build(index.ids, archive.store.get_embeddings(index.ids.tolist(), "m1"), "flat")
    for k in (1, 7, 300):
        np.testing.assert_array_equal(index.search(queries, k)[1], single.search(queries, k)[1])
        np.testing.assert_allclose(index.search(queries, k)[0], single.search(queries, k)[0], atol=1e-6)
    # Equal scores are ordered by tile id whichever part holds them.
    (twin,) = archive.store.add_tiles([tile_row(archive.source, "twin")], archive.store.get_embeddings([1], "m1"), "m1")
    archive.publish()
    scores, ids = archive.live().search(archive.store.get_embeddings([1], "m1"), 2)
    assert ids[0].tolist() == [1, twin] and scores[0, 0] == scores[0, 1]


def test_too_many_parts_or_deletions_merge_without_training(archive: Archive, monkeypatch) -> None:
    monkeypatch.setattr(build_writer, "MAX_PARTS", 2)
    archive.add(100, seed=1)
    archive.publish()
    archive.add(10, seed=2)
    archive.publish()
    archive.add(10, seed=3)
    archive.publish()
    index = archive.live()
    assert index.manifest.parts == ("part-3.faiss",) and index.ntotal == 120
    archive.store.delete_tiles(index.ids[:50].tolist())
    archive.publish()
    assert archive.live().manifest.deleted == 0 and archive.live().ntotal == 70


def test_the_quantiser_is_trained_once_and_again_past_the_growth_factor(tmp_path: Path) -> None:
    archive = Archive(tmp_path, index_type="ivf", retrain_growth=1.5)
    archive.add(400, seed=1)
    archive.publish()
    trained = archive.directory.build_dir(1) / segmented.TRAINED_NAME
    archive.add(150, seed=2)  # 550 <= 1.5 * 400: added to the trained quantiser
    archive.publish()
    index = archive.live()
    assert index.manifest.trained_count == 400 and len(index.manifest.parts) == 2
    assert (archive.directory.build_dir(2) / segmented.TRAINED_NAME).stat().st_ino == trained.stat().st_ino
    queries = archive.store.get_embeddings([5, 450], "m1")
    assert index.search(queries, 1)[1][:, 0].tolist() == [5, 450]

    archive.add(100, seed=3)  # 650 > 600: trained again, one part
    archive.publish()
    index = archive.live()
    assert index.manifest.trained_count == 650 and index.manifest.parts == ("part-3.faiss",)

    archive.publish(retrain=True)  # on request, with nothing new
    assert archive.live().manifest.parts == ("part-4.faiss",)
    archive.store.close()


def test_crossing_exact_max_changes_the_index_type_with_a_full_build(tmp_path: Path) -> None:
    archive = Archive(tmp_path, exact_max=300)
    archive.add(300, seed=1)
    assert archive.publish()["index_type"] == "flat"
    archive.add(10, seed=2)
    assert archive.publish()["index_type"] == "ivf"
    assert archive.live().manifest.parts == ("part-2.faiss",)
    archive.store.close()


@pytest.fixture
def archive_ivfsq8(tmp_path: Path):
    archive = Archive(tmp_path, compress_above=1000)
    yield archive
    archive.store.close()


@pytest.mark.parametrize(
    ("options", "kind"), [({"compress_above": 1000}, "ivfsq8"), ({"index_type": "ivfpq"}, "ivfpq")]
)
def test_compressed_indexes_show_exact_scores_of_thestored_vectors(tmp_path: Path, options: dict, kind: str) -> None:
    archive = Archive(tmp_path, **options)
    archive.add(1200, seed=1)
    assert archive.publish()["index_type"] == kind
    index = archive.live()
    queries = unit_vectors(10, seed=7)
    scores, ids = index.search(queries, 10)
    stored = np.stack([archive.store.get_embeddings(row.tolist(), "m1") for row in ids])
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, stored), rtol=0, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()
    # Without the stored vectors the scores are the PQ approximations, which differ.
    raw = SegmentedIndex.load(archive.directory.build_dir(1), "cpu")
    assert index.exact_scores and not raw.exact_scores  # the engine re-ranks the raw one's pages itself
    raw_scores, raw_ids = raw.search(queries, 10)
    assert np.abs(raw_scores[raw_ids == ids] - scores[raw_ids == ids]).max() > 1e-4
    # The re-ranked answers match exact search on the stored vectors.
    exact_scores, exact_ids = archive.exact(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exact_ids.tolist(), strict=True)])
    assert recall >= 0.9
    archive.store.close()


def test_re_ranks_read_thestored_vectors_where_each_part_recorded_them(archive_ivfsq8: Archive) -> None:
    archive = archive_ivfsq8
    first = archive.add(1200, seed=1)
    archive.publish()
    late = archive.add(60, seed=2)
    archive.publish()
    folder = archive.directory.build_dir(archive.directory.live_build_id())
    assert {p.name for p in folder.glob("*.loc.npy")} == {"part-1.loc.npy", "part-2.loc.npy"}
    queries = archive.store.get_embeddings([first[5], late[3]], "m1")

    def no_database(ids: np.ndarray, fingerprint: str) -> tuple:
        raise AssertionError(f"looked up {len(ids)} stored vectors in the database")

    index = SegmentedIndex.load(folder, "cpu", stored=no_database, located=archive.store.read_located)
    assert index.exact_scores
    exact_scores, exact_ids = archive.exact(queries, 10)
    scores, ids = index.search(queries, 10)
    assert ids[:, 0].tolist() == [first[5], late[3]]
    np.testing.assert_allclose(scores, exact_scores, atol=1e-6)
    # A filter admitting few tiles (across both parts) is scored exactly on all of them.
    allowed = np.array(first[100:140] + late[:10])
    scores, ids = index.search(queries, 5, allowed=allowed)
    stored = archive.store.get_embeddings(allowed.tolist(), "m1")
    truth = np.sort(queries @ stored.T, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(scores, truth, atol=1e-6)
    assert set(ids.ravel().tolist()) <= set(allowed.tolist())
    # A part written before locations were recorded: its vectors come from the database instead.
    (folder / "part-1.loc.npy").unlink()
    looked_up = []

    def database(ids: np.ndarray, fingerprint: str) -> tuple:
        looked_up.extend(ids.tolist())
        return archive.store.find_embeddings(ids.tolist(), fingerprint)

    index = SegmentedIndex.load(folder, "cpu", stored=database, located=archive.store.read_located)
    scores, ids = index.search(queries, 10)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-6)
    assert looked_up and set(looked_up) <= set(first)


def test_a_wide_filter_is_narrowed_in_float16_and_still_answers_the_exact_top_k(archive_ivfsq8: Archive) -> None:
    archive = archive_ivfsq8
    ids = archive.add(3000, seed=4)
    archive.publish()
    index = archive.live()
    allowed = np.array(ids[200:2800])  # past the float16 pre-selection threshold
    queries = np.vstack([unit_vectors(3, seed=9), archive.store.get_embeddings([ids[1000]], "m1")])
    read = []
    exact_read = index.stored_vectors
    index.stored_vectors = lambda chunk: read.append(len(chunk)) or exact_read(chunk)
    scores, found = index.search(queries, 20, allowed=allowed)
    assert 0 < sum(read) < len(allowed) // 4  # only the few near the top were read as float32
    stored = archive.store.get_embeddings(allowed.tolist(), "m1")
    exact = queries @ stored.T
    for row in range(len(queries)):
        order = np.lexsort((allowed, -exact[row]))[:20]
        assert found[row].tolist() == allowed[order].tolist()
        np.testing.assert_allclose(scores[row], exact[row, order], atol=1e-6)


def test_an_incremental_publish_updates_the_recall_answers_without_a_full_scan(
    archive_ivfsq8: Archive, monkeypatch
) -> None:
    from search.storage.build_checks import TRUTH_FILE, RecallTruth

    archive = archive_ivfsq8
    first = archive.add(1500, seed=1)
    archive.publish()
    archive.add(60, seed=2)
    archive.store.delete_tiles(first[:40])
    given = []
    measure = build.measure_recall
    monkeypatch.setattr(build, "measure_recall", lambda *a: given.append(a[-1]) or measure(*a))
    row = archive.publish()
    # The live build's answers, brought up to date, were given: no pass over every stored vector.
    assert row["checks"]["recall_queries"] > 0 and given[0] is not None
    truth = RecallTruth.load(archive.directory.build_file(row["id"], TRUTH_FILE))
    first_truth = RecallTruth.load(archive.directory.build_file(row["id"] - 1, TRUTH_FILE))
    np.testing.assert_array_equal(truth.queries, first_truth.queries)  # the same queries, build to build
    # The updated answers are the exact ones over the new content.
    ids = archive.store.embedded_ids("m1")
    scores = truth.queries @ archive.store.get_embeddings(ids.tolist(), "m1").T
    for row_n in range(len(truth.queries)):
        order = np.argsort(-scores[row_n], kind="stable")[:10]
        assert set(truth.ids[row_n, :10].tolist()) == set(ids[order].tolist())
        np.testing.assert_allclose(truth.scores[row_n, :10], scores[row_n, order], atol=1e-5)


def test_vectors_stored_but_never_published_are_published_by_the_next_run(archive: Archive) -> None:
    archive.add(100, seed=1)
    archive.publish()
    # A run that committed tiles (and their segment rows) and died before its publish.
    late = archive.add(20, seed=2)
    assert archive.live().ntotal == 100
    archive.publish()
    assert set(late) <= set(archive.live().ids.tolist())


def test_a_build_killed_before_its_manifest_is_never_served(archive: Archive) -> None:
    archive.add(100, seed=1)
    archive.publish()
    live = LiveIndex(archive.directory, "cpu", load=lambda b: SegmentedIndex.load(archive.directory.build_dir(b)))
    assert live.get().ntotal == 100
    # A publish that died after writing its part, before the manifest: the folder is there, unfinished.
    archive.add(20, seed=2)
    stale = archive.store.add_build("m1", "flat", 120, "", "cpu")
    folder = archive.directory.build_dir(stale)
    folder.mkdir(parents=True)
    (folder / "part-2.faiss").write_bytes(b"half")
    assert not archive.directory.has_build(stale)
    with pytest.raises(Exception, match="no finished index"):
        archive.directory.publish(stale)
    assert live.get().ntotal == 100
    archive.publish()
    assert live.get().ntotal == 120 and live.build_id == stale + 1


def test_builds_written_before_segments_are_read_and_replaced(archive: Archive) -> None:
    ids = archive.add(50, seed=1)
    vectors = archive.store.get_embeddings(ids, "m1")
    build_id = archive.store.add_build("m1", "flat", 50, "", "cpu")
    VectorIndex.build(np.asarray(ids), vectors, "flat").save(archive.directory.build_path(build_id))
    archive.directory.publish(build_id)
    archive.store.set_build_status(build_id, "live")
    old = archive.live()
    assert old.ntotal == 50 and old.search(vectors[:1], 1)[1][0, 0] == ids[0]
    archive.add(5, seed=2)
    archive.publish()  # no manifest to add to: a full build
    assert archive.live().manifest.parts == (f"part-{build_id + 1}.faiss",) and archive.live().ntotal == 55


def test_a_build_probes_the_fewest_lists_that_reach_the_target_recall(tmp_path: Path) -> None:
    from search.storage.build_checks import TRUTH_FILE, RecallTruth, recall_against

    archive = Archive(tmp_path, index_type="ivf", target_recall=0.9)
    archive.add(3000, seed=1)
    row = archive.publish()
    index = archive.live()
    checks = row["checks"]
    # Recorded with the build and read back by every process that loads it.
    assert index.manifest.nprobe == index.nprobe == checks["nprobe"] and checks["target_recall"] == 0.9
    assert checks["nlist"] == index.nlist and checks["recall_at_10"] >= 0.9
    truth = RecallTruth.load(archive.directory.build_file(row["id"], TRUTH_FILE))
    assert recall_against(index, truth).recall == checks["recall_at_10"]
    # An incremental publish that still reaches the target keeps it; the next full build tunes again.
    archive.add(20, seed=2)
    row = archive.publish()
    assert archive.live().manifest.parts == ("part-1.faiss", "part-2.faiss")
    if row["checks"]["recall_at_10"] >= 0.9:
        assert row["checks"]["nprobe"] == checks["nprobe"]
    archive.store.close()

    untuned = Archive(tmp_path / "untuned", index_type="ivf", target_recall=0)
    untuned.add(3000, seed=1)
    row = untuned.publish()
    index = untuned.live()
    assert index.manifest.nprobe is None and "nprobe" not in row["checks"]
    assert index.nprobe == default_nprobe(index.nlist)
    untuned.store.close()
