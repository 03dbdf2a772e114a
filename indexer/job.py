"""An indexing run's row in ``jobs``: its counts as it goes, the files it could not use, how it ended.

`histosearch status` and the web UI read the row while the run goes on; a run that raises leaves it failed or
interrupted, with the reason in one line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from indexer.report import RunReport, SourceReport
from search.archives.readers import Reader
from search.core.errors import HistosearchError
from search.storage.database import describe_error
from search.storage.store import Store


@dataclass
class Job:
    store: Store
    report: RunReport
    # What the row says when the run ends well.
    message: str | None = None

    @property
    def id(self) -> int:
        return self.report.job_id

    def save_counts(self) -> None:
        """The run's counts so far over every source, those being synced included (a source's report joins the run's
        when the source is started): written with each commit, so `status` shows the whole run, never one source's
        share of it."""
        self.store.update_job(self.id, done=self.report.tiles, errors=self.report.errors)

    def error(self, report: SourceReport, where: str, reason: str, *prefixes: str) -> str:
        """Record that ``where`` cannot be used now. ``reason`` loses a leading ``prefix: `` naming the file
        again: the record already names it."""
        for prefix in prefixes:
            if reason.startswith(f"{prefix}: "):
                reason = reason[len(prefix) + 2 :]
                break
        self.store.record_error(where, reason, job_id=self.id, source_id=report.source_id)
        report.errors += 1
        return reason


@contextmanager
def record_job(store: Store, kind: str, args: dict, db_path: Path) -> Iterator[Job]:
    """A row in ``jobs`` for the run in the block (status, `histosearch status`): done with ``job.message``
    when the block ends, failed or interrupted when it raises."""
    store.mark_stale_jobs_interrupted()
    job = Job(store, RunReport(store.start_job(kind, args)))
    try:
        yield job
    except KeyboardInterrupt:
        job.save_counts()
        store.finish_job(job.id, "interrupted", "interrupted by the user")
        raise
    except Exception as exc:
        try:
            job.save_counts()
            store.finish_job(job.id, "failed", _reason(exc, db_path))
        except Exception:  # noqa: BLE001 - a full disk may refuse this write too; `status` then shows
            pass  # the job interrupted by its dead pid, and the original error is what is raised
        raise
    job.save_counts()
    store.finish_job(job.id, "done", job.message)


def where(reader: Reader, uri: str, path: str) -> str:
    """A file of an input as people find it in the error records: its own path in a folder,
    ``archive:member`` otherwise."""
    if reader.kind == "folder" and path not in ("", "."):
        return os.path.join(uri, path)
    return f"{uri}:{path}" if path not in ("", ".", reader.root.name) else uri


def _reason(exc: Exception, db_path: Path) -> str:
    """What a failed job's record says: one line, the path included, no traceback."""
    if isinstance(exc, HistosearchError):
        return exc.message
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    return describe_error(exc, db_path) or str(exc)
