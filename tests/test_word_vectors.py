"""Word vectors embedded ahead of queries: one file per model, merged and replaced whole, a cache that a
damaged file only empties."""

from __future__ import annotations

import logging

import numpy as np

from search.conch.words import content_words
from search.storage.word_vectors import WordVectors


def test_words_are_merged_into_one_file_per_model(tmp_path):
    words = WordVectors(tmp_path, "model-a")
    assert words.load() == {}
    first = np.eye(3, dtype=np.float32)
    words.add(["necrosis", "stroma"], first[:2])
    words.add(["stroma", "mitosis"], first[[0, 2]])  # a word added again takes its new vector
    found = words.load()
    assert sorted(found) == ["mitosis", "necrosis", "stroma"]
    np.testing.assert_array_equal(found["stroma"], first[0])
    np.testing.assert_array_equal(found["necrosis"], first[0])
    assert WordVectors(tmp_path, "model-b").load() == {}  # another model's words are its own
    assert [p.name for p in words.path.parent.iterdir()] == [words.path.name]  # no temporary file left


def test_a_damaged_file_is_an_empty_cache_with_a_warning(tmp_path, caplog):
    words = WordVectors(tmp_path, "model-a")
    words.path.parent.mkdir(parents=True)
    words.path.write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING):
        assert words.load() == {}
    assert "unreadable word vectors" in caplog.text
    words.add(["necrosis"], np.ones((1, 3), np.float32))  # and it is replaced by the next write
    assert list(words.load()) == ["necrosis"]


def test_content_words_leave_out_stopwords_numbers_and_repeats():
    assert content_words("Cribriform glands with necrosis, grade 3; necrosis (focal)") == (
        "cribriform", "glands", "necrosis", "grade", "focal",
    )  # fmt: skip
    assert len(content_words(" ".join(f"w{i}x" for i in range(20)))) == 8
    assert len(content_words(" ".join(f"w{i}x" for i in range(20)), limit=None)) == 20
