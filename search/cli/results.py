"""Ranked results on the command line: the options every ranked query takes, and one line per hit."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search.engine.options import SearchOptions


def add_result_options(parser: argparse.ArgumentParser) -> None:
    """Options every ranked query takes (issue 10): calibration, spread, scale, rotation, composition."""
    group = parser.add_argument_group("results")
    # Per-query options, not settings: their dests are kept apart from the setting names (see setting_option).
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


def options_of(args: argparse.Namespace, **extra: Any) -> SearchOptions:
    """The result options given, as the engine takes them; ``extra`` adds options that only some commands have."""
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
