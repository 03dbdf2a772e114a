"""Convert a downloaded evaluation set to the layouts `histosearch eval` reads (docs/evaluation.md).

    python scripts/eval_convert.py sha256 FILE...                  # compare with the recipe's checksum
    python scripts/eval_convert.py folder DIR --out labels.csv [--pattern REGEX]
    python scripts/eval_convert.py table SRC.csv --root DIR --path '{image_id}' --label top_label_name \\
        [--case COLUMN] [--slide COLUMN] [--pattern REGEX] --out labels.csv
    python scripts/eval_convert.py arch captions.json --images DIR --out pairs.csv

``--pattern`` is a regular expression searched in each image's path (relative to the set's folder)
whose named groups ``case_id`` and/or ``slide_id`` fill those columns. Paths in the output are relative
to the output file's folder. Nothing is downloaded: the sets' licences ask each user to fetch them.
Errors print one line naming the file and exit with status 2.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import sys
from pathlib import Path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"}


class ConvertError(Exception):
    pass


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _ids(rel: str, pattern: re.Pattern | None, where: str) -> dict[str, str]:
    if pattern is None:
        return {}
    found = pattern.search(rel)
    if found is None:
        raise ConvertError(f"{where}: --pattern {pattern.pattern!r} does not match {rel!r}")
    return {k: v for k, v in found.groupdict().items() if k in ("case_id", "slide_id") and v}


def _write(out: Path, rows: list[dict[str, str]], columns: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _relative(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path.resolve(), out.resolve().parent)).as_posix()


def _columns(rows: list[dict[str, str]], first: list[str]) -> list[str]:
    return first + [c for c in ("case_id", "slide_id") if any(c in r for r in rows)]


def convert_folder(root: Path, out: Path, pattern: re.Pattern | None) -> int:
    if not root.is_dir():
        raise ConvertError(f"{root}: not a folder")
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
            rel = image.relative_to(root).as_posix()
            rows.append({"path": _relative(image, out), "label": folder.name, **_ids(rel, pattern, str(root))})
    if not rows:
        raise ConvertError(f"{root}: no images in class sub-folders")
    _write(out, rows, _columns(rows, ["path", "label"]))
    return len(rows)


def convert_table(
    source: Path, root: Path, out: Path, path: str, label: str, case: str | None, slide: str | None,
    pattern: re.Pattern | None,
) -> int:  # fmt: skip
    try:
        with open(source, newline="", encoding="utf-8-sig") as f:
            records = list(csv.DictReader(f))
    except OSError as exc:
        raise ConvertError(f"{source}: cannot read ({exc.strerror})") from None
    rows, missing = [], []
    for n, record in enumerate(records, start=2):
        where = f"{source}:{n}"
        try:
            rel = path.format(**record) if "{" in path else record[path]
            row = {"label": record[label]}
            if case:
                row["case_id"] = record[case]
            if slide:
                row["slide_id"] = record[slide]
        except KeyError as exc:
            raise ConvertError(f"{where}: no column {exc.args[0]!r} (columns: {', '.join(record)})") from None
        image = root / rel
        if not image.is_file():
            missing.append(rel)
            continue
        rows.append({"path": _relative(image, out), **row, **_ids(rel, pattern, where)})
    if missing:
        shown = ", ".join(missing[:3])
        raise ConvertError(f"{source}: {len(missing)} listed images are not under {root} (e.g. {shown})")
    if not rows:
        raise ConvertError(f"{source}: no rows")
    _write(out, rows, _columns(rows, ["path", "label"]))
    return len(rows)


def convert_arch(captions: Path, images: Path, out: Path) -> int:
    """ARCH's captions.json: {"<n>": {"uuid": ..., "caption": ...}, ...}; images/<uuid>.<ext>."""
    try:
        data = json.loads(captions.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{captions}: not a readable JSON file ({exc})") from None
    entries = data.values() if isinstance(data, dict) else data
    by_uuid = {p.stem: p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS} if images.is_dir() else {}
    if not by_uuid:
        raise ConvertError(f"{images}: no images")
    rows, missing = [], 0
    for entry in entries:
        if not isinstance(entry, dict) or "uuid" not in entry or "caption" not in entry:
            raise ConvertError(f'{captions}: expected entries with "uuid" and "caption", got {str(entry)[:80]}')
        image = by_uuid.get(entry["uuid"])
        if image is None:
            missing += 1
            continue
        rows.append({"image": _relative(image, out), "caption": " ".join(str(entry["caption"]).split())})
    if missing:
        raise ConvertError(f"{captions}: {missing} captions name an image that is not in {images}")
    _write(out, rows, ["image", "caption"])
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("sha256", help="print the sha256 of downloaded files")
    check.add_argument("files", type=Path, nargs="+")
    folder = sub.add_parser("folder", help="a folder of class folders -> path,label[,case_id][,slide_id]")
    folder.add_argument("root", type=Path)
    table = sub.add_parser("table", help="a metadata CSV -> path,label[,case_id][,slide_id]")
    table.add_argument("source", type=Path)
    table.add_argument("--root", type=Path, required=True, help="the folder the image paths are relative to")
    table.add_argument("--path", required=True, help="the path column, or a template such as '{label}/{image_id}'")
    table.add_argument("--label", required=True, help="the label column")
    table.add_argument("--case", help="the case (patient) column")
    table.add_argument("--slide", help="the slide column")
    arch = sub.add_parser("arch", help="ARCH captions.json + images/ -> image,caption")
    arch.add_argument("captions", type=Path)
    arch.add_argument("--images", type=Path, required=True)
    for p in (folder, table):
        p.add_argument("--pattern", type=re.compile, help="regex with named groups case_id / slide_id over the path")
    for p in (folder, table, arch):
        p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "sha256":
            for path in args.files:
                if not path.is_file():
                    raise ConvertError(f"{path}: no such file")
                print(f"{sha256(path)}  {path}")
            return 0
        if args.command == "folder":
            n = convert_folder(args.root, args.out, args.pattern)
        elif args.command == "table":
            n = convert_table(args.source, args.root, args.out, args.path, args.label, args.case, args.slide,
                              args.pattern)  # fmt: skip
        else:
            n = convert_arch(args.captions, args.images, args.out)
    except ConvertError as exc:
        print(f"eval_convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {n} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
