"""Image -> text for an uploaded patch: the captions and terms nearest to it (a tile's are on its page)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query

from ..deps import EngineDep, UploadedImage

router = APIRouter()

DescribeK = Annotated[int, Query(ge=1, description="how many texts")]
Corpus = Annotated[str | None, Query(description="only texts of this corpus")]


@router.get("/api/describe", tags=["describe"])
def api_describe_ref(
    engine: EngineDep,
    image: Annotated[str, Query(description="the image reference an upload returned")],
    k: DescribeK = 10,
    corpus: Corpus = None,
    tta: Annotated[bool | None, Query(description="average over the 8 rotations/flips")] = None,
) -> dict:
    """Image -> text for an image uploaded before (by its reference, which survives a restart)."""
    return engine.describe(image=image, k=k, corpus=corpus, tta=tta)


@router.post("/api/describe/image", tags=["describe"])
def api_describe_image(
    engine: EngineDep,
    image: UploadedImage,
    k: Annotated[int, Form(ge=1)] = 10,
    corpus: Annotated[str | None, Form()] = None,
    tta: Annotated[bool | None, Form()] = None,
) -> dict:
    """Image -> text for an uploaded patch (multipart field ``image``): the embedded captions and terms
    nearest to it. The answer's ``query.image`` names the kept upload for later requests."""
    return engine.describe(image=image, k=k, corpus=corpus or None, tta=tta)
