"""The commands that ask the index a question: `query` (tiles), `cases` and `describe` (image -> text)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from search.cli.inputs import meta_of, read_image
from search.cli.options import model_options
from search.cli.results import add_result_options, options_of, print_hits
from search.core.errors import BadInput
from search.core.settings import Settings

if TYPE_CHECKING:
    from search.engine.filters import Filters


def _filters(args: argparse.Namespace) -> Filters:
    from search.engine.filters import Filters

    return Filters(source=args.source, slide=args.slide, case=args.case, meta=meta_of(args.meta))


def cmd_query(args: argparse.Namespace, settings: Settings) -> int:
    from search.engine.engine import Engine

    if sum(x is not None for x in (args.text, args.image, args.tile)) != 1:
        raise BadInput('give one of a text ("cribriform glands"), --image FILE or --tile ID, not both')
    if args.exclude_case and args.tile is None:
        raise BadInput("--exclude-case is for similar-tile queries: give --tile ID")
    engine = Engine(settings)
    filters = _filters(args)
    options = options_of(args, exclude_case="1" if args.exclude_case else None)
    if args.image is not None:
        result = engine.search_image(read_image(args.image, settings), k=args.k, filters=filters, options=options)
    elif args.tile is not None:
        result = engine.similar(args.tile, k=args.k, filters=filters, options=options)
    else:
        result = engine.search_text(args.text, k=args.k, filters=filters, options=options)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print_hits(result)
    return 0


def cmd_cases(args: argparse.Namespace, settings: Settings) -> int:
    from search.engine.engine import Engine

    given = [x for x in (args.text, args.image, args.tile) if x is not None]
    if len(given) != 1:
        raise BadInput('give exactly one of a text ("cribriform glands"), --image FILE or --tile ID')
    engine = Engine(settings)
    result = engine.cases(
        text=args.text,
        image=read_image(args.image, settings) if args.image is not None else None,
        tile_id=args.tile,
        top_tiles=args.top_tiles,
        per_case=args.per_case,
        k=args.k,
        filters=_filters(args),
        options=options_of(args),
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for case in result["results"]:
        slides = ", ".join(s["slide"] or "-" for s in case["slides"])
        print(f"{case['rank']:>3}  {case['score']:.4f}  case {case['case']}  {case['hits']} hits  slides: {slides}")
    if not result["results"]:
        print("no cases")
    return 0


def cmd_describe(args: argparse.Namespace, settings: Settings) -> int:
    from search.engine.engine import Engine

    if (args.image is None) == (args.tile is None):
        raise BadInput("give --image FILE (an uploaded patch) or --tile ID (an indexed tile)")
    engine = Engine(settings)
    image = read_image(args.image, settings) if args.image is not None else None
    result = engine.describe(tile_id=args.tile, image=image, k=args.k, corpus=args.corpus, tta=args.result_tta)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for item in result["results"]:
        print(f"{item['rank']:>3}  {item['score']:.4f}  [{item['corpus']}] {item['text']}")
    if not result["results"]:
        print("no texts embedded: run `histosearch index` (the vocabulary) or `histosearch index-texts FILE`")
    return 0


def _filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help="only tiles of this source (path or id)")
    parser.add_argument("--slide", help="only tiles of this slide")
    parser.add_argument("--case", help="only tiles of this case")
    parser.add_argument("--meta", action="append", metavar="KEY=VALUE", help="only tiles with this metadata")


def add_query(sub: argparse._SubParsersAction) -> None:
    query = sub.add_parser("query", help="print the top tiles for a text or an image")
    query.add_argument("text", nargs="?", help="a morphology description")
    query.add_argument("--image", type=Path, help="an image file (image -> image)")
    query.add_argument("--tile", type=int, help="an indexed tile id (tiles like it)")
    query.add_argument("--exclude-case", action="store_true", help="with --tile: leave out the tile's own case")
    query.add_argument("-k", type=int, default=10, help="how many results (default 10)")
    query.add_argument("--json", action="store_true", help="machine-readable output")
    _filter_options(query)
    add_result_options(query)
    model_options(query)
    query.set_defaults(func=cmd_query)


def add_cases(sub: argparse._SubParsersAction) -> None:
    cases = sub.add_parser("cases", help="print the cases nearest to a text, an image or a tile")
    cases.add_argument("text", nargs="?", help="a morphology description")
    cases.add_argument("--image", type=Path, help="an image file")
    cases.add_argument("--tile", type=int, help="an indexed tile id")
    cases.add_argument("-k", type=int, default=20, help="how many cases (default 20)")
    cases.add_argument("--top-tiles", type=int, default=200, help="nearest tiles grouped into cases (default 200)")
    cases.add_argument("--per-case", type=int, default=3, help="best tiles averaged per case (default 3)")
    cases.add_argument("--json", action="store_true", help="machine-readable output")
    _filter_options(cases)
    add_result_options(cases)
    model_options(cases)
    cases.set_defaults(func=cmd_cases)


def add_describe(sub: argparse._SubParsersAction) -> None:
    describe = sub.add_parser("describe", help="image -> text: the captions and terms nearest to a patch or a tile")
    describe.add_argument("--image", type=Path, help="an image file (a patch)")
    describe.add_argument("--tile", type=int, help="an indexed tile id")
    describe.add_argument("-k", type=int, default=10, help="how many texts (default 10)")
    describe.add_argument("--corpus", help="only texts of this corpus")
    describe.add_argument(
        "--tta", dest="result_tta", action=argparse.BooleanOptionalAction, help="average over 8 rotations/flips"
    )
    describe.add_argument("--json", action="store_true", help="machine-readable output")
    model_options(describe)
    describe.set_defaults(func=cmd_describe)
