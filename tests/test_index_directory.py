"""The on-disk build directory and its LIVE pointer, in tmp_path."""

from __future__ import annotations

import pytest

from search.core.errors import IndexUnavailable
from search.storage.index_directory import IndexDirectory


def write_build(directory: IndexDirectory, build_id: int, n: int) -> None:
    # The directory only moves files: any bytes stand in for a FAISS index (test_vectors.py loads real ones).
    path = directory.build_path(build_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * n)


def test_publish_swaps_the_pointer_and_prunes_old_builds(tmp_path) -> None:
    directory = IndexDirectory(tmp_path / "index")
    assert directory.live_build_id() is None
    for build_id in (1, 2, 3):
        write_build(directory, build_id, 10 * build_id)
        directory.publish(build_id)
        assert directory.live_build_id() == build_id
    # The previous build stays for servers still loading it; older ones go.
    assert directory.build_ids() == [2, 3]
    write_build(directory, 5, 10)  # a newer build still being written is left alone
    write_build(directory, 4, 10)
    directory.publish(4)
    assert directory.build_ids() == [3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["LIVE", "builds"]
    with pytest.raises(IndexUnavailable, match="cannot publish build 9"):
        directory.publish(9)
    assert directory.live_build_id() == 4


def test_corrupt_pointer(tmp_path) -> None:
    directory = IndexDirectory(tmp_path)
    directory.pointer.write_text("garbage")
    with pytest.raises(IndexUnavailable, match="corrupt pointer"):
        directory.live_build_id()
