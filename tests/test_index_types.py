"""Which index type a build gets."""

from __future__ import annotations

import pytest

from search.core.errors import ConfigError
from search.storage.index_types import APPROXIMATE_DEFAULT, choose_index_type


def test_choose_index_type() -> None:
    assert choose_index_type(10, "auto", exact_max=100) == "flat"
    assert choose_index_type(100, "auto", exact_max=100) == "flat"
    assert choose_index_type(101, "auto", exact_max=100) == APPROXIMATE_DEFAULT != "flat"
    assert choose_index_type(10, "hnsw") == "hnsw"
    with pytest.raises(ConfigError, match="unknown index type 'annoy'"):
        choose_index_type(10, "annoy")
