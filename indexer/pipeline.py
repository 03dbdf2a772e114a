"""Decode tiles in parallel workers and stream them, batched, through the encoder.

Workers read a tile through its reader, hash its bytes, decode it safely and resize/crop it to the
model's input, then send back uint8 pixels (4x smaller than float); the encoder normalises them on
its device. At most a few chunks per worker are in flight, so memory stays bounded however large
the archive, and the workers decode ahead while the encoder runs.

Each worker gets the decode options once (the pool initializer) and unpickles a source's reader once,
keeping it and its open archive for every later chunk of that source: reopening a 100k-member zip or
re-walking a tar's headers per chunk cost more than decoding the chunk.

Pixels come back through shared memory: each chunk in flight has a block the worker writes its tiles into,
and the main process reads them there (the indexer copies each straight into its batch buffer) instead of
unpickling ~600 kB per tile from a pipe. Where /dev/shm is too small for the blocks (a container's 64 MB
default), pixels travel pickled as before.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import shared_memory

import numpy as np
from PIL import Image, UnidentifiedImageError

from search.archives.decode import content_hash, decode_image
from search.archives.readers import Reader
from search.conch.preprocess import Preprocess
from search.core.errors import BadInput

log = logging.getLogger(__name__)

# Tiles per task sent to a worker: large enough that the per-task cost (a pipe round trip, a reader
# lookup) is small beside decoding, small enough that ~2 chunks per worker in flight bound memory.
CHUNK = 32
# Readers a worker keeps open: the current source and the one before it (its last chunks may still run).
_WORKER_READERS = 2


def default_workers() -> int:
    """Decode workers for a GPU encoder: the CPUs this process may run on (its affinity, which a container's
    cpuset limits, unlike os.cpu_count), less one for the main process that feeds the GPU."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus - 1)


@dataclass(frozen=True)
class Decoded:
    locator: str
    content_hash: str
    width: int
    height: int
    pixels: np.ndarray | None  # [S, S, 3] uint8, or None when `jpeg` is left for the encoder to decode
    jpeg: bytes | None = None
    # Between a worker and DecodePool.decode only: the row of the chunk's shared block holding the pixels.
    shared_row: int | None = None
    vector: np.ndarray | None = None  # already embedded, by a Ray actor (indexer/ray_embed.py)


@dataclass(frozen=True)
class Failed:
    locator: str
    reason: str


def decode_tile(
    reader: Reader, locator: str, preprocess: Preprocess, max_pixels: int, jpeg_passthrough: bool = False
) -> Decoded | Failed:
    """Read, hash, decode and resize/crop one tile. With ``jpeg_passthrough``, a baseline RGB JPEG is only
    checked from its header and sent as it is, for the encoder to decode (and resize) on its device;
    progressive JPEGs, which nvJPEG decodes one at a time on the host, are decoded here."""
    try:
        data = reader.read(locator)
        if jpeg_passthrough and isinstance(data, bytes) and data[:2] == b"\xff\xd8":
            size = _baseline_rgb_jpeg_size(data)
            if size is not None and 0 < size[0] * size[1] <= max_pixels:
                return Decoded(locator, content_hash(data), size[0], size[1], None, jpeg=data)
        image = decode_image(data, locator, max_pixels)
        return Decoded(locator, content_hash(data), image.width, image.height, preprocess.resize_crop(image))
    except BadInput as exc:
        return Failed(locator, exc.message)
    except (OSError, ValueError, KeyError, EOFError) as exc:
        return Failed(locator, f"{locator}: unreadable ({type(exc).__name__}: {exc})")


