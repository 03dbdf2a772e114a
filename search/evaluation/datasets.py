"""Evaluation sets on disk: labelled tiles, class prompts and image-caption pairs, with their content hash.

Layouts (docs/evaluation.md):

- labelled tiles: a folder with one sub-folder per class, or a CSV with a header
  ``path,label[,case_id][,slide_id]`` whose paths are relative to the CSV's folder;
- classes: a CSV ``label,names`` where ``names`` lists the class name and its synonyms separated by ``|``;
- pairs: a CSV ``image,caption`` or JSONL lines ``{"image": ..., "caption": ...}``; an image may
  have several rows (several captions).

A set's content hash covers the bytes of every image and every label, case, slide and caption, not
the paths, so a copied or renamed set keeps its hash and an edited one gets a new one.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from search.archives.readers.base import IMAGE_EXTENSIONS
from search.core.errors import BadInput

CLASS_SEPARATOR = "|"


def file_hash(path: Path) -> str:
    """sha256 hex of a file's bytes: the content hash the indexer stores for image files."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror})") from None
    return digest.hexdigest()


def _digest(lines: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for line in sorted(lines):
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class Item:
    path: Path
    label: str
    case: str | None = None
    slide: str | None = None


@dataclass
class LabelledSet:
    """Labelled tiles; ``labels`` index into ``classes`` (sorted label names)."""

    source: Path
    items: list[Item]
    classes: list[str] = field(init=False)

    def __post_init__(self) -> None:
        if not self.items:
            raise BadInput(f"{self.source}: no labelled images")
        self.classes = sorted({item.label for item in self.items})

    @property
    def name(self) -> str:
        return self.source.stem if self.source.is_file() else self.source.name

    @cached_property
    def labels(self) -> np.ndarray:
        position = {name: n for n, name in enumerate(self.classes)}
        return np.array([position[item.label] for item in self.items], np.int64)

    @cached_property
    def groups(self) -> np.ndarray:
        """The group whose hits leave-one-case-out removes: the case, else the slide, else the item alone."""
        keys = [
            f"case:{i.case}" if i.case else f"slide:{i.slide}" if i.slide else f"item:{n}"
            for n, i in enumerate(self.items)
        ]
        return np.unique(keys, return_inverse=True)[1].astype(np.int64)

    @cached_property
    def patients(self) -> np.ndarray:
        """Case codes for slide-level evaluation (a slide without a case is its own patient)."""
        keys = [f"case:{i.case}" if i.case else f"slide:{i.slide}" for i in self.items]
        return np.unique(keys, return_inverse=True)[1].astype(np.int64)

    @cached_property
    def hashes(self) -> list[str]:
        return [file_hash(item.path) for item in self.items]

    @cached_property
    def content_hash(self) -> str:
        return _digest(
            f"{h}\t{i.label}\t{i.case or ''}\t{i.slide or ''}" for h, i in zip(self.hashes, self.items, strict=True)
        )


@dataclass
class PairSet:
    """Image-caption pairs: unique images, and each caption with the position of its image."""

    source: Path
    images: list[Path]
    captions: list[str]
    caption_image: np.ndarray

    @property
    def name(self) -> str:
        return self.source.stem

    @cached_property
    def hashes(self) -> list[str]:
        return [file_hash(path) for path in self.images]

    @cached_property
    def content_hash(self) -> str:
        return _digest(
            f"{self.hashes[i]}\t{caption}" for caption, i in zip(self.captions, self.caption_image, strict=True)
        )


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV with a header naming at least ``required``."""
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [name for name in required if name not in header]
            if missing:
                raise BadInput(
                    f"{path}: the header must name the columns {','.join(required)}; "
                    f"missing {', '.join(missing)} (found {','.join(header) or 'nothing'})"
                )
            reader.fieldnames = header
            return [
                (reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}) for row in reader
            ]
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not a UTF-8 text file") from None
    except csv.Error as exc:
        raise BadInput(f"{path}: not a readable CSV ({exc})") from None


def _resolve(base: Path, value: str, where: str) -> Path:
    if not value:
        raise BadInput(f"{where}: empty path")
    path = Path(value)
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise BadInput(f"{where}: no such image {path}")
    return path


def load_labelled(path: Path) -> LabelledSet:
    """Labelled tiles from a folder of class folders or a ``path,label[,case_id][,slide_id]`` CSV."""
    path = Path(path)
    if path.is_dir():
        items = []
        for folder in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            items += [Item(image, folder.name) for image in _image_files(folder)]
        if not items:
            raise BadInput(f"{path}: no images in class sub-folders (expected {path}/<class>/<image>)")
        return LabelledSet(path, items)
    if path.suffix.lower() != ".csv":
        raise BadInput(f"{path}: expected a folder of class folders or a .csv (path,label[,case_id][,slide_id])")
    items = []
    for line, row in _read_csv(path, ("path", "label")):
        where = f"{path}:{line}"
        if not row["label"]:
            raise BadInput(f"{where}: empty label")
        items.append(
            Item(
                _resolve(path.parent, row["path"], where),
                row["label"],
                row.get("case_id") or None,
                row.get("slide_id") or None,
            )
        )
    return LabelledSet(path, items)


def load_classes(path: Path | None, labels: list[str]) -> list[list[str]]:
    """The names (class name, then synonyms) of each label, in the order of ``labels``.

    Without a classes file each label is its own name; with one, every label must be in it.
    """
    if path is None:
        return [[label] for label in labels]
    names: dict[str, list[str]] = {}
    for line, row in _read_csv(Path(path), ("label", "names")):
        found = [n.strip() for n in row["names"].split(CLASS_SEPARATOR) if n.strip()]
        if not row["label"] or not found:
            raise BadInput(f"{path}:{line}: a row needs a label and at least one name")
        names[row["label"]] = found
    missing = [label for label in labels if label not in names]
    if missing:
        raise BadInput(f"{path}: no names for the label(s) {', '.join(missing[:10])}")
    return [names[label] for label in labels]


def load_pairs(path: Path) -> PairSet:
    """Image-caption pairs from a CSV ``image,caption`` or JSONL ``{"image", "caption"}`` file."""
    path = Path(path)
    rows: list[tuple[str, str, str]] = []  # (where, image, caption)
    if path.suffix.lower() == ".csv":
        rows = [(f"{path}:{n}", r["image"], r["caption"]) for n, r in _read_csv(path, ("image", "caption"))]
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        if not path.is_file():
            raise BadInput(f"{path}: no such file")
        for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise BadInput(f"{path}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise BadInput(f'{path}:{n}: expected {{"image": "...", "caption": "..."}}')
            rows.append((f"{path}:{n}", record["image"], str(record.get("caption") or "").strip()))
    else:
        raise BadInput(f"{path}: pairs must be a .csv (image,caption) or .jsonl file")
    images: dict[Path, int] = {}
    captions, owner = [], []
    for where, image, caption in rows:
        if not caption:
            raise BadInput(f"{where}: empty caption")
        resolved = _resolve(path.parent, image, where)
        owner.append(images.setdefault(resolved, len(images)))
        captions.append(caption)
    if not captions:
        raise BadInput(f"{path}: no image-caption pairs")
    return PairSet(path, list(images), captions, np.array(owner, np.int64))
