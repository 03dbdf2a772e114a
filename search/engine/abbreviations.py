"""Abbreviations pathologists type ("DCIS", "TILs", "SCC"), expanded before a text query is embedded.

CONCH was trained on captions that mostly spell terms out, so "DCIS" alone embeds poorly. The built-in
table (``data/abbreviations.csv``) can be extended or overridden by a CSV named by the setting
``abbreviations_file``; an expansion replaces the whole word, case-sensitively for all-capital
abbreviations (so "PIN" expands and "pin" does not), and the answer shows what was searched.
"""

from __future__ import annotations

import csv
import io
import re
from importlib import resources
from pathlib import Path

from search.core.errors import ConfigError

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9&+-]*")


def _read(text: str, name: str) -> dict[str, str]:
    table: dict[str, str] = {}
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in next(reader, [])]
    if header[:2] != ["abbreviation", "expansion"]:
        raise ConfigError(f"{name}, line 1: the header must be 'abbreviation,expansion'")
    for values in reader:
        if not any(v.strip() for v in values):
            continue
        if len(values) != 2 or not values[0].strip() or not values[1].strip():
            raise ConfigError(f"{name}, line {reader.line_num}: expected ABBREVIATION,EXPANSION")
        table[values[0].strip()] = values[1].strip()
    return table


def builtin_table() -> dict[str, str]:
    source = resources.files("search.engine") / "data" / "abbreviations.csv"
    return _read(source.read_text(encoding="utf-8"), "search/engine/data/abbreviations.csv")


class Abbreviations:
    """The table in use: the built-in one, updated from ``extra_file`` when given."""

    def __init__(self, extra_file: Path | None = None) -> None:
        self.table = builtin_table()
        if extra_file is not None:
            try:
                text = Path(extra_file).read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"abbreviations_file {extra_file}: cannot read it ({exc})") from None
            self.table.update(_read(text, f"abbreviations_file {extra_file}"))
        # Lower-case lookups for mixed-case entries ("TILs" also matches "tils"); all-capital ones stay exact.
        self._folded = {key.lower(): value for key, value in self.table.items() if not key.isupper()}

    def expand(self, text: str) -> str:
        """``text`` with every whole-word abbreviation replaced by its expansion."""

        def replace(match: re.Match[str]) -> str:
            word = match.group(0)
            return self.table.get(word) or self._folded.get(word.lower()) or word

        return _WORD.sub(replace, text)