def _baseline_rgb_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Width and height of a non-progressive RGB JPEG from its header, or None."""
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            if image.mode != "RGB" or image.info.get("progressive") or image.info.get("progression"):
                return None
            return image.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        return None


def _decode_chunk(
    reader: Reader, locators: list[str], preprocess: Preprocess, max_pixels: int, jpeg_passthrough: bool
) -> list:
    return [decode_tile(reader, loc, preprocess, max_pixels, jpeg_passthrough) for loc in locators]


# A worker process's state: the options from the pool initializer, and its open readers by source key.
_worker: dict = {}


def _init_worker(preprocess: Preprocess, max_pixels: int, jpeg_passthrough: bool) -> None:
    _exit_with_parent()
    _worker.update(preprocess=preprocess, max_pixels=max_pixels, passthrough=jpeg_passthrough, readers=OrderedDict())


def _worker_chunk(key: int, pickled_reader: bytes, locators: list[str], block: str | None = None) -> list:
    readers: OrderedDict[int, Reader] = _worker["readers"]
    reader = readers.get(key)
    if reader is None:
        reader = readers[key] = pickle.loads(pickled_reader)
        while len(readers) > _WORKER_READERS:
            readers.popitem(last=False)[1].close()
    readers.move_to_end(key)
    results = _decode_chunk(reader, locators, _worker["preprocess"], _worker["max_pixels"], _worker["passthrough"])
    if block is None:
        return results
    rows = _rows(_attached(block), len(locators), _worker["preprocess"].image_size)
    for i, result in enumerate(results):
        if isinstance(result, Decoded) and result.pixels is not None:
            rows[i] = result.pixels
            results[i] = replace(result, pixels=None, shared_row=i)
    return results


def _attached(name: str) -> shared_memory.SharedMemory:
    # Attached once per worker; the parent owns (and unlinks) the blocks.
    blocks: dict[str, shared_memory.SharedMemory] = _worker.setdefault("blocks", {})
    if name not in blocks:
        blocks[name] = shared_memory.SharedMemory(name)
    return blocks[name]


def _rows(block: shared_memory.SharedMemory, n: int, size: int) -> np.ndarray:
    return np.ndarray((n, size, size, 3), np.uint8, buffer=block.buf)


class _SharedBlocks:
    """One shared-memory block per chunk in flight, each the pixels of a full chunk."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        nbytes = CHUNK * size * size * 3
        self.blocks: list[shared_memory.SharedMemory] = []
        try:
            for _ in range(count):
                self.blocks.append(shared_memory.SharedMemory(create=True, size=nbytes))
        except OSError:
            self.close()
            raise
        self.free = deque(range(count))

    @staticmethod
    def fit(count: int, size: int) -> bool:
        """Whether /dev/shm has room for the blocks: past it, writing one would kill the worker (SIGBUS)."""
        try:
            free = shutil.disk_usage("/dev/shm").free
        except OSError:
            return False
        return free >= 2 * count * CHUNK * size * size * 3

    def close(self) -> None:
        for block in self.blocks:
            with contextlib.suppress(BufferError):  # a caller still holds a view: the mapping goes with it
                block.close()
            block.unlink()
        self.blocks = []


class DecodePool:
    """Ordered, bounded parallel decoding; ``workers=0`` decodes in the calling process."""

    def __init__(
        self,
        workers: int,
        preprocess: Preprocess,
        max_pixels: int,
        jpeg_passthrough: bool = False,
        shared: bool = True,
    ) -> None:
        self.workers = workers
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.jpeg_passthrough = jpeg_passthrough
        self._sources = 0
        self._limit = 2 * workers + 1
        self._blocks = None
        if workers > 0 and shared and _SharedBlocks.fit(self._limit, preprocess.image_size):
            try:
                self._blocks = _SharedBlocks(self._limit, preprocess.image_size)
            except OSError as exc:
                log.warning("no shared memory for decoded pixels (%s): they travel pickled", exc)
        # spawn: the parent holds torch (and maybe CUDA) state that a forked child must not inherit.
        self._executor = (
            ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(preprocess, max_pixels, jpeg_passthrough),
            )
            if workers > 0
            else None
        )

    def decode(self, reader: Reader, locators: Iterable[str]) -> Iterator[Decoded | Failed]:
        """Results in the order of ``locators``. With workers, a result's pixels may be a view of shared memory
        that the next chunk reuses: valid until the next result is taken, so a caller that keeps them copies."""
        chunks = _chunked(locators, CHUNK)
        if self._executor is None:
            for chunk in chunks:
                yield from _decode_chunk(reader, chunk, self.preprocess, self.max_pixels, self.jpeg_passthrough)
            return
        # Pickled once per source (without its open handles); each worker unpickles it on its first chunk.
        self._sources += 1
        key, pickled = self._sources, pickle.dumps(reader)
        in_flight: deque[tuple[Future, int | None]] = deque()
        blocks = self._blocks
        try:
            for chunk in chunks:
                slot = blocks.free.popleft() if blocks else None
                name = blocks.blocks[slot].name if blocks else None
                in_flight.append((self._executor.submit(_worker_chunk, key, pickled, chunk, name), slot))
                if len(in_flight) >= self._limit:
                    yield from self._results(*in_flight.popleft())
            while in_flight:
                yield from self._results(*in_flight.popleft())
        finally:
            # Stopped early: a block goes back only once its worker is done writing to it.
            for future, slot in in_flight:
                future.cancel()
                with contextlib.suppress(Exception):
                    future.result()
                if blocks:
                    blocks.free.append(slot)

    def _results(self, future: Future, slot: int | None) -> Iterator[Decoded | Failed]:
        try:
            results = future.result()
            if slot is None:
                yield from results
                return
            rows = _rows(self._blocks.blocks[slot], len(results), self.preprocess.image_size)
            for result in results:
                if isinstance(result, Decoded) and result.shared_row is not None:
                    result = replace(result, pixels=rows[result.shared_row], shared_row=None)
                yield result
        finally:
            if slot is not None:
                self._blocks.free.append(slot)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
        if self._blocks is not None:
            self._blocks.close()
            self._blocks = None

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _exit_with_parent() -> None:
    """In a worker: exit as soon as the parent process is gone. Killed with kill -9, the parent never
    tells its workers to stop, and each would otherwise wait for work forever holding its memory."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _chunked(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
