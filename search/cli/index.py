"""The commands that change what is indexed: `index`, `reindex`, `remove` and `index-texts`, each holding the
one-indexer lock."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from search.cli.options import model_options, setting_option
from search.core.errors import BadInput
from search.core.settings import Settings

if TYPE_CHECKING:
    from indexer.indexer import Indexer


@contextlib.contextmanager
def _indexer(settings: Settings, args: argparse.Namespace) -> Iterator[Indexer]:
    """The indexer, with its lock taken first: a refused second indexer stops before torch is imported."""
    from indexer.lock import acquire

    lock = acquire(settings, args.wait)
    try:
        from indexer.indexer import Indexer

        yield Indexer(settings, progress=not getattr(args, "quiet", False), lock=lock)
    finally:
        lock.release()


def cmd_index(args: argparse.Namespace, settings: Settings) -> int:
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise BadInput(f"no such file or folder: {', '.join(missing)}")
    if args.manifest is not None and not args.manifest.is_file():
        raise BadInput(f"{args.manifest}: no such manifest file")
    with _indexer(settings, args) as indexer:
        report = indexer.run(args.paths, manifest=args.manifest, kind="index", wait=args.wait)
    print(report.summary())
    return 0


def cmd_reindex(args: argparse.Namespace, settings: Settings) -> int:
    with _indexer(settings, args) as indexer:
        report = indexer.run(args.paths or None, kind="reindex", wait=args.wait, retrain=args.retrain)
    print(report.summary() or "nothing indexed yet: run `histosearch index PATH` first")
    return 0


def cmd_remove(args: argparse.Namespace, settings: Settings) -> int:
    with _indexer(settings, args) as indexer:
        removed = indexer.remove(args.paths, wait=args.wait)
    for uri, tiles in removed.items():
        print(f"{uri}: removed with its {tiles} tiles")
    return 0


def cmd_index_texts(args: argparse.Namespace, settings: Settings) -> int:
    with _indexer(settings, args) as indexer:
        added = indexer.index_texts(args.files, args.corpus, wait=args.wait)
    print(f"added {added} texts")
    return 0


def _index_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true", help="wait for another running indexer instead of stopping")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    setting_option(parser, "workers", help="decode worker processes (0: decode in the main process)")
    setting_option(parser, "index_type", help="FAISS index type (default auto)")
    setting_option(parser, "ray_address", "--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="embed on a Ray cluster: its address, or none for the one this machine joined")  # fmt: skip
    setting_option(parser, "ray_actors", help="embedding actors on the Ray cluster (default: one per GPU)")
    model_options(parser)


def add_index(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index", help="index folders, zip/tar shards and whole-slide images")
    index.add_argument("paths", type=Path, nargs="+", help="folders, .zip, .tar(.gz), WebDataset shards, slides")
    index.add_argument("--manifest", type=Path, help="CSV mapping files or slides to case_id, slide_id, metadata")
    _index_options(index)
    index.set_defaults(func=cmd_index)


def add_reindex(sub: argparse._SubParsersAction) -> None:
    reindex = sub.add_parser("reindex", help="bring the index in step with its archives (all sources by default)")
    reindex.add_argument("paths", type=Path, nargs="*", help="only these sources")
    reindex.add_argument(
        "--retrain", action="store_true", help="train the index quantiser again instead of adding to the live one"
    )
    _index_options(reindex)
    reindex.set_defaults(func=cmd_reindex)


def add_remove(sub: argparse._SubParsersAction) -> None:
    remove = sub.add_parser("remove", help="forget sources (archives gone for good) and their tiles")
    remove.add_argument("paths", type=Path, nargs="+", help="sources as indexed (see `histosearch status`)")
    _index_options(remove)
    remove.set_defaults(func=cmd_remove)


def add_index_texts(sub: argparse._SubParsersAction) -> None:
    texts = sub.add_parser("index-texts", help="add captions or terms (txt, csv, jsonl) for image -> text")
    texts.add_argument("files", type=Path, nargs="+")
    texts.add_argument("--corpus", help="corpus name (default: the file name)")
    _index_options(texts)
    texts.set_defaults(func=cmd_index_texts)
