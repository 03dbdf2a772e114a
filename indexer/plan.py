"""What changed in one source: the reader's listing against the tiles the store holds from it.

A tile listed with the fingerprint and model it was embedded with is unchanged and not read again; a new
tile, one whose cheap fingerprint moved, and one embedded by another model are work (the embedding step
re-reads them and re-embeds only what the content hash or the model says changed); a stored tile no longer
listed is removed, but only when the listing reached its end.
"""

from __future__ import annotations

from dataclasses import dataclass

from indexer.job import Job, where
from indexer.report import SourceReport
from search.archives.readers import Reader, Skipped, TileEntry
from search.core.errors import BadInput
from search.storage.store import TileState


@dataclass(frozen=True)
class Work:
    entry: TileEntry
    state: TileState | None  # None: a new tile


@dataclass(frozen=True)
class Plan:
    work: list[Work]
    # Ids of the stored tiles the listing no longer names; None when the listing was cut short, which must
    # not read as "every later tile was removed".
    removed: list[int] | None


def plan(reader: Reader, existing: dict[str, TileState], fingerprint: str, job: Job, report: SourceReport) -> Plan:
    """``existing``: the source's stored tiles by locator; ``fingerprint``: the model's. Unchanged tiles and
    files the reader skipped are counted in ``report`` (the skipped ones recorded as the job's errors)."""
    work: list[Work] = []
    seen: set[str] = set()
    uri = report.uri
    try:
        for item in reader.scan():
            if isinstance(item, Skipped):
                job.error(report, where(reader, uri, item.path), item.reason, item.path)
                continue
            seen.add(item.locator)
            state = existing.get(item.locator)
            if state and state.fingerprint == item.fingerprint and state.model_fingerprint == fingerprint:
                report.unchanged += 1
            else:
                work.append(Work(item, state))
    except (BadInput, OSError, EOFError) as exc:
        reason = exc.message if isinstance(exc, BadInput) else f"listing failed ({exc})"
        job.error(report, uri, reason, str(reader.root), reader.root.name)
        return Plan(work, None)
    return Plan(work, [state.id for locator, state in existing.items() if locator not in seen])
