"""The commands that look after an installation: its state (`status`, `queries`), its repair (`doctor`), its
`backup`, and serving it (`serve`)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from search.cli.options import model_options, setting_option
from search.core.errors import ConfigError
from search.core.settings import Settings

INDEX_REPAIR = "run `histosearch doctor --repair` (or `reindex`): it rebuilds the index from the stored vectors"


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
            if checks.get("nprobe"):
                print(
                    f"index nprobe: {checks['nprobe']} of {checks['nlist']} lists, the fewest reaching recall@10 "
                    f"{checks['target_recall']} (setting target_recall)"
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


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from webui.server import serve

    serve(settings)
    return 0


def add_doctor(sub: argparse._SubParsersAction) -> None:
    doctor = sub.add_parser(
        "doctor", help="check the database, the live index, their counts and stray files; --repair fixes them"
    )
    doctor.add_argument("--repair", action="store_true", help="rebuild the index from the stored vectors, etc.")
    doctor.set_defaults(func=cmd_doctor)


def add_backup(sub: argparse._SubParsersAction) -> None:
    backup = sub.add_parser("backup", help="write a consistent copy of the database, even while it is in use")
    backup.add_argument("path", type=Path, help="the new backup file (never overwritten)")
    backup.set_defaults(func=cmd_backup)


def add_status(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="counts, model, index type, device, last run and errors")
    status.add_argument("--json", action="store_true")
    model_options(status)
    status.set_defaults(func=cmd_status)


def add_queries(sub: argparse._SubParsersAction) -> None:
    queries = sub.add_parser("queries", help="the query log, newest first (setting query_log)")
    queries.add_argument("--limit", type=int, default=50, help="how many entries (default 50)")
    queries.add_argument("--json", action="store_true", help="machine-readable output")
    model_options(queries)
    queries.set_defaults(func=cmd_queries)


def add_serve(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="open the web UI (http://127.0.0.1:8000 by default)")
    setting_option(serve, "host", help="address to bind (default 127.0.0.1)")
    setting_option(serve, "port", help="port (default 8000)")
    setting_option(serve, "auth_token", help="require this token")
    model_options(serve)
    serve.set_defaults(func=cmd_serve)
