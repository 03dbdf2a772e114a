"""Filter values with their tile counts: what the filter fields offer, and their typeahead."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from ..deps import EngineDep
from ..privacy import is_admin, source_label

router = APIRouter()

MAX_VALUES = 200


def labelled(request: Request, facet: dict) -> dict:
    """A source facet with labels this client may see: the archive's name, its full path for the admin."""
    if is_admin(request):
        return facet
    return {**facet, "values": [{**v, "label": source_label(v["label"])} for v in facet["values"]]}


@router.get("/api/facets/{field}", tags=["facets"])
def api_facet(
    request: Request,
    engine: EngineDep,
    field: Annotated[str, Path(max_length=200, description="source, case, slide or meta.<column>")],
    prefix: Annotated[str, Query(max_length=200, description="only values containing this (any case)")] = "",
    limit: Annotated[int, Query(ge=1, le=MAX_VALUES, description="most values to return")] = 50,
) -> dict:
    """A filter field's values containing ``prefix``, most tiles first, each with its tile count; ``distinct``
    says how many values match in all. Sources are named by id, with a ``label``."""
    facet = engine.facet(field, prefix, limit)
    return {"field": field, **(labelled(request, facet) if field == "source" else facet)}
