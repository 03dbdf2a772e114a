"""Writing an index part: the same file as ``add_with_ids`` batch by batch, IVF lists without spare capacity."""

from __future__ import annotations

import ctypes
from pathlib import Path

import faiss
import numpy as np
import pytest

from search.storage import build_writer
from search.storage.index_types import _new_index
from search.storage.segmented import _ids_name, _locations_name
from search.storage.vectors import VectorIndex

DIM = 32
N = 3000
BATCH = 700


def unit_vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


VECTORS = unit_vectors(N, 0)
# Tile ids are not contiguous and come in no particular order.
IDS = np.random.default_rng(1).permutation(10 * N)[:N].astype(np.int64)
LOCATIONS = (7 << 32) + np.arange(N, dtype=np.int64)


def trained(kind: str) -> faiss.Index:
    index = _new_index(kind, DIM, N, None)
    if kind in build_writer.TRAINED_TYPES:
        index.train(VECTORS)
    return index


def batches():
    # float16, as the vector files hold them.
    for start in range(0, N, BATCH):
        rows = slice(start, start + BATCH)
        yield IDS[rows], VECTORS[rows].astype(np.float16), LOCATIONS[rows]


def one_pass(kind: str) -> faiss.Index:
    """What parts were before: ``add_with_ids`` a batch at a time."""
    index = build_writer._copy(trained(kind))
    for ids, vectors, _ in batches():
        index.add_with_ids(vectors.astype(np.float32), ids)
    if kind in build_writer.TRAINED_TYPES:
        faiss.downcast_index(index.index).make_direct_map()
    return index


@pytest.mark.parametrize("kind", ["ivfsq8", "ivf", "ivfpq", "flat", "hnsw"])
def test_a_part_is_the_file_that_add_with_ids_writes(tmp_path: Path, kind: str):
    expected = tmp_path / "expected.faiss"
    faiss.write_index(one_pass(kind), str(expected))
    assert build_writer._write_part(tmp_path, "part.faiss", trained(kind), batches) == N
    assert (tmp_path / "part.faiss").read_bytes() == expected.read_bytes()
    order = np.argsort(IDS)
    assert np.array_equal(np.load(tmp_path / _ids_name("part.faiss")), IDS[order])
    assert np.array_equal(np.load(tmp_path / _locations_name("part.faiss")), LOCATIONS[order])


def test_a_loaded_part_searches_and_reconstructs_as_one_built_in_memory(tmp_path: Path):
    build_writer._write_part(tmp_path, "part.faiss", trained("ivfsq8"), batches)
    part = VectorIndex.load(tmp_path / "part.faiss", "cpu")
    plain = VectorIndex(one_pass("ivfsq8"))
    queries = unit_vectors(20, 2)
    for allowed in (None, IDS[::3]):  # the filter takes the exact path: reconstruct through the id maps
        found, expected = part.search(queries, 10, allowed), plain.search(queries, 10, allowed)
        assert np.array_equal(found[1], expected[1])
        assert np.array_equal(found[0], expected[0])
    assert np.array_equal(part.reconstruct(IDS[:50]), plain.reconstruct(IDS[:50]))


def _usable_bytes():
    try:
        usable = ctypes.CDLL(None).malloc_usable_size
    except AttributeError:
        pytest.skip("not glibc: no malloc_usable_size to read an allocation's capacity")
    usable.restype, usable.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    return lambda pointer: usable(int(pointer))


def _slack(index: faiss.Index) -> list[tuple[int, int]]:
    """(bytes held, bytes allocated) of each non-empty list's codes and ids."""
    usable = _usable_bytes()
    invlists = faiss.downcast_InvertedLists(faiss.downcast_index(index.index).invlists)
    held = []
    for list_no in range(invlists.nlist):
        size = invlists.list_size(list_no)
        if size:
            held.append((size * invlists.code_size, usable(invlists.get_codes(list_no))))
            held.append((size * 8, usable(invlists.get_ids(list_no))))
    return held


def test_ivf_lists_are_allocated_at_their_size():
    index = build_writer._copy(trained("ivfsq8"))
    inner = faiss.downcast_index(index.index)
    _, _, lists = build_writer._first_pass(inner, batches)
    build_writer._second_pass(inner, batches, lists)
    # malloc rounds a request up to 16 bytes plus a header word, or to whole pages where it maps them.
    assert all(allocated <= held + 4096 for held, allocated in _slack(index))
    # Grown a vector at a time, lists double their capacity: the check above sees that.
    assert sum(allocated for _, allocated in _slack(one_pass("ivfsq8"))) > 1.2 * sum(h for h, _ in _slack(index))


class Counted:
    def __init__(self, shrink_on: int | None = None) -> None:
        self.calls = 0
        self.shrink_on = shrink_on

    def __call__(self):
        self.calls += 1
        for ids, vectors, locations in batches():
            if self.calls == self.shrink_on:
                ids, vectors, locations = ids[1:], vectors[1:], locations[1:]
            yield ids, vectors, locations


@pytest.mark.parametrize(("kind", "passes"), [("ivfsq8", 2), ("flat", 1)])
def test_ivf_parts_read_their_batches_twice(tmp_path: Path, kind: str, passes: int):
    counted = Counted()
    build_writer._write_part(tmp_path, "part.faiss", trained(kind), counted)
    assert counted.calls == passes


def test_batches_that_change_between_the_passes_are_refused(tmp_path: Path):
    with pytest.raises(RuntimeError, match="changed between its two passes"):
        build_writer._write_part(tmp_path, "part.faiss", trained("ivf"), Counted(shrink_on=2))


def test_a_part_of_no_batches_is_empty(tmp_path: Path):
    assert build_writer._write_part(tmp_path, "part.faiss", trained("ivf"), lambda: iter(())) == 0
    assert len(np.load(tmp_path / _ids_name("part.faiss"))) == 0
    assert not (tmp_path / _locations_name("part.faiss")).exists()
    assert VectorIndex.load(tmp_path / "part.faiss", "cpu").ntotal == 0
