"""The `slides` commands: slide-level search, text -> slide (`slides query`) and similar slides (`slides similar`)."""

from __future__ import annotations

import argparse
import json

from search.cli.options import model_options
from search.core.settings import Settings


def _print_slides(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for hit in result["results"]:
        print(f"{hit['rank']:>3}  {hit['score']:.4f}  slide {hit['slide_key']:<20} case={hit['case_key'] or '-'} "
              f"tiles={hit['n_tiles']}")  # fmt: skip
    if not result["results"]:
        print("no results")


def cmd_slides_query(args: argparse.Namespace, settings: Settings) -> int:
    from search.engine.engine import Engine

    result = Engine(settings).slides.search_text(args.text, k=args.k, method=args.method)
    if not args.json:
        how = "WSC-attention-weighted tile scores" if args.method == "attention" else "best tile scores"
        print(f"slides ranked by {how}")
    _print_slides(result, args.json)
    return 0


def cmd_slides_similar(args: argparse.Namespace, settings: Settings) -> int:
    from search.engine.engine import Engine

    result = Engine(settings).slides.similar(args.slide, kind=args.kind, k=args.k, same_case=args.same_case)
    if not args.json:
        method = result["method"]
        print(f"similar to {result['query']['slide_key']} by {result['kind']}: {method['description']} "
              f"({method['method']}, model {method['model_fingerprint']})")  # fmt: skip
    _print_slides(result, args.json)
    return 0


def add_slides(sub: argparse._SubParsersAction) -> None:
    slides = sub.add_parser("slides", help="slide-level search: text -> slide, similar slides")
    slides_sub = slides.add_subparsers(dest="slides_command", required=True, metavar="ACTION")
    slides_query = slides_sub.add_parser("query", help="slides ranked for a text by their best tiles")
    slides_query.add_argument("text", help="a morphology description")
    slides_query.add_argument("--method", choices=["tiles", "attention"], default="tiles",
                              help="tiles: mean of the best tile scores (default); attention: WSC")  # fmt: skip
    slides_similar = slides_sub.add_parser("similar", help="slides like SLIDE (id or key) by a slide-vector kind")
    slides_similar.add_argument("slide", help="slide id or key")
    slides_similar.add_argument("--kind", choices=["mean", "medoid", "wsc"], default="mean",
                                help="slide-vector kind (default mean)")  # fmt: skip
    slides_similar.add_argument("--same-case", action="store_true", help="keep the slide's own case's other slides")
    for command, func in ((slides_query, cmd_slides_query), (slides_similar, cmd_slides_similar)):
        command.add_argument("-k", type=int, default=10, help="how many slides (default 10)")
        command.add_argument("--json", action="store_true", help="machine-readable output")
        model_options(command)
        command.set_defaults(func=func)
