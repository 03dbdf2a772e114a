"""Evaluation runs (`histosearch eval`): the list, one run with per-class bars and its confusion matrix; JSON twins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from ..charts import class_bars, confusion_matrix
from ..deps import EngineDep, RunId
from ..pages import render
from ..urls import eval_run_links

router = APIRouter()

Limit = Annotated[int, Query(ge=1, le=500, description="runs to list, newest first")]


@router.get("/eval", response_class=HTMLResponse, include_in_schema=False)
def runs_page(request: Request, engine: EngineDep, limit: Limit = 50) -> HTMLResponse:
    return render(request, "eval_runs.html", {"page": "eval", "runs": engine.store.eval_runs(limit=limit)})


@router.get("/eval/{run_id}", response_class=HTMLResponse, include_in_schema=False)
def run_page(request: Request, engine: EngineDep, run_id: RunId, metric: str | None = None) -> HTMLResponse:
    run = eval_run_links(engine.store.get_eval_run(run_id))
    report = run["report"]
    per_class = report.get("per_class") or []
    metrics = [name for name in (per_class[0] if per_class else {}) if name not in ("label", "n")]
    chosen = metric if metric in metrics else (metrics[0] if metrics else None)
    context = {
        "page": "eval",
        "run": run,
        "metrics": metrics,
        "metric": chosen,
        "bars": class_bars(per_class, chosen) if chosen else None,
        "confusion": confusion_matrix(report["confusion"]["labels"], report["confusion"]["matrix"])
        if report.get("confusion")
        else None,
    }
    return render(request, "eval_run.html", context)


@router.get("/api/eval/runs", tags=["evaluation"])
def api_runs(engine: EngineDep, limit: Limit = 50) -> list[dict]:
    """Stored evaluation runs, newest first, with their headline metrics and 95 % intervals."""
    return [eval_run_links(run) for run in engine.store.eval_runs(limit=limit)]


@router.get("/api/eval/runs/{run_id}", tags=["evaluation"])
def api_run(engine: EngineDep, run_id: RunId) -> dict:
    """One run whole: dataset hash, model, index build, settings, metrics, per-class figures, confusion matrix."""
    return eval_run_links(engine.store.get_eval_run(run_id))
