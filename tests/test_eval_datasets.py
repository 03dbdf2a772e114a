"""Evaluation set loaders, content hashes and the embedding cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from search.core.errors import BadInput
from search.evaluation.datasets import load_classes, load_labelled, load_pairs
from search.evaluation.embeddings import EmbeddingCache


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_per_class_and_csv_give_the_same_set_and_hash(tmp_path):
    root = tmp_path / "set"
    for label, names in {"b": ["x.png", "y.jpg"], "a": ["z.png"]}.items():
        for name in names:
            _write(root / label / name, f"{label}/{name}".encode())
    _write(root / ".hidden" / "q.png", b"skipped")
    _write(root / "a" / ".DS_Store", b"skipped")
    folder = load_labelled(root)
    assert folder.classes == ["a", "b"] and folder.labels.tolist() == [0, 1, 1]
    # No case or slide: each item is its own group.
    assert len(set(folder.groups.tolist())) == 3

    csv = _write(tmp_path / "list.csv", b"path,label\nset/b/y.jpg,b\nset/a/z.png,a\nset/b/x.png,b\n")
    listed = load_labelled(csv)
    assert listed.content_hash == folder.content_hash  # order and paths do not matter, bytes and labels do

    moved = tmp_path / "copy"
    shutil.copytree(root, moved)
    assert load_labelled(moved).content_hash == folder.content_hash
    (moved / "a" / "z.png").write_bytes(b"edited")
    assert load_labelled(moved).content_hash != folder.content_hash


def test_csv_cases_and_slides_make_the_groups(tmp_path):
    for n in range(4):
        _write(tmp_path / f"t{n}.png", bytes([n]))
    csv = _write(
        tmp_path / "l.csv",
        b"path,label,case_id,slide_id\nt0.png,a,P1,S1\nt1.png,a,P1,S2\nt2.png,b,,S3\nt3.png,b,,S3\n",
    )
    data = load_labelled(csv)
    groups = data.groups.tolist()
    assert groups[0] == groups[1] and groups[2] == groups[3] and groups[0] != groups[2]
    assert data.items[0].case == "P1" and data.items[2].case is None and data.items[2].slide == "S3"


def test_classes_and_pairs(tmp_path):
    classes = _write(tmp_path / "classes.csv", b"label,names\nTUM,adenocarcinoma | tumour epithelium\nSTR,stroma\n")
    assert load_classes(classes, ["STR", "TUM"]) == [["stroma"], ["adenocarcinoma", "tumour epithelium"]]
    assert load_classes(None, ["STR"]) == [["STR"]]
    _write(tmp_path / "classes_bad.csv", b"label,names\nTUM,\n")
    with pytest.raises(BadInput, match="classes_bad.csv:2: a row needs a label and at least one name"):
        load_classes(tmp_path / "classes_bad.csv", ["TUM"])

    _write(tmp_path / "i1.png", b"1")
    _write(tmp_path / "i2.png", b"2")
    pairs = load_pairs(_write(tmp_path / "p.csv", b"image,caption\ni1.png,one\ni2.png,two\ni1.png,uno\n"))
    assert [p.name for p in pairs.images] == ["i1.png", "i2.png"]
    assert pairs.caption_image.tolist() == [0, 1, 0] and pairs.captions == ["one", "two", "uno"]
    lines = ['{"image": "i1.png", "caption": "one"}', "", '{"image": "i2.png", "caption": "two"}']
    lines.append('{"image": "i1.png", "caption": "uno"}')
    jsonl = load_pairs(_write(tmp_path / "p.jsonl", "\n".join(lines).encode()))
    assert jsonl.content_hash == pairs.content_hash
    with pytest.raises(BadInput, match=r"p2.jsonl:1: not JSON"):
        load_pairs(_write(tmp_path / "p2.jsonl", b"{nope\n"))
    with pytest.raises(BadInput, match=r"p3.csv:2: empty caption"):
        load_pairs(_write(tmp_path / "p3.csv", b"image,caption\ni1.png,\n"))
    with pytest.raises(BadInput, match=r"pairs must be a .csv"):
        load_pairs(tmp_path / "p.txt")


def test_embedding_cache_round_trip_and_keys(tmp_path):
    cache = EmbeddingCache(tmp_path)
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert cache.load("model-a", ["h1", "h2"], "plain") is None
    path = cache.save("model-a", ["h1", "h2"], "plain", vectors)
    assert path.parent.name == "model-a" and not list(path.parent.glob("*.tmp*"))
    assert np.array_equal(cache.load("model-a", ["h1", "h2"], "plain"), vectors)
    for other in (
        ("model-b", ["h1", "h2"], "plain"),
        ("model-a", ["h2", "h1"], "plain"),
        ("model-a", ["h1", "h2"], "tta4"),
    ):
        assert cache.load(*other) is None
    path.write_bytes(b"half a file")
    assert cache.load("model-a", ["h1", "h2"], "plain") is None
