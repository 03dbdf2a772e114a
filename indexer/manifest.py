"""Case and slide identity of each tile: from an optional manifest CSV, else from the tile's path.

A manifest is a CSV (tab-separated when named ``.tsv``) with a header row. Its key column,
the first of ``path``, ``file``, ``slide``, ``filename``, ``slide_id``, ``case_id`` it has, names a
tile file, a slide file or a folder of tiles relative to the archive root (a ``slide_id`` or
``case_id`` key names the slide's or case's folder, or the slide file's stem); ``case_id``,
``slide_id`` and every other column become the tile's metadata. Column names are matched
case-insensitively and stored in lower case.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from pathlib import Path, PurePosixPath

from search.archives.readers.slide import SLIDE_EXTENSIONS
from search.archives.scale import magnification_mpp, positive_number
from search.core.errors import BadInput, ConfigError

KEY_COLUMNS = ("path", "file", "slide", "filename", "slide_id", "case_id")
# Key columns that are identities too: a row keyed by its slide_id names a slide folder (or file stem)
# and still gives its tiles that slide_id.
_IDENTITY_KEYS = ("slide_id", "case_id")


def _norm(path: str) -> str:
    norm = path.strip().replace("\\", "/")
    while norm.startswith("./"):
        norm = norm[2:]
    return norm.rstrip("/")


class Manifest:
    def __init__(self, rows: dict[str, dict[str, str]], source: str = "manifest", key: str = "path") -> None:
        """``rows`` maps a relative path (file, slide or folder) to that row's other columns; ``key`` is
        the column those paths came from."""
        self.source = source
        self.key = key
        self._by_path = {_norm(k): v for k, v in rows.items()}
        self._by_name = self._unique(PurePosixPath(k).name for k in self._by_path)
        self._by_stem = self._unique(PurePosixPath(k).stem for k in self._by_path)

    def _unique(self, keys: object) -> dict[str, dict[str, str]]:
        """Name -> row for names only one row has: an ambiguous name matches nothing rather than a guess."""
        rows: dict[str, dict[str, str]] = {}
        clashes: set[str] = set()
        for key, row in zip(keys, self._by_path.values(), strict=True):
            if key in rows:
                clashes.add(key)
            rows[key] = row
        return {k: v for k, v in rows.items() if k not in clashes}

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read a manifest file; BadInput naming the file and line for anything it cannot use."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise BadInput(f"manifest {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"manifest {path}: cannot read it as UTF-8 text ({exc})") from None
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        try:
            header = [h.strip().lower() for h in next(reader, [])]
            if not any(header):
                keys = ", ".join(KEY_COLUMNS)
                raise BadInput(f"manifest {path}: empty; it needs a header row with a key column ({keys})")
            key = next((k for k in KEY_COLUMNS if k in header), None)
            if key is None:
                raise BadInput(
                    f"manifest {path}, line 1: no key column; name one of {', '.join(KEY_COLUMNS)} "
                    f"(found: {', '.join(header)})"
                )
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes or "" in header:
                raise BadInput(f"manifest {path}, line 1: empty or repeated column names {dupes or ['']}")
            rows: dict[str, dict[str, str]] = {}
            first_line: dict[str, int] = {}
            for values in reader:
                line = reader.line_num
                if not any(v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    raise BadInput(
                        f"manifest {path}, line {line}: {len(values)} fields where the header has {len(header)}"
                    )
                record = dict(zip(header, (v.strip() for v in values), strict=True))
                name = _norm(record[key] if key in _IDENTITY_KEYS else record.pop(key))
                if not name:
                    raise BadInput(f"manifest {path}, line {line}: empty '{key}'")
                if name in first_line:
                    raise BadInput(f"manifest {path}, line {line}: '{name}' is already on line {first_line[name]}")
                first_line[name] = line
                for column in SCALE_COLUMNS:
                    if record.get(column) and positive_number(record[column]) is None:
                        raise BadInput(
                            f"manifest {path}, line {line}: {column} {record[column]!r} is not a positive number"
                        )
                rows[name] = {k: v for k, v in record.items() if v}
        except csv.Error as exc:
            raise BadInput(f"manifest {path}, line {reader.line_num}: bad CSV ({exc})") from None
        return cls(rows, source=str(path), key=key)

    def lookup(self, path: str) -> dict[str, str]:
        """The row for ``path``: exact relative path, else file name, else stem, else the nearest
        enclosing folder (by relative path, then by name); {} when none matches."""
        norm = _norm(path)
        pure = PurePosixPath(norm)
        row = self._by_path.get(norm) or self._by_name.get(pure.name) or self._by_stem.get(pure.stem)
        if row is not None:
            return dict(row)
        for folder in pure.parents:
            if str(folder) == ".":
                break
            row = self._by_path.get(str(folder)) or self._by_name.get(folder.name)
            if row is not None:
                return dict(row)
        return {}

    def __len__(self) -> int:
        return len(self._by_path)


# Columns that state a tile's scale: um per pixel, or the objective magnification (10 / mag um/px).
SCALE_COLUMNS = ("mpp", "magnification")


def manifest_mpp(extra: dict[str, str]) -> float | None:
    """The um/px a manifest row states for ``path``: its ``mpp`` column (taken out of ``extra``), else
    its ``magnification``; None when it states neither."""
    mpp = extra.pop("mpp", None)
    if mpp:
        return positive_number(mpp)
    magnification = extra.get("magnification")
    if magnification:
        value = positive_number(magnification)
        return magnification_mpp(value) if value else None
    return None


@functools.lru_cache(maxsize=16)
def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"path_pattern {pattern!r}: not a regular expression ({exc})") from None


def identity(
    path: str, manifest: Manifest | None, pattern: str, *, slide: bool | None = None
) -> tuple[str | None, str | None, dict[str, str]]:
    """(case_id, slide_id, other columns) of a tile at ``path``: the manifest first, then ``pattern``.

    ``pattern`` (settings.path_pattern) is searched in the relative path and its named groups
    ``case_id`` and ``slide_id`` fill what the manifest left out. For a tile cut from a slide,
    ``path`` is the slide file and ``slide=True`` (inferred from the extension when None, which
    cannot tell a pyramidal .tif): the slide file stands where a folder of its tiles would, so
    the pattern sees ``path/`` and the slide_id is the slide file's stem.
    """
    extra = manifest.lookup(path) if manifest is not None else {}
    case_id = extra.pop("case_id", None)
    slide_id = extra.pop("slide_id", None)
    norm = _norm(path)
    is_slide = slide if slide is not None else PurePosixPath(norm).suffix.lower() in SLIDE_EXTENSIONS
    if case_id is None or slide_id is None:
        subject = f"{norm}/tile" if is_slide else norm
        match = _compile(pattern).search(subject)
        groups = match.groupdict() if match else {}
        case_id = case_id or groups.get("case_id") or None
        if is_slide:
            slide_id = slide_id or PurePosixPath(norm).stem
        else:
            slide_id = slide_id or groups.get("slide_id") or None
    return case_id, slide_id, extra
