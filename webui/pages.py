"""Page rendering: the Jinja templates, their filters and URL helpers, and the context every page gets."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from search.core.errors import HistosearchError
from search.engine.filters import Filters, filters_from

from . import urls
from .copy import EXAMPLE_QUERIES, UPLOAD_FORMATS
from .privacy import for_client, is_admin, source_label

TEMPLATES = Path(__file__).parent / "templates"
K_CHOICES = (12, 24, 48, 96)
DEFAULT_K = 24
# Pages that show a query form: their errors are shown on the page itself, with the query kept.
QUERY_PAGES = {"/": "search.html", "/search/image": "search.html", "/cases": "cases.html", "/cases/image": "cases.html"}
# A filter with at most this many values is a dropdown; with more, a text field with a typeahead.
DROPDOWN_MAX = 12


def make_templates() -> Jinja2Templates:
    """The page templates, with the ``when`` filter and the tile and evaluation URL builders as globals."""
    templates = Jinja2Templates(directory=TEMPLATES)
    templates.env.trim_blocks = templates.env.lstrip_blocks = True
    templates.env.filters["when"] = when
    templates.env.globals.update(
        tile_url=urls.tile_url,
        thumbnail_url=urls.thumbnail_url,
        image_url=urls.image_url,
        eval_run_url=urls.eval_run_url,
        slide_url=urls.slide_url,
        upload_url=urls.upload_url,
        url_with=urls.url_with,
        with_filter=urls.with_filter,
        back_here=urls.back_here,
        relative=relative,
        DROPDOWN_MAX=DROPDOWN_MAX,
    )
    templates.env.filters["megabytes"] = megabytes
    return templates


def query_context(request: Request, page: str, filters: Filters, q: str = "", k: int = DEFAULT_K) -> dict:
    """What every page with the query forms shows: the filters (values with counts, chips to remove the
    ones in force), the upload limits, and banners for what stops queries (no index, no model)."""
    engine = request.app.state.engine
    settings = request.app.state.settings
    facets = engine.facets()
    if not is_admin(request):
        sources = facets["sources"]
        labelled = [{**v, "label": source_label(v["label"])} for v in sources["values"]]
        facets = {**facets, "sources": {**sources, "values": labelled}}
    labels = {v["value"]: v["label"] for v in facets["sources"]["values"]}
    return {
        "page": page,
        "q": q,
        "k": k,
        "filters": filters,
        "facets": facets,
        "chips": urls.filter_chips(request, filters, labels),
        "filter_params": urls.filter_params(filters),
        "examples": EXAMPLE_QUERIES,
        "banners": banners(request),
        "upload": {
            "formats": UPLOAD_FORMATS,
            "max_bytes": settings.max_upload_bytes,
            "max_pixels": settings.max_upload_pixels,
        },
        "card_fields": settings.card_fields,
        "result": None,
    }


def banners(request: Request) -> list[dict]:
    """What stops every query, said before the first one: the command that fixes it, the model's own error."""
    ready = request.app.state.engine.readiness()
    out = []
    if not ready["index"]:
        out.append(
            {
                "kind": "index",
                "text": "Nothing is indexed yet, so searches have nothing to find. Index a folder or archive of tiles:",
                "command": "histosearch index /path/to/tiles",
            }
        )
    if ready["model_error"]:
        out.append(
            {
                "kind": "model",
                "text": "The CONCH model could not be loaded, so text and image searches cannot run:",
                "detail": for_client(request, ready["model_error"]),
                "command": "HF_TOKEN=<your token> histosearch model fetch",
            }
        )
    return out


def render_query_page(request: Request, template: str, error: dict) -> HTMLResponse:
    """The query page with ``error`` shown inline above the forms, and the query and filters kept."""
    params = request.query_params
    try:
        filters = filters_from(params)
    except HistosearchError:
        filters = Filters()
    k = int(params["k"]) if params.get("k", "").isdigit() and 0 < int(params["k"]) <= 10_000 else DEFAULT_K
    page = "cases" if template == "cases.html" else "search"
    try:
        context = query_context(request, page, filters, params.get("q", ""), k)
    except HistosearchError:
        context = {"page": page, "q": params.get("q", ""), "k": k, "filters": filters, "facets": None, "result": None}
    context["error"] = error
    return render(request, template, context, status_code=error["status"])


def render(request: Request, template: str, context: dict, status_code: int = 200) -> HTMLResponse:
    """A page from ``template``; the context never carries the settings (they hold the auth token)."""
    settings = request.app.state.settings
    base = {
        "auth_enabled": settings.auth_token is not None,
        "max_query_chars": settings.max_query_chars,
        "page": "",
    }
    if isinstance(context.get("k"), int):
        base["k_choices"] = sorted({*(c for c in K_CHOICES if c <= settings.max_k), context["k"]})
    return request.app.state.templates.TemplateResponse(request, template, {**base, **context}, status_code=status_code)


def relative(score: float, best: float) -> int:
    """A score as a share of the best on the page, 0-100: cosine similarities of text queries sit around
    0.2-0.4, so raw values read as weak matches; a share of the page's best does not, and is never negative."""
    if best <= 0:
        return 0
    return max(0, min(100, round(100 * score / best)))


def megabytes(size: int) -> str:
    """A byte count for people: '20 MB'."""
    return f"{size / 1_048_576:.0f} MB" if size >= 1_048_576 else f"{size / 1024:.0f} kB"


def when(iso: str | None) -> str:
    """An ISO timestamp from the store as '2025-01-31 14:05 UTC' for people."""
    if not iso:
        return ""
    moment = datetime.fromisoformat(iso).astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M UTC")
