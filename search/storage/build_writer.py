"""Writing builds of index segments (their layout: ``segmented.py``): a full build that trains a new
quantiser, a merge of every live vector into one part without training, and an incremental build that links
the live build's parts and adds a part and deleted ids; and what a publish reads of the live build to choose
between them (``indexer/build.py``)."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np

from search.storage.gpu import _gpu_for, _resolve_device
from search.storage.index_directory import MANIFEST_NAME
from search.storage.index_types import IVF_TYPES, _new_index, choose_index_type
from search.storage.segmented import DELETED_NAME, TRAINED_NAME, Manifest, _ids_name, _locations_name
from search.storage.vectors import VectorIndex, _as_ids, save_index

TRAINED_TYPES = IVF_TYPES
# A publish that would leave more parts than this, or more deleted ids than this share, merges the parts.
MAX_PARTS = 8
MAX_DELETED_SHARE = 0.2

# What a part is written from: (tile ids, vectors, locations of those vectors in the vector files, -1 unknown).
LocatedBatch = tuple[np.ndarray, np.ndarray, np.ndarray]
# A fresh pass over a part's batches at each call: an IVF part reads them twice.
Batches = Callable[[], Iterable[LocatedBatch]]


def choose_kind(n: int, requested: str = "auto", exact_max: int = 20_000, compress_above: int = 1_000_000) -> str:
    """The index type for ``n`` vectors: exact up to ``exact_max``, IVF-Flat up to ``compress_above``,
    IVF-SQ8 (4x smaller, re-ranked on the stored vectors) past it; or ``requested`` itself.

    Not IVF-PQ: its 128 codebooks of 256 centroids took 220 s to train on 20k vectors on 2 busy cores,
    where IVF-SQ8 trains no more than IVF-Flat's k-means."""
    if requested == "auto" and n > compress_above:
        return "ivfsq8"
    return choose_index_type(n, requested, exact_max)


def _copy(index: faiss.Index) -> faiss.Index:
    return faiss.deserialize_index(faiss.serialize_index(index))


def _first_pass(inner: faiss.Index, batches: Batches) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray]]:
    """Reads every batch once: their ids and locations (None without batches) in order, and each batch's list
    numbers where ``inner`` is IVF; any other ``inner`` gets the vectors added, as IDMap2 adds them."""
    ivf = isinstance(inner, faiss.IndexIVF)
    ids, locations, lists = [], [], []
    for chunk, vectors, located in batches():
        ids.append(_as_ids(chunk))
        locations.append(np.asarray(located, dtype=np.int64))
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if ivf:
            # int32: a list number is below nlist (at most 65,536); 40 MB at 10M vectors instead of 80.
            lists.append(inner.quantizer.assign(x, 1).reshape(-1).astype(np.int32))
        else:
            inner.add(x)
        # Let go before the next batch is read: else two batches (2 x 128 MB at 65,536 x 512) are held at once.
        del vectors, x
    if not ids:
        return np.zeros(0, np.int64), None, lists
    return np.concatenate(ids), np.concatenate(locations), lists


def _reserve(ivf: faiss.IndexIVF, lists: list[np.ndarray]) -> None:
    """Gives each (empty) inverted list the capacity of what it will hold: a list grown a vector at a time
    doubles its capacity, up to twice its codes. Resizing an empty std::vector allocates exactly the size, and
    shrinking it back keeps that allocation."""
    counts = np.zeros(ivf.nlist, np.int64)
    for numbers in lists:
        counts += np.bincount(numbers[numbers >= 0], minlength=ivf.nlist)
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    for list_no in np.flatnonzero(counts):
        invlists.resize(int(list_no), int(counts[list_no]))
        invlists.resize(int(list_no), 0)


def _second_pass(ivf: faiss.IndexIVF, batches: Batches, lists: list[np.ndarray]) -> None:
    """Encodes each batch into the lists the first pass chose (``add`` without assigning them again), with the
    lists sized first."""
    _reserve(ivf, lists)
    batch = 0
    for _, vectors, _ in batches():
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if batch == len(lists) or len(x) != len(lists[batch]):
            raise RuntimeError("the batches of an index part changed between its two passes")
        numbers = lists[batch].astype(np.int64)
        ivf.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(numbers))
        del vectors, x  # as in the first pass
        batch += 1
    if batch != len(lists):
        raise RuntimeError("the batches of an index part changed between its two passes")


