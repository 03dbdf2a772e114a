"""The `histosearch` command line: one subcommand per job, all reading the one Settings object.

The CLI sits on top of every layer (docs/architecture.md) and imports each one only inside the
commands that use it, so `histosearch --help` or `model info` never loads FAISS, the web app or
the indexer. Each module holds one group of commands, their ``cmd_*`` functions and the ``add_*``
functions that declare their subparsers. Options that override a setting are declared with
``setting_option`` (`options.py`), which takes the type and choices from the Settings model and
names the setting as the option's dest.
"""

from __future__ import annotations

import argparse
import sys

from search.cli import admin, evaluation, index, model, query, slides
from search.cli.options import setting_option, settings_from
from search.core.errors import HistosearchError
from search.core.settings import Settings

# In the order `histosearch --help` lists them.
COMMANDS = (
    model.add_model,
    model.add_embed,
    index.add_index,
    index.add_reindex,
    index.add_remove,
    index.add_index_texts,
    admin.add_doctor,
    admin.add_backup,
    admin.add_status,
    query.add_query,
    evaluation.add_eval,
    slides.add_slides,
    query.add_cases,
    query.add_describe,
    admin.add_queries,
    admin.add_serve,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histosearch", description="Search pathology tile archives with CONCH.")
    setting_option(parser, "data_dir", help="where the index lives")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings: Settings | None = None
    try:
        settings = settings_from(args)
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
