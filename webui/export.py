"""Per-page export of ranked results with their metadata: CSV for spreadsheets (JSON is the API answer)."""

from __future__ import annotations

import csv
import io
import json

from fastapi.responses import Response

COLUMNS = ["rank", "tile_id", "score", "z", "percentile", "merged", "source", "path", "case", "slide", "level",
           "x", "y", "width", "height", "mpp", "scale_mismatch", "why", "url", "meta"]  # fmt: skip


def _cell(value: object) -> object:
    # A leading = + - @ makes a spreadsheet evaluate the cell: quote it so metadata cannot run formulas.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return value


def csv_response(result: dict, name: str) -> Response:
    """The page's hits as CSV, one row per result, downloaded as ``name``."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for hit in result["results"]:
        row = {
            **hit,
            "why": "; ".join(term["text"] for term in hit.get("why", [])),
            "meta": json.dumps(hit.get("meta") or {}, sort_keys=True),
        }
        writer.writerow([_cell(row.get(column)) for column in COLUMNS])
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
