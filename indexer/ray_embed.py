"""Embedding on a Ray cluster: the tiles the indexer planned, of every source of the run, are read, decoded and
embedded by one pool of Ray Data actors (``map_batches``), each loading the model once per run, and only their vectors
come back.

The driver stays the single committer. :class:`RayEmbedPool` stands in for the local
:class:`indexer.pipeline.DecodePool`: for each tile it yields its source and a :class:`Decoded` carrying the vector
(or a :class:`Failed`), in plan order, and the indexer writes store and index from them exactly as it writes its own,
batch by batch in one transaction each. So a killed driver resumes like a killed local run (what was committed
stays, the rest is planned again), and a lost worker costs only its batches in flight, which Ray Data retries on a
restarted actor.

Actors read the archives themselves through the same readers the driver planned with (pickled to them): every
node must see the archives at the same path (a shared file system: NFS, Lustre, a FUSE mount of an object store),
and the model checkpoint and tokenizer at the paths the settings give, or in ``cache_dir`` on each node.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from indexer.batches import Encoded
from indexer.pipeline import Decoded, Failed, decode_tile
from search.archives.readers import Reader
from search.conch.encoder import Encoder, resolve_batch_size
from search.core.errors import ConfigError
from search.core.settings import Settings

T = TypeVar("T")

# Sources whose archives an actor keeps open: tiles come source after source, so the one before the current one is
# rarely read again, and a run over thousands of shards would otherwise end with every one of them open.
_OPEN_SOURCES = 2


def _ray() -> Any:
    """The ``ray`` module, imported when a run asks for it: the ``ray`` extra is optional, and heavy to import."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError("ray_address is set but Ray is not installed: pip install 'histosearch[ray]'") from None
    return ray


class _Embedder:
    """One Ray actor: the model, loaded once, and the readers of every source of the run, by source key."""

    def __init__(self, settings: Settings, readers: Mapping[int, Reader], fingerprint: str) -> None:
        self.readers = readers
        self._open: OrderedDict[int, None] = OrderedDict()
        self.encoder = Encoder.from_settings(settings)
        if self.encoder.fingerprint != fingerprint:
            # Another checkpoint on this node would mix two models' vectors in one index.
            raise ConfigError(
                f"the model on this Ray node has fingerprint {self.encoder.fingerprint}, the driver's {fingerprint}: "
                "give every node the same checkpoint"
            )
        self.max_pixels = settings.max_image_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        results = [
            decode_tile(self._reader(int(source)), str(loc), self.encoder.preprocess, self.max_pixels)
            for source, loc in zip(batch["source"], batch["locator"], strict=True)
        ]
        good = [r for r in results if isinstance(r, Decoded)]
        vectors = np.zeros((len(results), self.encoder.dim), np.float32)
        if good:
            pixels = torch.from_numpy(np.stack([r.pixels for r in good]))
            encoded = self.encoder.encode_uint8(pixels)
            rows = [i for i, r in enumerate(results) if isinstance(r, Decoded)]
            vectors[rows] = encoded
        return {
            "source": batch["source"],
            "locator": np.array([r.locator for r in results], dtype=object),
            "reason": np.array([r.reason if isinstance(r, Failed) else "" for r in results], dtype=object),
            "content_hash": np.array([r.content_hash if isinstance(r, Decoded) else "" for r in results], dtype=object),
            "width": np.array([r.width if isinstance(r, Decoded) else 0 for r in results], dtype=np.int64),
            "height": np.array([r.height if isinstance(r, Decoded) else 0 for r in results], dtype=np.int64),
            "vector": vectors,
        }

    def _reader(self, source: int) -> Reader:
        self._open[source] = None
        self._open.move_to_end(source)
        while len(self._open) > _OPEN_SOURCES:
            self.readers[self._open.popitem(last=False)[0]].close()
        return self.readers[source]


class RayEmbedPool:
    """Decodes and embeds tiles on a Ray cluster; ``embed`` yields them with their vectors, in plan order."""

    def __init__(self, settings: Settings, fingerprint: str) -> None:
        self._ray = ray = _ray()
        self.settings = settings
        self.fingerprint = fingerprint
        # A Ray already running in this process (a notebook, the tests) is used as it is, and left running.
        self._owns = not ray.is_initialized()
        if self._owns:
            try:
                ray.init(address=settings.ray_address, log_to_driver=False)
            except ConnectionError as exc:
                raise ConfigError(
                    f"ray_address={settings.ray_address}: no Ray cluster there ({exc}); start one with "
                    "`ray start --head` (docs/deployment.md)"
                ) from None
        gpus = int(ray.cluster_resources().get("GPU", 0))
        self.actors = settings.ray_actors or max(gpus, 1)
        self.gpus_per_actor = 1 if gpus else 0
        # What an actor's encoder resolves "auto" to on its device: one Ray batch is one encoder batch.
        self.batch_size = resolve_batch_size(settings.batch_size, torch.device("cuda" if gpus else "cpu"))

    def embed(
        self, readers: Mapping[int, Reader], tiles: list[tuple[int, str]]
    ) -> Iterator[tuple[int, Decoded | Failed]]:
        """``tiles``: (source key in ``readers``, locator) of every tile of the run to embed, in plan order; yielded
        back in that order with their results. Each call starts a pool of actors, each loading the model: make one
        per run, for the tiles of all its sources."""
        ray = self._ray
        if not tiles:
            return
        rows = [{"source": source, "locator": locator} for source, locator in tiles]
        context = ray.data.DataContext.get_current()
        preserve = context.execution_options.preserve_order
        # In plan order, so tiles are committed (and given ids) in the order a local run commits them.
        context.execution_options.preserve_order = True
        try:
            # Ray Data restarts a lost actor and retries its batches by default (max_restarts=-1).
            dataset = ray.data.from_items(rows).map_batches(
                _Embedder,
                fn_constructor_kwargs={"settings": self.settings, "readers": readers, "fingerprint": self.fingerprint},
                batch_size=self.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=self.actors),
                num_gpus=self.gpus_per_actor,
                num_cpus=0 if self.gpus_per_actor else 1,
            )
        finally:
            context.execution_options.preserve_order = preserve
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for i, locator in enumerate(batch["locator"]):
                result: Decoded | Failed
                if batch["reason"][i]:
                    result = Failed(str(locator), str(batch["reason"][i]))
                else:
                    result = Decoded(
                        str(locator),
                        str(batch["content_hash"][i]),
                        int(batch["width"][i]),
                        int(batch["height"][i]),
                        None,
                        vector=np.asarray(batch["vector"][i], dtype=np.float32),
                    )
                yield int(batch["source"][i]), result

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()


class EmbeddedBatches(Generic[T]):
    """What :class:`indexer.batches.BatchEncoder` does for tiles that arrive embedded already: batches of
    ``size`` items with their vectors, for the indexer to write."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: list[T] = []
        self._vectors: list[np.ndarray] = []

    def add(self, item: T, decoded: Decoded) -> None:
        self._items.append(item)
        self._vectors.append(decoded.vector)

    def full(self) -> bool:
        return len(self._items) >= self.size

    def submit(self) -> list[Encoded[T]]:
        encoded = Encoded(self._items, np.stack(self._vectors))
        self._items, self._vectors = [], []
        return [encoded]

    def finish(self) -> list[Encoded[T]]:
        return self.submit() if self._items else []

    def close(self) -> None:
        self._items, self._vectors = [], []
