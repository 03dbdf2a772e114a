"""Query filters: restrict a search to one source, slide, case and/or tile meta values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from search.core.errors import BadQuery

# Each meta filter is one more JSON scan of every tile: a URL with thousands of them is refused, not run.
MAX_META_FILTERS = 20


@dataclass(frozen=True)
class Filters:
    """Restricts a query to tiles of one source (uri or id), slide, case and/or tile meta values."""

    source: str | None = None
    slide: str | None = None
    case: str | None = None
    meta: Mapping[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.source or self.slide or self.case or self.meta)

    def to_dict(self) -> dict:
        out = {"source": self.source, "slide": self.slide, "case": self.case, "meta": dict(self.meta)}
        return {key: value for key, value in out.items() if value}


def filters_from(params: Mapping[str, Any]) -> Filters:
    """Filters from flat request parameters: ``source``, ``slide``, ``case`` and ``meta.<key>``.

    Empty values (a filter dropdown left at "any") and non-text values (an uploaded file) are ignored.
    """
    text = {key: value for key, value in params.items() if isinstance(value, str) and value}
    meta = {key[5:]: value for key, value in text.items() if key.startswith("meta.") and key[5:]}
    if len(meta) > MAX_META_FILTERS:
        raise BadQuery(f"{len(meta)} meta.<key> filters: at most {MAX_META_FILTERS} can be combined")
    return Filters(source=text.get("source"), slide=text.get("slide"), case=text.get("case"), meta=meta)
