"""Decode tiles in parallel workers and stream them, batched, through the encoder.

Workers read a tile through its reader, hash its bytes, decode it safely and resize/crop it to the
model's input, then send back uint8 pixels (4x smaller than float); the encoder normalises them on
its device. At most a few chunks per worker are in flight, so memory stays bounded however large
the archive, and the workers decode ahead while the encoder runs.
"""

from __future__ import annotations

import io
import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from search.archives.decode import content_hash, decode_image
from search.archives.readers import Reader
from search.conch.preprocess import Preprocess
from search.core.errors import BadInput

CHUNK = 16


@dataclass(frozen=True)
class Decoded:
    locator: str
    content_hash: str
    width: int
    height: int
    pixels: np.ndarray | None  # [S, S, 3] uint8, or None when `jpeg` is left for the encoder to decode
    jpeg: bytes | None = None


@dataclass(frozen=True)
class Failed:
    locator: str
    reason: str


def decode_tile(
    reader: Reader, locator: str, preprocess: Preprocess, max_pixels: int, jpeg_passthrough: bool = False
) -> Decoded | Failed:
    """Read, hash, decode and resize/crop one tile. With ``jpeg_passthrough``, an RGB JPEG already at the
    model's input size needs no resize: it is only checked from its header and sent as it is."""
    try:
        data = reader.read(locator)
        if jpeg_passthrough and isinstance(data, bytes) and data[:2] == b"\xff\xd8":
            size = _jpeg_size(data)
            if size == (preprocess.image_size, preprocess.image_size):
                return Decoded(locator, content_hash(data), size[0], size[1], None, jpeg=data)
        image = decode_image(data, locator, max_pixels)
        return Decoded(locator, content_hash(data), image.width, image.height, preprocess.resize_crop(image))
    except BadInput as exc:
        return Failed(locator, exc.message)
    except (OSError, ValueError, KeyError, EOFError) as exc:
        return Failed(locator, f"{locator}: unreadable ({type(exc).__name__}: {exc})")


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Width and height of a baseline/progressive RGB JPEG from its header, or None."""
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            return image.size if image.mode == "RGB" else None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        return None


def _decode_chunk(
    reader: Reader, locators: list[str], preprocess: Preprocess, max_pixels: int, jpeg_passthrough: bool
) -> list:
    return [decode_tile(reader, loc, preprocess, max_pixels, jpeg_passthrough) for loc in locators]


class DecodePool:
    """Ordered, bounded parallel decoding; ``workers=0`` decodes in the calling process."""

    def __init__(self, workers: int, preprocess: Preprocess, max_pixels: int, jpeg_passthrough: bool = False) -> None:
        self.workers = workers
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.jpeg_passthrough = jpeg_passthrough
        # spawn: the parent holds torch (and maybe CUDA) state that a forked child must not inherit.
        self._executor = (
            ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 0 else None
        )

    def decode(self, reader: Reader, locators: Iterable[str]) -> Iterator[Decoded | Failed]:
        chunks = _chunked(locators, CHUNK)
        if self._executor is None:
            for chunk in chunks:
                yield from _decode_chunk(reader, chunk, self.preprocess, self.max_pixels, self.jpeg_passthrough)
            return
        in_flight: deque[Future] = deque()
        limit = 3 * self.workers + 1
        for chunk in chunks:
            in_flight.append(
                self._executor.submit(
                    _decode_chunk, reader, chunk, self.preprocess, self.max_pixels, self.jpeg_passthrough
                )
            )
            if len(in_flight) >= limit:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunked(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
