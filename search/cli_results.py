"""The `histosearch` commands that ask questions of the index: query options, `cases`, `describe`,
`queries` (the query log); `search.cli` registers them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from search.core.errors import BadInput
from search.core.settings import Settings


def add_result_options(parser: argparse.ArgumentParser) -> None:
    """Options every ranked query takes (issue 10): calibration, spread, scale, rotation, composition."""
    group = parser.add_argument_group("results")
    # Per-query options, not settings: their dests are kept apart from the setting names (see _setting_option).
    group.add_argument(
        "--min-confidence", dest="result_min_confidence", type=float, help="z below which no match is confident"
    )
    group.add_argument(
        "--max-per-slide", dest="result_max_per_slide", type=int, help="results per slide, adjacent merged (0: off)"
    )
    group.add_argument("--same-scale", action="store_true", help="leave out hits at a very different scale")
    group.add_argument("--magnification", help="the query image's objective power, e.g. 20 or 40x")
    group.add_argument(
        "--tta",
        dest="result_tta",
        action=argparse.BooleanOptionalAction,
        help="average an image query over its 8 rotations/flips",
    )
    group.add_argument("--plus", action="append", metavar="TEXT", help="a text to add to the query (repeatable)")
    group.add_argument("--minus", action="append", metavar="TEXT", help="a text to remove (repeatable)")
    group.add_argument("--weight", type=float, help="weight of the added/removed texts (default 0.5)")


def options_of(args: argparse.Namespace, **extra: Any):
    from search.engine.options import options_from

    params: dict[str, Any] = {
        "min_confidence": args.result_min_confidence,
        "max_per_slide": args.result_max_per_slide,
        "same_scale": "1" if args.same_scale else None,
        "magnification": args.magnification,
        "tta": None if args.result_tta is None else str(int(args.result_tta)),
        "plus": args.plus or [],
        "minus": args.minus or [],
        "weight": args.weight,
        **extra,
    }
    return options_from(params)


def print_hits(result: dict) -> None:
    """A ranked result as one line per hit, with the calibration verdict and each hit's best terms."""
    query = result["query"]
    if query.get("searched") and query["searched"] != query.get("text"):
        print(f"searched for: {query['searched']}")
    calibration = result.get("calibration") or {}
    if result["results"] and calibration.get("available") and not calibration.get("confident"):
        print(
            f"no confident match: the best hit's z {calibration['best_z']:.1f} is below {calibration['threshold']} "
            "(setting min_confidence); these hits are no better than chance"
        )
    for hit in result["results"]:
        where = f" x={hit['x']} y={hit['y']}" if hit.get("x") is not None else ""
        z = f" z={hit['z']:.1f}" if hit.get("z") is not None else ""
        merged = f" (+{hit['merged'] - 1} adjacent)" if hit.get("merged", 1) > 1 else ""
        print(
            f"{hit['rank']:>3}  {hit['score']:.4f}{z}  tile {hit['tile_id']:<8} case={hit['case'] or '-'} "
            f"slide={hit['slide'] or '-'}{where}{merged}  {hit['path']}"
        )
        if hit.get("why"):
            print(f"       looks like: {'; '.join(t['text'] for t in hit['why'])}")
    if not result["results"]:
        print("no results")


def _read_image(path: Path, settings: Settings):
    from search.cli import _read_image as read

    return read(path, settings)


def cmd_cases(args: argparse.Namespace, settings: Settings) -> int:
    from search.cli import _filters
    from search.engine.engine import Engine

    given = [x for x in (args.text, args.image, args.tile) if x is not None]
    if len(given) != 1:
        raise BadInput('give exactly one of a text ("cribriform glands"), --image FILE or --tile ID')
    engine = Engine(settings)
    result = engine.cases(
        text=args.text,
        image=_read_image(args.image, settings) if args.image is not None else None,
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
    image = _read_image(args.image, settings) if args.image is not None else None
    result = engine.describe(tile_id=args.tile, image=image, k=args.k, corpus=args.corpus, tta=args.result_tta)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for item in result["results"]:
        print(f"{item['rank']:>3}  {item['score']:.4f}  [{item['corpus']}] {item['text']}")
    if not result["results"]:
        print("no texts embedded: run `histosearch index` (the vocabulary) or `histosearch index-texts FILE`")
    return 0


def cmd_queries(args: argparse.Namespace, settings: Settings) -> int:
    from search.engine.engine import Engine

    log = Engine(settings).query_log(args.limit)
    if args.json:
        print(json.dumps(log, indent=2))
        return 0
    if not log["enabled"]:
        print("the query log is off (setting query_log); older entries follow")
    for e in log["entries"]:
        what = e["text"] or (f"image {e['image_hash']}" if e["image_hash"] else f"tile {e['tile_id']}")
        timing = f"{e['results']:>4} results  {e['duration_ms']:>7.1f} ms  build {e['build_id']}"
        print(f"{e['at']}  {e['kind']:<5}  {timing}  {what}")
    if not log["entries"]:
        print("no queries logged")
    return 0


def add_commands(sub: argparse._SubParsersAction, filter_options, model_options) -> None:
    """Register `cases`, `describe` and `queries` on the top-level parser's subcommands."""
    cases = sub.add_parser("cases", help="print the cases nearest to a text, an image or a tile")
    cases.add_argument("text", nargs="?", help="a morphology description")
    cases.add_argument("--image", type=Path, help="an image file")
    cases.add_argument("--tile", type=int, help="an indexed tile id")
    cases.add_argument("-k", type=int, default=20, help="how many cases (default 20)")
    cases.add_argument("--top-tiles", type=int, default=200, help="nearest tiles grouped into cases (default 200)")
    cases.add_argument("--per-case", type=int, default=3, help="best tiles averaged per case (default 3)")
    cases.add_argument("--json", action="store_true", help="machine-readable output")
    filter_options(cases)
    add_result_options(cases)
    model_options(cases)
    cases.set_defaults(func=cmd_cases)

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

    queries = sub.add_parser("queries", help="the query log, newest first (setting query_log)")
    queries.add_argument("--limit", type=int, default=50, help="how many entries (default 50)")
    queries.add_argument("--json", action="store_true", help="machine-readable output")
    model_options(queries)
    queries.set_defaults(func=cmd_queries)
