"""The `eval` command: measure retrieval quality on a labelled set, list the runs kept, compare two."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from search.cli.inputs import meta_of
from search.cli.options import model_options
from search.core.errors import BadInput
from search.core.settings import Settings


def _run_id(value: str) -> int:
    if not value.isdigit():
        raise BadInput(f"--compare {value!r}: expected a run id (see `histosearch eval --list`)")
    return int(value)


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from search.evaluation.compare import compare_runs, format_comparison
    from search.storage.store import Store

    store = Store.from_settings(settings)
    try:
        if args.compare:
            a, b = (store.get_eval_run(_run_id(value)) for value in args.compare)
            comparison = compare_runs(a, b)
            print(json.dumps(comparison, indent=2) if args.json else format_comparison(comparison, a, b))
            return 0
        if args.kind is None:
            runs = store.eval_runs(limit=args.limit)
            if args.json:
                print(json.dumps(runs, indent=2))
            for run in [] if args.json else runs:
                figures = ", ".join(f"{n} {f['value']:.3f}" for n, f in list(run["report"]["metrics"].items())[:3])
                print(f"{run['id']:>4}  {run['created_at']}  {run['kind']:<8} {run['dataset']['name']}  {figures}")
            if not runs and not args.json:
                print("no evaluation runs yet: `histosearch eval tiles FOLDER` runs one")
            return 0
        return _evaluate(args, settings, store)
    finally:
        store.close()


def _evaluate(args: argparse.Namespace, settings: Settings, store) -> int:
    from search.evaluation.compare import format_run
    from search.evaluation.runner import Evaluator, Options

    filters = {"source": args.source, "slide": args.slide, "case": args.case, "meta": meta_of(args.meta)}
    options = Options(
        mode="index" if args.index else "exact",
        k=args.k,
        tta=args.tta,
        pooling=getattr(args, "pooling", "mean"),
        prompt_ensemble=not getattr(args, "no_ensemble", False),
        filters={key: value for key, value in filters.items() if value},
        n_boot=args.bootstrap,
        seed=args.seed,
        progress=not args.quiet,
    )
    evaluator = Evaluator(settings, store)
    if args.kind == "zeroshot":
        run = evaluator.zeroshot(args.path, args.classes, options)
    else:
        run = {"tiles": evaluator.tiles, "slides": evaluator.slides, "pairs": evaluator.pairs}[args.kind](
            args.path, options
        )
    if not args.no_save:
        run = {"id": store.add_eval_run(run), **run}
    print(json.dumps(run, indent=2) if args.json else format_run(run))
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser("eval", help="measure retrieval quality on a labelled set; list and compare runs")
    evaluate.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two run ids side by side")
    evaluate.add_argument("--limit", type=int, default=20, help="runs listed without a subcommand (default 20)")
    evaluate.add_argument("--json", action="store_true", help="machine-readable output")
    model_options(evaluate)
    evaluate.set_defaults(func=cmd_eval, kind=None)
    kinds = evaluate.add_subparsers(dest="kind", metavar="KIND")
    for kind, help_text, path_help in (
        ("tiles", "image -> image: Acc@1/3/5, mMV@5, mAP@k, leave-one-case-out", "a folder of class folders, or a CSV"),
        ("slides", "slide -> slide (mean of tile vectors): Acc@1/3/5, MVAcc@3, leave-one-patient-out",
         "a CSV path,label,case_id,slide_id"),
        ("zeroshot", "text -> image: class prompts, accuracy, balanced accuracy, precision@k",
         "a folder of class folders, or a CSV"),
        ("pairs", "text <-> image Recall@1/5/10/50 and mean recall", "a CSV image,caption or a JSONL file"),
    ):  # fmt: skip
        run = kinds.add_parser(kind, help=help_text)
        run.add_argument("path", type=Path, help=path_help)
        if kind == "zeroshot":
            run.add_argument("--classes", type=Path, help="CSV label,names (names: name|synonym|...)")
            run.add_argument("--no-ensemble", action="store_true", help="class names alone, without prompt templates")
        if kind == "slides":
            run.add_argument("--pooling", choices=["mean", "medoid"], default="mean",
                             help="slide vectors: mean (default) or medoid (docs/slides.md)")  # fmt: skip
        mode = run.add_mutually_exclusive_group()
        mode.add_argument("--exact", action="store_true", help="embed the set and search it by brute force (default)")
        mode.add_argument(
            "--index", action="store_true", help="search the live index (ANN, filters) for the set's tiles"
        )
        run.add_argument("--k", type=int, default=10, help="depth of mAP@k / precision@k, extra Recall@k (default 10)")
        run.add_argument(
            "--tta", action="store_true", help="--exact: average each tile over flips and a 180-degree turn"
        )
        run.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
        run.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
        run.add_argument("--source", help="--index: only tiles of this source (path or id)")
        run.add_argument("--slide", help="--index: only tiles of this slide")
        run.add_argument("--case", help="--index: only tiles of this case")
        run.add_argument("--meta", action="append", metavar="KEY=VALUE", help="--index: only tiles with this metadata")
        run.add_argument("--no-save", action="store_true", help="do not keep the run in the database")
        run.add_argument("--quiet", action="store_true", help="no progress bar")
        run.add_argument("--json", action="store_true", help="machine-readable output")
        model_options(run)
