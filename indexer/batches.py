"""Decoded tiles on their way through the encoder, a batch at a time, beside the main thread.

Tiles are copied into a reused host buffer as they arrive (pinned memory for a GPU: the upload is one DMA,
with no ``np.stack`` and no staging copy). A full buffer goes to an encode thread, and up to two batches
are in flight there, so while the device encodes one batch the main thread takes results from the decode
workers, fills the next buffer and commits the batch before: the device never waits for the host's SQLite
commit or stacking. Results come back in submission order.

JPEGs left undecoded (``gpu_decode``) are decoded on the encoder's device on that thread; one the device's
decoder refuses is decoded with PIL instead, and only a file PIL refuses too is a failure.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import torch

from indexer.pipeline import Decoded
from search.archives.decode import decode_image
from search.conch.encoder import Encoder
from search.core.errors import BadInput

T = TypeVar("T")


@dataclass
class Encoded(Generic[T]):
    """One batch back from the encoder: the items encoded, their vectors in the same order, and the items
    whose JPEG no decoder could read, with the reason."""

    items: list[T]
    vectors: np.ndarray
    failed: list[tuple[T, str]] = field(default_factory=list)


@dataclass
class _Filling:
    buffer: int
    items: list = field(default_factory=list)
    # row -> (JPEG bytes, locator) for tiles the encoder decodes on its device.
    jpegs: dict[int, tuple[bytes, str]] = field(default_factory=dict)


class BatchEncoder(Generic[T]):
    """``add`` decoded tiles; ``submit`` a full batch; ``finish`` the last one. Both return the batches encoded
    so far, oldest first, for the caller to write; ``close`` stops the encode thread."""

    def __init__(self, encoder: Encoder, max_pixels: int, in_flight: int = 2) -> None:
        self.encoder = encoder
        self.size = encoder.batch_size
        self.max_pixels = max_pixels
        self.in_flight = in_flight
        # One buffer per batch in flight plus the one filling; allocated on first use.
        self._buffers: list[torch.Tensor | None] = [None] * (in_flight + 1)
        self._free = deque(range(in_flight + 1))
        self._pending: deque[tuple[Future, _Filling]] = deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="encode")
        self._filling = _Filling(self._free.popleft())

    def __len__(self) -> int:
        """Tiles in the batch being filled."""
        return len(self._filling.items)

    def add(self, item: T, decoded: Decoded) -> None:
        filling = self._filling
        row = len(filling.items)
        if row >= self.size:
            raise ValueError("batch is full: submit it first")
        if decoded.jpeg is not None:
            filling.jpegs[row] = (decoded.jpeg, decoded.locator)
        else:
            self._buffer(filling.buffer)[row] = torch.from_numpy(decoded.pixels)
        filling.items.append(item)

    def full(self) -> bool:
        return len(self._filling.items) >= self.size

    def submit(self) -> list[Encoded[T]]:
        """Send the batch being filled to the encode thread; wait only while more than ``in_flight`` are there."""
        filling = self._filling
        if filling.items:
            buffer = self._buffer(filling.buffer)
            future = self._executor.submit(self._encode, buffer, len(filling.items), dict(filling.jpegs))
            self._pending.append((future, filling))
        else:
            self._free.append(filling.buffer)
        done = []
        while self._pending and (len(self._pending) > self.in_flight or self._pending[0][0].done()):
            done.append(self._collect())
        self._filling = _Filling(self._free.popleft())
        return done

    def finish(self) -> list[Encoded[T]]:
        """Submit what is left and wait for every batch."""
        done = self.submit()
        while self._pending:
            done.append(self._collect())
        return done

    def close(self) -> None:
        """Stop the encode thread. Batches not started are dropped; one being encoded finishes in the background
        (an interrupted run is marked as such at once, not after a CPU batch of tens of seconds)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _buffer(self, index: int) -> torch.Tensor:
        buffer = self._buffers[index]
        if buffer is None:
            buffer = self._buffers[index] = self.encoder.host_buffer(self.size)
        return buffer

    def _collect(self) -> Encoded[T]:
        future, filling = self._pending.popleft()
        try:
            rows, vectors, failed = future.result()
        finally:
            self._free.append(filling.buffer)
        return Encoded([filling.items[r] for r in rows], vectors, [(filling.items[r], reason) for r, reason in failed])

    def _encode(
        self, buffer: torch.Tensor, n: int, jpegs: dict[int, tuple[bytes, str]]
    ) -> tuple[list[int], np.ndarray, list[tuple[int, str]]]:
        """On the encode thread: (rows encoded, their vectors, (row, reason) of the rows no decoder read)."""
        if not jpegs:
            return list(range(n)), self.encoder.encode_uint8(buffer[:n]), []
        encoder = self.encoder
        pixels = buffer[:n].to(encoder.device, non_blocking=True)
        failed: list[tuple[int, str]] = []
        rows = list(jpegs)
        for row, tile in zip(rows, encoder.decode_jpegs([jpegs[r][0] for r in rows]), strict=True):
            if tile is None:
                data, locator = jpegs[row]
                try:
                    image = decode_image(data, locator, self.max_pixels)
                    tile = torch.from_numpy(encoder.preprocess.resize_crop(image)).to(encoder.device)
                except BadInput as exc:
                    failed.append((row, exc.message))
                    continue
            pixels[row] = tile
        bad = {row for row, _ in failed}
        kept = [r for r in range(n) if r not in bad]
        if not kept:
            return [], np.zeros((0, encoder.dim), np.float32), failed
        if bad:
            pixels = pixels[torch.tensor(kept, device=pixels.device)]
        return kept, encoder.encode_uint8(pixels), failed
