"""Evaluation runs: what `histosearch eval` measured, kept for the status page, the eval page and --compare."""

from __future__ import annotations

from sqlalchemy import select

from search.core.errors import NotFound
from search.storage.repository import Repository, iso, utcnow
from search.storage.schema import EvalRun


def _eval_run_dict(run: EvalRun, *, full: bool) -> dict:
    report = run.report
    if not full:
        report = {"n_queries": report.get("n_queries"), "metrics": report.get("metrics", {})}
    return {
        "id": run.id,
        "created_at": iso(run.created_at),
        "kind": run.kind,
        "dataset": {"name": run.dataset_name, "hash": run.dataset_hash, **run.settings.get("dataset", {})},
        "model_fingerprint": run.model_fingerprint,
        "build_id": run.build_id,
        "settings": {k: v for k, v in run.settings.items() if k != "dataset"},
        "report": report,
    }


class EvalRunRepository(Repository):
    def add_eval_run(self, run: dict) -> int:
        """Keep an evaluation run (the dict ``search.evaluation`` returns); returns its id."""
        dataset = run["dataset"]
        with self.session(write=True) as s:
            row = EvalRun(
                created_at=utcnow(),
                kind=run["kind"],
                dataset_name=dataset["name"],
                dataset_hash=dataset["hash"],
                model_fingerprint=run["model_fingerprint"],
                build_id=run.get("build_id"),
                # Path and size ride along in the settings JSON: they describe the set, the hash identifies it.
                settings={**run["settings"], "dataset": {"path": dataset.get("path"), "size": dataset.get("size")}},
                report=run["report"],
            )
            s.add(row)
            s.flush()
            return row.id

    def eval_runs(self, limit: int = 20) -> list[dict]:
        """The newest runs first, with their headline metrics (no per-class figures)."""
        with self.session() as s:
            return [
                _eval_run_dict(r, full=False)
                for r in s.scalars(select(EvalRun).order_by(EvalRun.id.desc()).limit(limit))
            ]

    def get_eval_run(self, run_id: int) -> dict:
        with self.session() as s:
            row = s.get(EvalRun, run_id)
            if row is None:
                raise NotFound(f"no evaluation run with id {run_id}: `histosearch eval` lists them")
            return _eval_run_dict(row, full=True)
