"""Jobs (indexing runs and their progress), index builds, per-file errors and the meta key/value table."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import delete, func, or_, select, update

from search.core.errors import NotFound
from search.storage.dialect import POSTGRES
from search.storage.locks import postgres_holders
from search.storage.repository import Repository, iso, utcnow
from search.storage.schema import BUILD_STATUSES, JOB_STATUSES, Build, FileError, Job, MetaItem


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _job_dict(job: Job) -> dict:
    status, message = job.status, job.message
    if status == "running" and not _pid_alive(job.pid):
        # Shown as it is, read-only: the next indexer writes it down (mark_stale_jobs_interrupted).
        status, message = "interrupted", message or _ended(job.pid)
    return {
        "id": job.id,
        "kind": job.kind,
        "status": status,
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "heartbeat_at": iso(job.heartbeat_at),
        "pid": job.pid,
        "total": job.total,
        "done": job.done,
        "errors": job.errors,
        "message": message,
        "args": job.args,
    }


def _ended(pid: int | None) -> str:
    return f"process {pid} ended without finishing the job"


def _error_dict(error: FileError) -> dict:
    return {
        "id": error.id,
        "job_id": error.job_id,
        "source_id": error.source_id,
        "path": error.path,
        "reason": error.reason,
        "created_at": iso(error.created_at),
    }


def _build_dict(build: Build) -> dict:
    return {
        "id": build.id,
        "created_at": iso(build.created_at),
        "model_fingerprint": build.model_fingerprint,
        "index_type": build.index_type,
        "count": build.count,
        "path": build.path,
        "status": build.status,
        "device": build.device,
        "checksum": build.checksum,
        "checks": build.checks,
    }


class JobRepository(Repository):
    """Index builds, jobs, file errors and meta."""

    def add_build(
        self, model_fingerprint: str, index_type: str, count: int, path: str, device: str, checks: dict | None = None
    ) -> int:
        """Record an index build in progress (status 'building'), with what it was checked against."""
        with self.session(write=True) as s:
            build = Build(
                created_at=utcnow(),
                model_fingerprint=model_fingerprint,
                index_type=index_type,
                count=count,
                path=path,
                status="building",
                device=device,
                checks=checks,
            )
            s.add(build)
            s.flush()
            return build.id

    def set_build_status(self, build_id: int, status: str) -> None:
        """Set a build's status; making one 'live' retires the build that was live before."""
        if status not in BUILD_STATUSES:
            raise ValueError(f"build status {status!r} is not one of {BUILD_STATUSES}")
        with self.session(write=True) as s:
            build = s.get(Build, build_id)
            if build is None:
                raise NotFound(f"no index build with id {build_id}")
            if status == "live":
                s.execute(update(Build).where(Build.status == "live", Build.id != build_id).values(status="retired"))
            build.status = status

    def set_build_checksum(self, build_id: int, checksum: str) -> None:
        """Record the sha256 of a build's index file, checked whenever the file is loaded."""
        with self.session(write=True) as s:
            if s.execute(update(Build).where(Build.id == build_id).values(checksum=checksum)).rowcount == 0:
                raise NotFound(f"no index build with id {build_id}")

    def build_checksum(self, build_id: int) -> str | None:
        with self.session() as s:
            return s.scalar(select(Build.checksum).where(Build.id == build_id))

    def builds(self) -> list[dict]:
        """Every build recorded, oldest first."""
        with self.session() as s:
            return [_build_dict(b) for b in s.scalars(select(Build).order_by(Build.id))]

    def set_build_checks(self, build_id: int, checks: dict) -> None:
        """Record what a build was checked against (recall@10, calibration sample size)."""
        with self.session(write=True) as s:
            build = s.get(Build, build_id)
            if build is None:
                raise NotFound(f"no index build with id {build_id}")
            build.checks = checks

    def live_build(self) -> dict | None:
        with self.session() as s:
            build = s.scalars(select(Build).where(Build.status == "live").order_by(Build.id.desc()).limit(1)).first()
            return _build_dict(build) if build else None

    # --- jobs --------------------------------------------------------------------------------

    def start_job(self, kind: str, args: dict, total: int | None = None) -> int:
        """Record a running job owned by this process."""
        now = utcnow()
        with self.session(write=True) as s:
            job = Job(
                kind=kind,
                status="running",
                started_at=now,
                heartbeat_at=now,
                pid=os.getpid(),
                total=total,
                done=0,
                errors=0,
                args=args,
            )
            s.add(job)
            s.flush()
            return job.id

    def update_job(
        self,
        job_id: int,
        *,
        done: int | None = None,
        total: int | None = None,
        errors: int | None = None,
        message: str | None = None,
    ) -> None:
        """Set the given progress fields and bump the heartbeat."""
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        for name, value in (("done", done), ("total", total), ("errors", errors), ("message", message)):
            if value is not None:
                values[name] = value
        with self.session(write=True) as s:
            if s.execute(update(Job).where(Job.id == job_id).values(**values)).rowcount == 0:
                raise NotFound(f"no job with id {job_id}")

    def finish_job(self, job_id: int, status: str, message: str | None = None) -> None:
        if status not in JOB_STATUSES or status == "running":
            raise ValueError(f"a finished job's status is one of done, failed, interrupted, not {status!r}")
        now = utcnow()
        values: dict[str, Any] = {"status": status, "finished_at": now, "heartbeat_at": now}
        if message is not None:
            values["message"] = message
        with self.session(write=True) as s:
            if s.execute(update(Job).where(Job.id == job_id).values(**values)).rowcount == 0:
                raise NotFound(f"no job with id {job_id}")

    def running_job(self) -> dict | None:
        """The newest job marked running whose process is alive: a killed run is not running."""
        with self.session() as s:
            for job in s.scalars(select(Job).where(Job.status == "running").order_by(Job.id.desc())):
                if _pid_alive(job.pid):
                    return _job_dict(job)
            return None

    def last_job(self) -> dict | None:
        with self.session() as s:
            job = s.scalars(select(Job).order_by(Job.id.desc()).limit(1)).first()
            return _job_dict(job) if job else None

    def stale_jobs(self) -> list[int]:
        """Ids of jobs marked running whose process is gone."""
        with self.session() as s:
            return [j.id for j in s.scalars(select(Job).where(Job.status == "running")) if not _pid_alive(j.pid)]

    def mark_stale_jobs_interrupted(self) -> int:
        """Mark running jobs whose process is gone as interrupted; returns how many.

        On SQLite (a local file) a job is alive while its pid is. On Postgres, shared by several machines, it
        is alive while its process holds the indexer's advisory lock, which the server drops with the process's
        connection (search.storage.locks): jobs run under that lock.
        """
        with self.session(write=True) as s:
            if self.engine.dialect.name == POSTGRES:
                holders = postgres_holders(s.connection())
                alive = lambda pid: pid in holders  # noqa: E731
            else:
                alive = _pid_alive
            stale = [job for job in s.scalars(select(Job).where(Job.status == "running")) if not alive(job.pid)]
            now = utcnow()
            for job in stale:
                job.status = "interrupted"
                job.finished_at = now
                job.message = job.message or _ended(job.pid)
            return len(stale)

    # --- errors and meta ---------------------------------------------------------------------

    def record_error(self, path: str, reason: str, job_id: int | None = None, source_id: int | None = None) -> None:
        """Record that ``path`` of a source cannot be used now. An error is a state of a file: a file already
        in error gets its reason and job updated, not a second row on every run."""
        with self.session(write=True) as s:
            same = FileError.source_id.is_(None) if source_id is None else FileError.source_id == source_id
            error = s.scalars(select(FileError).where(same, FileError.path == path).limit(1)).first()
            if error is None:
                s.add(FileError(path=path, reason=reason, job_id=job_id, source_id=source_id, created_at=utcnow()))
            else:
                error.reason, error.job_id, error.created_at = reason, job_id, utcnow()

    def clear_errors(self, source_id: int | None, *, keep_job: int | None = None, path: str | None = None) -> int:
        """Forget the errors of a source (``None``: errors of inputs that never opened) that ``keep_job`` did not
        record, or the one of ``path``: the files read well now, or are gone. Returns how many."""
        same = FileError.source_id.is_(None) if source_id is None else FileError.source_id == source_id
        query = delete(FileError).where(same)
        if keep_job is not None:
            query = query.where(or_(FileError.job_id.is_(None), FileError.job_id != keep_job))
        if path is not None:
            query = query.where(FileError.path == path)
        with self.session(write=True) as s:
            return s.execute(query).rowcount

    def recent_errors(self, limit: int = 20, job_id: int | None = None) -> list[dict]:
        """The newest file errors first; only those of ``job_id`` when given (the files a run refused)."""
        stmt = select(FileError).order_by(FileError.id.desc()).limit(limit)
        if job_id is not None:
            stmt = stmt.where(FileError.job_id == job_id)
        with self.session() as s:
            return [_error_dict(e) for e in s.scalars(stmt)]

    def count_errors(self, job_id: int) -> int:
        """How many files the job refused."""
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(FileError).where(FileError.job_id == job_id)) or 0

    def get_meta(self, key: str) -> str | None:
        with self.session() as s:
            return s.scalar(select(MetaItem.value).where(MetaItem.key == key))

    def set_meta(self, key: str, value: str) -> None:
        with self.session(write=True) as s:
            s.merge(MetaItem(key=key, value=value))
