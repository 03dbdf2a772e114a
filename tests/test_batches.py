"""Batches through the encode thread: order, reused buffers, two in flight, errors surfacing."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from indexer.batches import BatchEncoder
from indexer.pipeline import Decoded


def decoded(i: int, size: int = 64) -> Decoded:
    pixels = np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return Decoded(f"t{i}", f"h{i}", size, size, pixels)


def test_batches_come_back_in_order_with_the_vectors_of_their_own_tiles(tiny_encoder, monkeypatch):
    monkeypatch.setattr(tiny_encoder, "batch_size", 4)
    tiles = [decoded(i) for i in range(23)]  # 6 batches through 3 reused buffers, the last one short
    batches = BatchEncoder(tiny_encoder, 10**8)
    got = []
    try:
        for i, tile in enumerate(tiles):
            batches.add(i, tile)
            if batches.full():
                got += batches.submit()
        got += batches.finish()
    finally:
        batches.close()
    assert [i for encoded in got for i in encoded.items] == list(range(23))
    vectors = np.concatenate([encoded.vectors for encoded in got])
    want = tiny_encoder.encode_uint8(np.stack([t.pixels for t in tiles]))
    np.testing.assert_allclose(vectors, want, atol=1e-5)
    assert not any(encoded.failed for encoded in got)


class BlockingEncoder:
    """Stands in for a GPU encoder whose batches take a while: each waits for the test to release it."""

    batch_size = 2
    dim = 4
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.release = threading.Semaphore(0)
        self.started = threading.Semaphore(0)
        self.fail = False

    def host_buffer(self, n: int) -> torch.Tensor:
        return torch.empty((n, 8, 8, 3), dtype=torch.uint8)

    def encode_uint8(self, pixels: torch.Tensor) -> np.ndarray:
        self.started.release()
        self.release.acquire()
        if self.fail:
            raise RuntimeError("CUDA error: out of memory")
        return np.repeat(pixels.float().mean(dim=(1, 2, 3)).numpy()[:, None], self.dim, axis=1)


def test_two_batches_in_flight_while_the_next_one_fills():
    encoder = BlockingEncoder()
    batches = BatchEncoder(encoder, 10**8)
    try:
        for batch in range(2):
            for row in range(2):
                batches.add((batch, row), decoded(batch * 2 + row, size=8))
            # Neither batch has finished encoding, yet submit returns: both are in flight.
            assert batches.submit() == []
        assert encoder.started.acquire(timeout=30)  # the first is encoding...
        batches.add((2, 0), decoded(4, size=8))  # ...while the third fills
        assert len(batches) == 1
        encoder.release.release()
        encoder.release.release()
        encoder.release.release()
        done = batches.finish()
    finally:
        batches.close()
    assert [encoded.items for encoded in done] == [[(0, 0), (0, 1)], [(1, 0), (1, 1)], [(2, 0)]]
    want = [decoded(i, size=8).pixels.mean() for i in range(5)]
    np.testing.assert_allclose(np.concatenate([e.vectors[:, 0] for e in done]), want, rtol=1e-5)


def test_an_encoder_error_reaches_the_caller():
    encoder = BlockingEncoder()
    encoder.fail = True
    batches = BatchEncoder(encoder, 10**8)
    try:
        batches.add(0, decoded(0, size=8))
        encoder.release.release()
        with pytest.raises(RuntimeError, match="out of memory"):
            batches.finish()
    finally:
        batches.close()
