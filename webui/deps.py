"""What the routes depend on: the engine and settings, query filters and the uploaded image."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, File, Path, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from search.core.errors import PayloadTooLarge
from search.core.settings import Settings
from search.engine.engine import Engine
from search.engine.filters import Filters, filters_from
from search.engine.options import SearchOptions, options_from


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_filters(request: Request) -> Filters:
    return filters_from(request.query_params)


def _option_params(params) -> dict:
    # The last value of a repeated field wins: a checkbox follows a hidden "0" of the same name, so an
    # unticked box still says "off" rather than "the default".
    out = {key: params.getlist(key)[-1] for key in params if isinstance(params.getlist(key)[-1], str)}
    out["plus"], out["minus"] = params.getlist("plus"), params.getlist("minus")
    return out


def get_options(request: Request) -> SearchOptions:
    """Result options from query parameters (``plus``/``minus`` repeatable)."""
    return options_from(_option_params(request.query_params))


async def get_form_options(request: Request) -> SearchOptions:
    """Result options of a multipart POST: query parameters, then form fields (a form field wins)."""
    form = await request.form()
    return options_from({**_option_params(request.query_params), **_option_params(form)})


async def get_form_filters(request: Request) -> Filters:
    """Filters of a multipart POST: form fields, then query parameters (a form field wins)."""
    form = await request.form()
    return filters_from({**request.query_params, **form})


async def get_uploaded_image(
    request: Request,
    image: Annotated[UploadFile, File(description="the query image: JPEG, PNG, TIFF or WebP")],
) -> Image.Image:
    """The uploaded image, decoded only after its size and pixel count pass the upload limits."""
    settings = get_settings(request)
    data = await image.read(settings.max_upload_bytes + 1)
    name = image.filename or "image"
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"upload {name}: larger than {settings.max_upload_bytes} bytes (setting max_upload_bytes); "
            "send a smaller crop of the region of interest"
        )
    return await run_in_threadpool(request.app.state.upload_decoder, data, f"upload {name}")


# Ids are SQLite's signed 64-bit integers: a larger number names no tile (and would overflow the query).
MAX_ID = 2**63 - 1
TileId = Annotated[int, Path(ge=0, le=MAX_ID, description="a tile id")]
TileQuery = Annotated[int | None, Query(ge=0, le=MAX_ID, description="an indexed tile id")]
RunId = Annotated[int, Path(ge=0, le=MAX_ID, description="an evaluation run id")]

EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
FiltersDep = Annotated[Filters, Depends(get_filters)]
FormFiltersDep = Annotated[Filters, Depends(get_form_filters)]
UploadedImage = Annotated[Image.Image, Depends(get_uploaded_image)]
OptionsDep = Annotated[SearchOptions, Depends(get_options)]
FormOptionsDep = Annotated[SearchOptions, Depends(get_form_options)]