def _trim_heap() -> None:
    """Hands the heap's free pages back to the kernel (glibc ``malloc_trim``); a no-op on other C libraries.

    A freed part's lists otherwise stay in the process's anonymous memory wherever a live allocation above
    them pins the heap, and the checks that follow a build count them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _write_part(build_dir: Path, name: str, trained: faiss.Index, batches: Batches) -> int:
    """A part cloned from ``trained`` holding the vectors of ``batches`` (read twice for IVF types), saved as
    ``name`` with its sorted ids and their locations; returns its size.

    The same index, list order included, as ``add_with_ids`` batch by batch, with less memory at its peak:
    IVF lists sized exactly (``_reserve``), and none of IDMap2's id -> position hash map (a node per vector),
    which a saved index does not hold (``read_index`` builds it again)."""
    index = _copy(trained)
    inner = faiss.downcast_index(index.index)
    ids, locations, lists = _first_pass(inner, batches)
    # Written before the lists fill, so that the sort's temporaries do not add to the peak.
    order = np.argsort(ids, kind="stable")
    np.save(build_dir / _ids_name(name), ids[order])
    if locations is not None:
        np.save(build_dir / _locations_name(name), locations[order])
    # IDMap2's own add would also fill its id -> position hash map.
    faiss.copy_array_to_vector(ids, index.id_map)
    del order, locations, ids
    if isinstance(inner, faiss.IndexIVF):
        _second_pass(inner, batches, lists)
        del lists
        # reconstruct (the exact path of filtered queries) needs the id -> list map.
        inner.make_direct_map()
    index.ntotal = inner.ntotal
    save_index(index, build_dir / name)
    size = int(index.ntotal)
    del index
    _trim_heap()
    return size


@dataclass(frozen=True)
class Built:
    """What a publish needs of the live build, read without loading its parts."""

    manifest: Manifest
    ids: np.ndarray  # sorted live ids
    deleted: np.ndarray

    @classmethod
    def read(cls, build_dir: Path) -> Built | None:
        """None for a build written before segments (one ``index.faiss``): it has nothing to add to."""
        if not (build_dir / MANIFEST_NAME).is_file():
            return None
        manifest = Manifest.read(build_dir)
        parts = [np.load(build_dir / _ids_name(name)) for name in manifest.parts]
        every = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        deleted = np.load(build_dir / DELETED_NAME) if manifest.deleted else np.zeros(0, np.int64)
        return cls(manifest, np.setdiff1d(every, deleted, assume_unique=True), deleted)


def write_full(
    build_dir: Path,
    build_id: int,
    *,
    kind: str,
    fingerprint: str,
    n: int,
    sample: np.ndarray,
    batches: Batches,
    device: str = "auto",
    nprobe: int | None = None,
) -> Manifest:
    """Train a new quantiser on ``sample`` (IVF types) and write one part holding ``batches`` (n vectors)."""
    dim = sample.shape[1]
    trained = _new_index(kind, dim, n, nprobe)
    if kind in TRAINED_TYPES:
        number = _resolve_device(device)
        gpu = _gpu_for(number) if number is not None else None
        VectorIndex._train(trained, np.ascontiguousarray(sample, dtype=np.float32), gpu)
    del sample  # up to a GB at 10M vectors: not held while the part fills
    build_dir.mkdir(parents=True, exist_ok=True)
    faiss.write_index(trained, str(build_dir / TRAINED_NAME))
    name = f"part-{build_id}.faiss"
    _write_part(build_dir, name, trained, batches)
    manifest = Manifest(kind, fingerprint, dim, n, (name,), 0)
    manifest.write(build_dir)
    return manifest


def write_merged(build_dir: Path, build_id: int, previous_dir: Path, previous: Manifest, batches: Batches) -> Manifest:
    """One part holding ``batches`` (every live vector), cloned from the previous build's quantiser: no training."""
    build_dir.mkdir(parents=True, exist_ok=True)
    os.link(previous_dir / TRAINED_NAME, build_dir / TRAINED_NAME)
    trained = faiss.read_index(str(build_dir / TRAINED_NAME))
    name = f"part-{build_id}.faiss"
    _write_part(build_dir, name, trained, batches)
    manifest = replace(previous, parts=(name,), deleted=0)
    manifest.write(build_dir)
    return manifest


def write_incremental(
    build_dir: Path,
    build_id: int,
    previous_dir: Path,
    previous: Manifest,
    previous_deleted: np.ndarray,
    added: Batches | None,
    removed: np.ndarray,
) -> Manifest:
    """The previous build's parts (hard links), a new part for ``added`` and ``removed`` added to the deleted ids."""
    build_dir.mkdir(parents=True, exist_ok=True)
    for name in (TRAINED_NAME, *previous.parts, *map(_ids_name, previous.parts)):
        os.link(previous_dir / name, build_dir / name)
    for name in map(_locations_name, previous.parts):
        if (previous_dir / name).is_file():
            os.link(previous_dir / name, build_dir / name)
    parts = list(previous.parts)
    if added is not None:
        trained = faiss.read_index(str(build_dir / TRAINED_NAME))
        name = f"part-{build_id}.faiss"
        if _write_part(build_dir, name, trained, added):
            parts.append(name)
        else:
            (build_dir / name).unlink()
    deleted = np.union1d(previous_deleted, _as_ids(removed))
    if len(deleted):
        tmp = build_dir / f"{DELETED_NAME}.tmp.npy"
        np.save(tmp, deleted)
        os.replace(tmp, build_dir / DELETED_NAME)
    manifest = replace(previous, parts=tuple(parts), deleted=len(deleted))
    manifest.write(build_dir)
    return manifest


def needs_merge(parts: int, deleted: int, live_count: int) -> bool:
    """Whether a publish that would leave ``parts`` parts and ``deleted`` deleted ids should merge them instead."""
    return parts > MAX_PARTS or deleted > MAX_DELETED_SHARE * max(1, live_count)


def needs_retrain(manifest: Manifest, n: int, kind: str, fingerprint: str, dim: int, growth: float) -> bool:
    """Whether the quantiser must be trained again for ``n`` vectors of ``kind``."""
    if (manifest.index_type, manifest.model_fingerprint, manifest.dim) != (kind, fingerprint, dim):
        return True
    return kind in TRAINED_TYPES and n > math.floor(growth * manifest.trained_count)
