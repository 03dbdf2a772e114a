"""What a ranked query may ask for beyond its text, image or tile: the result page's options."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from search.archives.scale import magnification_mpp, positive_number
from search.core.errors import BadQuery

from .compose import DEFAULT_WEIGHT


@dataclass(frozen=True)
class SearchOptions:
    """Per-query options; None means "the setting"."""

    # Calibrated-score threshold below which the page says there is no confident match.
    min_confidence: float | None = None
    # Results per slide (0: off), adjacent tiles merged.
    max_per_slide: int | None = None
    # Similar-tile searches: leave out the query tile's case (its slide when it has no case).
    exclude_case: bool = False
    # Leave out hits at a very different scale from the query's (setting scale_tolerance).
    same_scale: bool = False
    # The scale an uploaded image was taken at (objective power); tiles state theirs.
    magnification: float | None = None
    # Average an image query over its 8 rotations/flips.
    tta: bool | None = None
    # Composition: texts to add to and remove from the query, at this weight.
    plus: tuple[str, ...] = field(default=())
    minus: tuple[str, ...] = field(default=())
    weight: float = DEFAULT_WEIGHT

    @property
    def mpp(self) -> float | None:
        return magnification_mpp(self.magnification) if self.magnification else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["plus"], out["minus"] = list(self.plus), list(self.minus)
        # Left out: unset (None), off (False) and empty; a 0 (spread off) is a choice and stays.
        return {key: value for key, value in out.items() if value is not None and value is not False and value != []}


def options_from(params: dict) -> SearchOptions:
    """Options from request parameters (strings; repeated ``plus``/``minus`` as lists); BadQuery names a
    bad one."""

    def number(name: str, kind: type) -> float | int | None:
        value = params.get(name)
        if value in (None, ""):
            return None
        try:
            return kind(value)
        except ValueError:
            raise BadQuery(f"{name} must be a number, got {value!r}") from None

    def flag(name: str) -> bool | None:
        value = params.get(name)
        if value in (None, ""):
            return None
        if str(value).lower() in ("1", "true", "on", "yes"):
            return True
        if str(value).lower() in ("0", "false", "off", "no"):
            return False
        raise BadQuery(f"{name} must be on or off, got {value!r}")

    def texts(name: str) -> tuple[str, ...]:
        value = params.get(name) or []
        values = [value] if isinstance(value, str) else list(value)
        return tuple(v.strip() for v in values if isinstance(v, str) and v.strip())

    magnification = params.get("magnification")
    if magnification not in (None, ""):
        magnification = positive_number(magnification)
        if magnification is None:
            shown = params["magnification"]
            raise BadQuery(f"magnification must be a positive number such as 20 or 40x, got {shown!r}")
    else:
        magnification = None
    min_confidence = number("min_confidence", float)
    max_per_slide = number("max_per_slide", int)
    if max_per_slide is not None and max_per_slide < 0:
        raise BadQuery(f"max_per_slide must be 0 (off) or more, got {max_per_slide}")
    weight = number("weight", float)
    return SearchOptions(
        min_confidence=min_confidence,
        max_per_slide=max_per_slide,
        exclude_case=bool(flag("exclude_case")),
        same_scale=bool(flag("same_scale")),
        magnification=magnification,
        tta=flag("tta"),
        plus=texts("plus"),
        minus=texts("minus"),
        weight=DEFAULT_WEIGHT if weight is None else weight,
    )
