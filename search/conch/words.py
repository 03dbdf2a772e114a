"""The words of a text query that its hits are scored on one by one ("why this hit"), the same split for the
query (search/engine) and for the words embedded ahead of queries (indexer/texts.py)."""

from __future__ import annotations

# Words that say nothing about morphology: a text query's per-word scores leave them out.
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "by",
        "for",
        "from",
        "in",
        "into",
        "is",
        "of",
        "on",
        "or",
        "the",
        "to",
        "with",
        "without",
        "showing",
        "shows",
    ]  # fmt: skip
)
MAX_WORDS = 8


def content_words(text: str, limit: int | None = MAX_WORDS) -> tuple[str, ...]:
    """The distinct content words of a text, in order, at most ``limit`` (None: all). Tokens without a letter
    ("3", "4+3", "30%") are left out: alone they describe nothing a tile could match, and each new one would
    cost the text tower a pass."""
    out: list[str] = []
    for raw in text.replace(",", " ").replace(";", " ").split():
        word = raw.strip(".:()[]\"'").lower()
        if word and any(c.isalpha() for c in word) and word not in _STOPWORDS and word not in out:
            out.append(word)
    return tuple(out if limit is None else out[:limit])
