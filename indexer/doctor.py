"""`histosearch doctor`: check a data dir end to end, and with ``repair`` fix what can be rebuilt.

Checked: the database (SQLite's quick_check), the live pointer, the live index file against its
recorded checksum, the stored vectors against the index's count, orphaned build folders and
pointer temp files, and jobs left "running" by a dead process. The index is rebuilt from the
stored vectors (no re-embedding, no model needed); a damaged database cannot be rebuilt and is
reported with what to do.
"""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from search.core.errors import HistosearchError, IndexUnavailable
from search.core.settings import Settings
from search.storage.database import RESTORE, check_database_file
from search.storage.index_directory import POINTER_NAME, IndexDirectory
from search.storage.segmented import SegmentedIndex
from search.storage.store import Store


@dataclass
class Finding:
    check: str
    problem: str | None = None  # None: fine
    fixed: str | None = None  # what --repair did about it

    def line(self) -> str:
        if self.problem is None:
            return f"ok      {self.check}"
        if self.fixed:
            return f"fixed   {self.check}: {self.problem}; {self.fixed}"
        return f"PROBLEM {self.check}: {self.problem}"


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return all(f.problem is None or f.fixed for f in self.findings)


def check_database(path: Path) -> str | None:
    """What is wrong with the database file, or None: header, then SQLite's quick_check."""
    try:
        check_database_file(path)
    except HistosearchError as exc:
        return exc.message
    if not path.exists():
        return f"{path}: no database yet (run `histosearch index PATH`)"
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check")]
    except sqlite3.Error as exc:
        return f"{path}: damaged ({exc}): {RESTORE}"
    if rows != ["ok"]:
        return f"{path}: damaged ({'; '.join(rows[:3])}): {RESTORE}"
    return None


def run(settings: Settings, repair: bool = False) -> Report:
    """Every check in order; with ``repair``, rebuild the index and remove orphans where needed."""
    report = Report()
    # The file check is SQLite's; a Postgres server checks its own pages, and opening the store below reaches it.
    postgres = settings.database_url is not None and not settings.database_url.startswith("sqlite")
    problem = None if postgres else check_database(settings.db_path)
    report.findings.append(Finding("database", problem))
    if problem is not None:
        return report  # nothing else can be trusted, or rebuilt, from a damaged database
    store = Store.from_settings(settings)
    try:
        _check_index(store, IndexDirectory(settings.data_dir / "index"), settings, repair, report)
        stale = store.stale_jobs()
        finding = Finding("jobs", f"jobs {stale} are marked running, their processes are gone" if stale else None)
        if stale and repair:
            store.mark_stale_jobs_interrupted()
            finding.fixed = "marked interrupted"
        report.findings.append(finding)
    finally:
        store.close()
    return report


def _check_index(store: Store, directory: IndexDirectory, settings: Settings, repair: bool, report: Report) -> None:
    live = store.live_build()
    problem = directory.problem(live)
    if problem is None and live is not None:
        problem = _count_problem(store, directory, live, settings)
    finding = Finding("index", problem)
    report.findings.append(finding)
    if problem is not None and repair:
        fingerprint = (live or _last_build(store) or {}).get("model_fingerprint")
        if fingerprint is not None:
            from indexer.indexer import Indexer

            # The lock: an indexer publishing meanwhile must not race this rebuild.
            indexer = Indexer(settings, store=store)
            lock = indexer.lock()
            try:
                build = indexer.build_index(force=True, fingerprint=fingerprint)
            finally:
                lock.release()
            count = build["count"] if build else 0
            finding.fixed = f"rebuilt from the {count} stored vectors (build {build['id'] if build else '-'})"
    orphans = _orphans(store, directory)
    finding = Finding("files", f"orphaned: {', '.join(str(p) for p in orphans)}" if orphans else None)
    if orphans and repair:
        for path in orphans:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        finding.fixed = f"removed {len(orphans)}"
    report.findings.append(finding)


def _count_problem(store: Store, directory: IndexDirectory, live: dict, settings: Settings) -> str | None:
    stored = store.counts()["embedded_by_model"].get(live["model_fingerprint"], 0)
    if stored != live["count"]:
        return f"the live build holds {live['count']} vectors, the database {stored} of its model"
    try:
        index = SegmentedIndex.load(directory.build_dir(live["id"]), "cpu")
    except IndexUnavailable as exc:
        return exc.message
    if index.ntotal != live["count"]:
        return f"the index holds {index.ntotal} vectors, its build record {live['count']}"
    return None


def _last_build(store: Store) -> dict | None:
    builds = store.builds()
    return builds[-1] if builds else None


def _orphans(store: Store, directory: IndexDirectory) -> list[Path]:
    """Build folders no build record names, and pointer temp files a killed publish left."""
    known = {b["id"] for b in store.builds()}
    found = [directory.build_dir(b) for b in directory.build_ids() if b not in known]
    if directory.root.is_dir():
        found += sorted(directory.root.glob(f"{POINTER_NAME}.tmp-*"))
    return found
