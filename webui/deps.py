"""What the routes share: the engine and settings as dependencies, filters, uploads and page rendering."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from PIL import Image

from search.archives.decode import decode_image
from search.core.errors import PayloadTooLarge
from search.core.settings import Settings
from search.engine.engine import Engine, Filters, filters_from

K_CHOICES = (12, 24, 48, 96)
DEFAULT_K = 24
EXAMPLE_QUERIES = (
    "cribriform glands with comedonecrosis",
    "signet ring cells infiltrating the stroma",
    "dense tumour-infiltrating lymphocytes",
    "geographic necrosis with nuclear debris",
    "mitotic figures in sheets of pleomorphic cells",
    "normal colonic mucosa with goblet cells",
)


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_filters(request: Request) -> Filters:
    return filters_from(request.query_params)


async def get_form_filters(request: Request) -> Filters:
    """Filters of a multipart POST: form fields, then query parameters (a form field wins)."""
    form = await request.form()
    return filters_from({**request.query_params, **form})


async def get_uploaded_image(
    request: Request,
    image: Annotated[UploadFile, File(description="the query image: JPEG, PNG, TIFF or WebP")],
) -> Image.Image:
    """The uploaded image, decoded only after its size and pixel count pass the server's limits."""
    settings = get_settings(request)
    data = await image.read(settings.max_upload_bytes + 1)
    name = image.filename or "image"
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"upload {name}: larger than {settings.max_upload_bytes} bytes (setting max_upload_bytes); "
            "send a smaller crop of the region of interest"
        )
    return await run_in_threadpool(decode_image, data, f"upload {name}", settings.max_image_pixels)


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
FiltersDep = Annotated[Filters, Depends(get_filters)]
FormFiltersDep = Annotated[Filters, Depends(get_form_filters)]
UploadedImage = Annotated[Image.Image, Depends(get_uploaded_image)]


def filter_params(filters: Filters) -> dict[str, str]:
    """The query parameters that reproduce ``filters``."""
    params = {name: getattr(filters, name) for name in ("source", "slide", "case") if getattr(filters, name)}
    params.update({f"meta.{key}": value for key, value in filters.meta.items()})
    return params


def url_with(path: str, **params: Any) -> str:
    """``path`` with the given query parameters; None values are left out."""
    query = urlencode({key: value for key, value in params.items() if value is not None})
    return f"{path}?{query}" if query else path


def page_urls(request: Request, result: dict) -> tuple[str | None, str | None]:
    """Previous and next page links of a ranked result, keeping every other query parameter."""
    k, offset = result["k"], result["offset"]
    params = dict(request.query_params)
    prev_url = next_url = None
    if offset > 0:
        prev_url = url_with(request.url.path, **{**params, "offset": max(0, offset - k)})
    if len(result["results"]) == k and offset + k < result["total"]:
        next_url = url_with(request.url.path, **{**params, "offset": offset + k})
    return prev_url, next_url


def render(request: Request, template: str, context: dict, status_code: int = 200) -> HTMLResponse:
    """A page from ``template``; the context never carries the settings (they hold the auth token)."""
    settings = get_settings(request)
    base = {
        "auth_enabled": settings.auth_token is not None,
        "max_query_chars": settings.max_query_chars,
        "page": "",
    }
    if isinstance(context.get("k"), int):
        base["k_choices"] = sorted({*(c for c in K_CHOICES if c <= settings.max_k), context["k"]})
    return request.app.state.templates.TemplateResponse(request, template, {**base, **context}, status_code=status_code)
