"""The `histosearch` command line: one subcommand per job, all reading the one Settings object.

The CLI sits on top of every layer (docs/architecture.md) and imports each one only inside the
commands that use it, so `histosearch --help` or `model info` never loads FAISS, the web app or
the indexer. Options that override a setting are declared with ``_setting_option``, which takes the
type and choices from the Settings model and names the setting as the option's dest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from search.cli_results import add_commands, add_result_options
from search.core.errors import BadInput, ConfigError, HistosearchError
from search.core.settings import Settings, load_settings

if TYPE_CHECKING:
    from PIL import Image

    from indexer.indexer import Indexer
    from search.engine.filters import Filters


def _setting_option(parser: argparse._ActionsContainer, field: str, *flags: str, help: str, **extra: object) -> None:
    """An option that overrides the setting ``field``: its type (or choices) comes from the Settings model."""
    annotation = Settings.model_fields[field].annotation
    members = [annotation]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
    # Annotated[int, Field(ge=1)] -> int: the bounds are checked by the settings, with the setting's name.
    members = [typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a for a in members]
    kwargs: dict = {}
    if members == [bool]:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif len(members) == 1 and typing.get_origin(members[0]) is Literal:
        kwargs["choices"] = list(typing.get_args(members[0]))
    elif len(members) == 1 and members[0] in (str, int, float, Path):
        kwargs["type"] = members[0]
    elif members[0] is int and all(typing.get_origin(m) is Literal for m in members[1:]):
        kwargs["type"] = _int_or([w for m in members[1:] for w in typing.get_args(m)])
    else:
        raise TypeError(f"setting {field}: no command line option for a {annotation!r} value")
    env = f"HISTOSEARCH_{field.upper()}"
    kwargs.update(extra)
    parser.add_argument(*(flags or (f"--{field.replace('_', '-')}",)), dest=field, help=f"{help}; env {env}", **kwargs)


def _int_or(words: list[str]):
    """An option type for a setting that is a number or one of ``words`` (``batch_size``: 64 or auto)."""

    def parse(value: str) -> int | str:
        if value in words:
            return value
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r}: a whole number or {' or '.join(words)}") from None

    return parse


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    _setting_option(group, "model", "--model-config", help="config name (conch_ViT-B-16, conch_tiny) or JSON file")
    _setting_option(group, "checkpoint", help="pytorch_model.bin or .safetensors")
    _setting_option(group, "tokenizer", help="CONCH tokenizer JSON file")
    _setting_option(group, "device", help="auto (default), cpu, cuda, cuda:N")
    _setting_option(group, "dtype", help="auto (default: bf16 on a GPU, fp32 on a CPU); bf16/fp16 on a GPU only")
    _setting_option(group, "batch_size", help="images per encoder batch, or auto (256 on a GPU, 32 on a CPU)")
    _setting_option(group, "compile", help="torch.compile the image tower, at start (for GPUs)")
    _setting_option(group, "gpu_decode", help="decode and resize JPEG tiles on the GPU (nvJPEG; PIL where it refuses)")


def _settings_from(args: argparse.Namespace) -> Settings:
    """The settings, with every option whose dest names a setting (see ``_setting_option``) as an override."""
    return load_settings(**{k: getattr(args, k, None) for k in Settings.model_fields})


def _image_files(paths: list[Path]) -> list[Path]:
    from search.archives.readers.base import IMAGE_EXTENSIONS

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise BadInput(f"{path}: no such file or folder")
    return files


def _read_image(path: Path, settings: Settings) -> Image.Image:
    """An image given on the command line, through the safe decoder: size and pixel limits before decoding."""
    from search.archives.decode import decode_image
    from search.archives.readers.base import byte_limit

    try:
        size = path.stat().st_size
        if size > byte_limit(settings):
            raise BadInput(f"{path}: {size} bytes is larger than any image within max_image_pixels")
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_image(data, str(path), settings.max_image_pixels)


def cmd_embed(args: argparse.Namespace, settings: Settings) -> int:
    import numpy as np

    from search.conch.encoder import DEFAULT_TEMPLATES, Encoder

    images = _image_files(args.image or [])
    texts = list(args.text or [])
    for texts_file in args.texts_file or []:
        if not texts_file.is_file():
            raise BadInput(f"{texts_file}: no such file")
        texts += [line.strip() for line in texts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not images and not texts:
        raise BadInput("nothing to embed: give --image FILE|FOLDER, --text TEXT or --texts-file FILE")
    out: Path = args.out
    if out.suffix not in {".npy", ".npz", ".json"}:
        raise BadInput(f"{out}: the output must end in .npy, .npz or .json")
    if out.suffix == ".npy" and images and texts:
        raise BadInput(f"{out}: one .npy holds one matrix; write images and texts to .npz or .json")
    # Bad images stop the command before the model loads.
    pixels = [_read_image(p, settings) for p in images]
    encoder = Encoder.from_settings(settings)
    image_emb = encoder.encode_images(pixels, project=not args.unprojected)
    text_emb = encoder.encode_texts(texts, templates=DEFAULT_TEMPLATES if args.ensemble else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, image_emb if images else text_emb)
    elif out.suffix == ".npz":
        np.savez(
            out,
            images=image_emb,
            image_paths=np.array([str(p) for p in images]),
            texts=text_emb,
            text_inputs=np.array(texts),
        )
    else:
        records = [
            {"kind": "image", "input": str(p), "embedding": e.tolist()} for p, e in zip(images, image_emb, strict=True)
        ]
        records += [{"kind": "text", "input": t, "embedding": e.tolist()} for t, e in zip(texts, text_emb, strict=True)]
        out.write_text(json.dumps({"model": encoder.fingerprint, "dim": encoder.dim, "embeddings": records}))
    print(f"wrote {len(images)} image and {len(texts)} text embeddings ({encoder.dim}-d) to {out}")
    return 0


def cmd_model_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from search.conch.hub import fetch_checkpoint, resolve_tokenizer

    path = fetch_checkpoint(settings, progress=not args.quiet)
    print(f"checkpoint: {path}")
    print(f"tokenizer: {resolve_tokenizer(settings, path)}")
    return 0


def cmd_model_info(args: argparse.Namespace, settings: Settings) -> int:
    from search.conch.config import get_model_cfg
    from search.conch.encoder import resolve_batch_size, resolve_device, resolve_dtype
    from search.conch.hub import resolve_checkpoint, resolve_tokenizer

    cfg = get_model_cfg(settings.model)
    device = resolve_device(settings.device)
    info = {
        "model": cfg.name,
        "image_size": cfg.vision_cfg.image_size,
        "embed_dim": cfg.embed_dim,
        "context_length": cfg.text_cfg.context_length,
        "device": str(device),
        "dtype": resolve_dtype(settings.dtype, device),
        "batch_size": resolve_batch_size(settings.batch_size, device),
    }
    checkpoint = resolve_checkpoint(settings)
    info["checkpoint"] = str(checkpoint)
    info["tokenizer"] = str(resolve_tokenizer(settings, checkpoint, download=False))
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


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


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from indexer import doctor

    report = doctor.run(settings, repair=args.repair)
    for finding in report.findings:
        print(finding.line())
    if not report.healthy and not args.repair:
        print("run `histosearch doctor --repair` to rebuild what can be rebuilt")
    return 0 if report.healthy else 1


def cmd_backup(args: argparse.Namespace, settings: Settings) -> int:
    from search.storage.database import backup

    if settings.database_url is not None and not settings.database_url.startswith("sqlite"):
        raise ConfigError("backup copies an SQLite database; this one is on a Postgres server: back it up with pg_dump")
    size = backup(settings.db_path, args.path)
    # The vector segment files after the database copy: they are only appended to, so every row the
    # copy names is in them (rows past its counts are cut off by the next append).
    vectors = Path(args.path).with_name(Path(args.path).name + ".vectors")
    source = settings.data_dir / "vectors"
    if source.is_dir():
        shutil.copytree(source, vectors)
    print(
        f"backed up {settings.db_path} to {args.path} ({size} bytes) and its vector files to {vectors}; restore "
        "them as histosearch.db and vectors/ of a data dir. The FAISS index is not copied: "
        "`histosearch doctor --repair` rebuilds it from the stored vectors"
    )
    return 0


INDEX_REPAIR = "run `histosearch doctor --repair` (or `reindex`): it rebuilds the index from the stored vectors"


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from search.engine.engine import Engine

    status = Engine(settings).status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    counts, index, model = status["counts"], status["index"], status["model"]
    print(f"data dir: {settings.data_dir}")
    print(f"model: {model['name']} ({model['embed_dim']}-d, {model['image_size']} px), device {status['device']}")
    print(
        f"tiles: {counts['tiles']} in {counts['sources']} sources, {counts['slides']} slides, {counts['cases']} cases"
    )
    print(f"texts: {counts['texts']}")
    if status["index_problem"]:
        print(f"index: DAMAGED: {status['index_problem']}: {INDEX_REPAIR}")
    if index:
        print(f"index: {index['type']}, {index['size']} vectors, built {index['built_at']} on {index['device']}")
        print(f"index model: {index['model_fingerprint']}")
        checks = index.get("checks")
        if checks:
            print(
                f"index recall@10 vs exact: {checks['recall_at_10']:.3f} over {checks['recall_queries']} queries "
                f"(floor {checks['min_recall']}); calibration sample: {checks['calibration_sample']} tiles"
            )
        else:
            print("index checks: none recorded (built before recall checks: run `histosearch reindex`)")
    elif not status["index_problem"]:
        print("index: none yet (run `histosearch index PATH`)")
    if status["slide_vectors"]:
        kinds = ", ".join(f"{kind} {v['count']}" for kind, v in status["slide_vectors"].items())
        print(f"slide vectors: {kinds}")
    for label, job in (("running", status["running_job"]), ("last run", status["last_job"])):
        if job:
            print(
                f"{label}: {job['kind']} job {job['id']} {job['status']}, {job['done']} tiles, {job['errors']} errors,"
                f" started {job['started_at']}"
            )
    for run in status["eval_runs"][:1]:
        name, figure = next(iter(run["report"]["metrics"].items()))
        print(
            f"last eval: run {run['id']} {run['kind']} on {run['dataset']['name']} ({run['settings']['mode']}), "
            f"{name} {figure['value']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}]"
        )
    errors = status["recent_errors"]
    if errors:
        print(f"recent errors ({len(errors)}):")
        for error in errors[:10]:
            print(f"  {error['path']}: {error['reason']}")
    return 0


def _filters(args: argparse.Namespace) -> Filters:
    from search.engine.filters import Filters

    meta = {}
    for item in args.meta or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInput(f"--meta {item!r}: expected KEY=VALUE")
        meta[key] = value
    return Filters(source=args.source, slide=args.slide, case=args.case, meta=meta)


def cmd_query(args: argparse.Namespace, settings: Settings) -> int:
    from search.cli_results import options_of, print_hits
    from search.engine.engine import Engine

    if sum(x is not None for x in (args.text, args.image, args.tile)) != 1:
        raise BadInput('give one of a text ("cribriform glands"), --image FILE or --tile ID, not both')
    if args.exclude_case and args.tile is None:
        raise BadInput("--exclude-case is for similar-tile queries: give --tile ID")
    engine = Engine(settings)
    filters = _filters(args)
    options = options_of(args, exclude_case="1" if args.exclude_case else None)
    if args.image is not None:
        result = engine.search_image(_read_image(args.image, settings), k=args.k, filters=filters, options=options)
    elif args.tile is not None:
        result = engine.similar(args.tile, k=args.k, filters=filters, options=options)
    else:
        result = engine.search_text(args.text, k=args.k, filters=filters, options=options)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print_hits(result)
    return 0


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

    meta = {}
    for item in args.meta or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInput(f"--meta {item!r}: expected KEY=VALUE")
        meta[key] = value
    filters = {"source": args.source, "slide": args.slide, "case": args.case, "meta": meta}
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


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from webui.server import serve

    serve(settings)
    return 0


def _filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help="only tiles of this source (path or id)")
    parser.add_argument("--slide", help="only tiles of this slide")
    parser.add_argument("--case", help="only tiles of this case")
    parser.add_argument("--meta", action="append", metavar="KEY=VALUE", help="only tiles with this metadata")


def _index_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true", help="wait for another running indexer instead of stopping")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _setting_option(parser, "workers", help="decode worker processes (0: decode in the main process)")
    _setting_option(parser, "index_type", help="FAISS index type (default auto)")
    _setting_option(parser, "ray_address", "--ray", nargs="?", const="auto", metavar="ADDRESS",
                    help="embed on a Ray cluster: its address, or none for the one this machine joined")  # fmt: skip
    _setting_option(parser, "ray_actors", help="embedding actors on the Ray cluster (default: one per GPU)")
    _model_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histosearch", description="Search pathology tile archives with CONCH.")
    _setting_option(parser, "data_dir", help="where the index lives")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = sub.add_parser("model", help="get or inspect the CONCH weights")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    fetch = model_sub.add_parser("fetch", help="download pytorch_model.bin from Hugging Face (needs HF_TOKEN)")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    _model_options(fetch)
    fetch.set_defaults(func=cmd_model_fetch)
    info = model_sub.add_parser("info", help="show the model config, checkpoint and tokenizer in use")
    _model_options(info)
    info.set_defaults(func=cmd_model_info)

    embed = sub.add_parser("embed", help="write CONCH embeddings of images and/or texts to .npy, .npz or .json")
    embed.add_argument("--image", type=Path, action="append", help="an image file or a folder (repeatable)")
    embed.add_argument("--text", action="append", help="a text (repeatable)")
    embed.add_argument("--texts-file", type=Path, action="append", help="a file with one text per line")
    embed.add_argument("--out", "-o", type=Path, required=True, help="output .npy, .npz or .json")
    embed.add_argument("--unprojected", action="store_true", help="image features before the projection")
    embed.add_argument("--ensemble", action="store_true", help="prompt-ensemble the texts")
    _model_options(embed)
    embed.set_defaults(func=cmd_embed)

    index = sub.add_parser("index", help="index folders, zip/tar shards and whole-slide images")
    index.add_argument("paths", type=Path, nargs="+", help="folders, .zip, .tar(.gz), WebDataset shards, slides")
    index.add_argument("--manifest", type=Path, help="CSV mapping files or slides to case_id, slide_id, metadata")
    _index_options(index)
    index.set_defaults(func=cmd_index)

    reindex = sub.add_parser("reindex", help="bring the index in step with its archives (all sources by default)")
    reindex.add_argument("paths", type=Path, nargs="*", help="only these sources")
    reindex.add_argument(
        "--retrain", action="store_true", help="train the index quantiser again instead of adding to the live one"
    )
    _index_options(reindex)
    reindex.set_defaults(func=cmd_reindex)

    remove = sub.add_parser("remove", help="forget sources (archives gone for good) and their tiles")
    remove.add_argument("paths", type=Path, nargs="+", help="sources as indexed (see `histosearch status`)")
    _index_options(remove)
    remove.set_defaults(func=cmd_remove)

    texts = sub.add_parser("index-texts", help="add captions or terms (txt, csv, jsonl) for image -> text")
    texts.add_argument("files", type=Path, nargs="+")
    texts.add_argument("--corpus", help="corpus name (default: the file name)")
    _index_options(texts)
    texts.set_defaults(func=cmd_index_texts)

    doctor = sub.add_parser(
        "doctor", help="check the database, the live index, their counts and stray files; --repair fixes them"
    )
    doctor.add_argument("--repair", action="store_true", help="rebuild the index from the stored vectors, etc.")
    doctor.set_defaults(func=cmd_doctor)

    backup = sub.add_parser("backup", help="write a consistent copy of the database, even while it is in use")
    backup.add_argument("path", type=Path, help="the new backup file (never overwritten)")
    backup.set_defaults(func=cmd_backup)

    status = sub.add_parser("status", help="counts, model, index type, device, last run and errors")
    status.add_argument("--json", action="store_true")
    _model_options(status)
    status.set_defaults(func=cmd_status)

    query = sub.add_parser("query", help="print the top tiles for a text or an image")
    query.add_argument("text", nargs="?", help="a morphology description")
    query.add_argument("--image", type=Path, help="an image file (image -> image)")
    query.add_argument("--tile", type=int, help="an indexed tile id (tiles like it)")
    query.add_argument("--exclude-case", action="store_true", help="with --tile: leave out the tile's own case")
    query.add_argument("-k", type=int, default=10, help="how many results (default 10)")
    query.add_argument("--json", action="store_true", help="machine-readable output")
    _filter_options(query)
    add_result_options(query)
    _model_options(query)
    query.set_defaults(func=cmd_query)

    evaluate = sub.add_parser("eval", help="measure retrieval quality on a labelled set; list and compare runs")
    evaluate.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two run ids side by side")
    evaluate.add_argument("--limit", type=int, default=20, help="runs listed without a subcommand (default 20)")
    evaluate.add_argument("--json", action="store_true", help="machine-readable output")
    _model_options(evaluate)
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
        _model_options(run)

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
        _model_options(command)
        command.set_defaults(func=func)

    add_commands(sub, _filter_options, _model_options)

    serve = sub.add_parser("serve", help="open the web UI (http://127.0.0.1:8000 by default)")
    _setting_option(serve, "host", help="address to bind (default 127.0.0.1)")
    _setting_option(serve, "port", help="port (default 8000)")
    _setting_option(serve, "auth_token", help="require this token")
    _model_options(serve)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings: Settings | None = None
    try:
        settings = _settings_from(args)
        return args.func(args, settings)
    except HistosearchError as exc:
        print(f"histosearch: error: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Expected at this edge: a full disk, a folder that cannot be written. One line with the path.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"histosearch: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from search.storage.database import describe_error

        line = describe_error(exc, settings.db_path) if settings is not None else None
        if line is None:
            raise
        print(f"histosearch: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("histosearch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
