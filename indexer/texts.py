"""Text corpora for image -> text search: the built-in vocabulary and user files (.txt, .csv, .jsonl).

Every loader returns the same ``TextItem`` list: whitespace collapsed, empty texts dropped, duplicates
dropped keeping the first. Bad files raise ``BadInput`` naming the file, the line and the reason.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from search.conch.encoder import Encoder
from search.conch.words import content_words
from search.core.errors import BadInput
from search.storage.store import Store
from search.storage.word_vectors import WordVectors

BUILTIN_CORPUS = "builtin"

# Words embedded ahead of queries per model: the built-in vocabulary has ~750; a large caption corpus is
# capped, at about two minutes of the text tower on a 2-core CPU.
MAX_WORD_VECTORS = 5000

# Column or field names that hold the text, in order of preference.
TEXT_FIELDS = ("text", "caption", "term")


@dataclass(frozen=True)
class TextItem:
    text: str
    tags: dict[str, str] = field(default_factory=dict)


def builtin_vocabulary() -> list[TextItem]:
    """The shipped histopathology vocabulary, tagged with ``organ`` and ``kind`` (indexer/data/README.md)."""
    source = resources.files("indexer") / "data" / "vocabulary.csv"
    return _read_csv(source.read_text(encoding="utf-8"), "indexer/data/vocabulary.csv")


def load_corpus(path: Path) -> list[TextItem]:
    """Texts from a .txt (one per line), .csv (header row with a text column) or .jsonl file."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise BadInput(
            f"{path}: unsupported corpus format {path.suffix or '(no extension)'!r}; use one of {', '.join(_READERS)}"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{path}: cannot read corpus file: {exc.strerror}") from exc
    try:
        # utf-8-sig: spreadsheet programs often start CSV exports with a byte-order mark.
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise BadInput(f"{path}, line {line}: not valid UTF-8 text; save the file as UTF-8") from exc
    items = reader(content, str(path))
    if not items:
        raise BadInput(f"{path}: no texts found; add at least one non-empty text")
    return items


def _read_txt(content: str, name: str) -> list[TextItem]:
    lines = (line.strip() for line in content.splitlines())
    return _unique(TextItem(line) for line in lines if line and not line.startswith("#"))


def _read_csv(content: str, name: str) -> list[TextItem]:
    # strict: an unclosed quote is an error instead of silently swallowing the rest of the file.
    reader = csv.reader(io.StringIO(content, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None or not any(column.strip() for column in header):
            raise BadInput(f"{name}, line 1: no header row; the first row must name the columns, e.g. 'text'")
        columns = [column.strip() for column in header]
        lowered = [column.lower() for column in columns]
        text_at = next((lowered.index(f) for f in TEXT_FIELDS if f in lowered), 0)
        items = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(columns):
                raise BadInput(
                    f"{name}, line {reader.line_num}: {len(row)} fields but the header has {len(columns)}; "
                    "quote texts that contain commas"
                )
            tags = {
                column: value.strip()
                for i, (column, value) in enumerate(zip(columns, row, strict=True))
                if i != text_at and column and value.strip()
            }
            items.append(TextItem(row[text_at], tags))
    except csv.Error as exc:
        raise BadInput(f"{name}, line {reader.line_num}: malformed CSV ({exc}); check the quoting of texts") from exc
    return _unique(items)


def _read_jsonl(content: str, name: str) -> list[TextItem]:
    items = []
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and other line separators.
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{name}, line {number}: bad JSON ({exc.msg}); write one JSON object per line") from exc
        if not isinstance(record, dict):
            raise BadInput(f"{name}, line {number}: expected a JSON object, got {type(record).__name__}")
        key = next((f for f in TEXT_FIELDS if f in record), None)
        if key is None:
            raise BadInput(f"{name}, line {number}: missing text field; give each object a 'text' field")
        text = record[key]
        if text is not None and not isinstance(text, str):
            raise BadInput(f"{name}, line {number}: field {key!r} must be a string")
        tags = {
            k: v if isinstance(v, str) else json.dumps(v)
            for k, v in record.items()
            if k != key and isinstance(v, (str, int, float, bool))
        }
        items.append(TextItem(text or "", tags))
    return _unique(items)


def _unique(items: Iterable[TextItem]) -> list[TextItem]:
    kept: dict[str, TextItem] = {}
    for item in items:
        text = " ".join(item.text.split())
        # The CONCH tokenizer is uncased, so texts differing only in case embed identically.
        key = text.casefold()
        if text and key not in kept:
            kept[key] = TextItem(text, item.tags)
    return list(kept.values())


_READERS: dict[str, Callable[[str, str], list[TextItem]]] = {
    ".txt": _read_txt,
    ".csv": _read_csv,
    ".jsonl": _read_jsonl,
}


def sync_word_vectors(store: Store, encoder: Encoder, data_dir: Path, texts_changed: bool) -> int:
    """Embed the content words of every text stored under the encoder's model that are not embedded yet, the
    commonest first and at most ``MAX_WORD_VECTORS`` in all (search/storage/word_vectors.py); returns how many.
    Unless ``texts_changed``, a model whose words were embedded before is left as it is without reading its texts."""
    words = WordVectors(data_dir, encoder.fingerprint)
    if not texts_changed and words.path.is_file():
        return 0
    known = words.load()
    if len(known) >= MAX_WORD_VECTORS:
        return 0
    ids, _ = store.text_matrix(encoder.fingerprint)
    counts = Counter(w for item in store.get_texts(ids.tolist()) for w in content_words(item["text"], limit=None))
    missing = [w for w, _ in counts.most_common() if w not in known][: MAX_WORD_VECTORS - len(known)]
    if missing:
        words.add(missing, encoder.encode_texts(missing))
    return len(missing)
