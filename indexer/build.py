"""Publishing the FAISS index of the stored vectors: incremental where it can be, a full build where it must.

The live build's ids are compared with the stored ones: new tiles go into a new index segment cloned
from the live build's trained quantiser, removed tiles join its deleted ids. The quantiser is trained
again only on request (``reindex --retrain``), when the index type changes (the collection crossed
``exact_max`` or ``compress_above``), or when the collection outgrew ``retrain_growth`` times the
count it was trained for. Too many parts or deleted ids merge the parts, still without training.

``Publisher`` decides whether a run publishes at all: when the store changed since the last published
build (remembered across crashes), when the live build is damaged, or when it is asked to.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from search.core.errors import BuildRejected, IndexUnavailable
from search.core.settings import Settings
from search.storage import build_writer, segmented
from search.storage.build_checks import (
    CALIBRATION_FILE,
    TRUTH_FILE,
    RecallTruth,
    draw_calibration_sample,
    measure_recall,
    save_calibration_sample,
    tune_nprobe,
)
from search.storage.index_directory import IndexDirectory
from search.storage.index_types import TRAIN_POINTS_PER_LIST, TRAIN_SEED, ivf_nlist
from search.storage.store import Store

log = logging.getLogger(__name__)

# Vectors read from the store and added to FAISS at a time during a build.
BATCH = 65_536
# Meta key: "1" while the store holds changes that no published build has.
DIRTY_KEY = "index_dirty"


@dataclass(frozen=True)
class BuildPlan:
    """What a publish does: ``full`` (train and add all), ``merge`` (add all, no training), ``incremental``."""

    mode: str
    kind: str
    added: np.ndarray
    removed: np.ndarray


def plan(
    store_ids: np.ndarray,
    live: build_writer.Built | None,
    kind: str,
    fingerprint: str,
    dim: int,
    settings: Settings,
    retrain: bool,
) -> BuildPlan:
    none = np.zeros(0, np.int64)
    if (
        retrain
        or live is None
        or build_writer.needs_retrain(live.manifest, len(store_ids), kind, fingerprint, dim, settings.retrain_growth)
    ):
        return BuildPlan("full", kind, store_ids, none)
    built = live.ids
    added = np.setdiff1d(store_ids, built, assume_unique=True)
    removed = np.setdiff1d(built, store_ids, assume_unique=True)
    parts = len(live.manifest.parts) + (len(added) > 0)
    deleted = len(live.deleted) + len(removed)
    # An id deleted earlier and stored again would sit in an old part with its old vector: merge.
    if np.isin(added, live.deleted).any() or build_writer.needs_merge(parts, deleted, len(store_ids)):
        return BuildPlan("merge", kind, store_ids, none)
    return BuildPlan("incremental", kind, added, removed)


def _batches(store: Store, ids: np.ndarray, fingerprint: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for chunk, vectors, _ in _located_batches(store, ids, fingerprint):
        yield chunk, vectors


def _located_batches(store: Store, ids: np.ndarray, fingerprint: str) -> Iterator[build_writer.LocatedBatch]:
    """(ids, vectors, locations in the vector files) a batch at a time: what an index part is written from."""
    for start in range(0, len(ids), BATCH):
        chunk = ids[start : start + BATCH]
        yield chunk, *store.locate_embeddings(chunk.tolist(), fingerprint)


def _sample(store: Store, ids: np.ndarray, kind: str, fingerprint: str) -> np.ndarray:
    """The vectors that train the quantiser: a deterministic sample, as many as k-means uses."""
    size = len(ids) if kind not in build_writer.TRAINED_TYPES else TRAIN_POINTS_PER_LIST * ivf_nlist(len(ids))
    size = min(len(ids), max(size, 1))
    rows = np.sort(np.random.default_rng(TRAIN_SEED).choice(len(ids), size, replace=False))
    return np.vstack([v for _, v in _batches(store, ids[rows], fingerprint)])


def publish(
    store: Store,
    directory: IndexDirectory,
    fingerprint: str,
    settings: Settings,
    *,
    retrain: bool = False,
) -> dict | None:
    """Write a new build of the stored vectors under ``fingerprint`` beside the live one and publish it.

    Returns the live build's row, or None when nothing is stored (the index is then unpublished).
    """
    store_ids = store.embedded_ids(fingerprint)
    live_row = store.live_build()
    if len(store_ids) == 0:
        if live_row:
            directory.unpublish()
            store.set_build_status(live_row["id"], "retired")
        return None
    dim = store.get_embeddings(store_ids[:1].tolist(), fingerprint).shape[1]
    kind = build_writer.choose_kind(len(store_ids), settings.index_type, settings.exact_max, settings.compress_above)
    live = None
    try:
        live_id = directory.live_build_id()
    except IndexUnavailable:
        live_id = None  # a damaged pointer: a full build repairs it
    if live_row and live_id == live_row["id"] and live_row["model_fingerprint"] == fingerprint:
        live = build_writer.Built.read(directory.build_dir(live_id))
    todo = plan(store_ids, live, kind, fingerprint, dim, settings, retrain)
    build_id = store.add_build(fingerprint, kind, len(store_ids), "", "cpu")
    folder = directory.build_dir(build_id)
    log.info("build %d: %s, %s, %d vectors", build_id, todo.mode, kind, len(store_ids))
    if todo.mode == "full":
        build_writer.write_full(
            folder,
            build_id,
            kind=kind,
            fingerprint=fingerprint,
            n=len(store_ids),
            sample=_sample(store, store_ids, kind, fingerprint),
            batches=partial(_located_batches, store, store_ids, fingerprint),
            device=settings.device,
        )
    elif todo.mode == "merge":
        build_writer.write_merged(
            folder,
            build_id,
            directory.build_dir(live_id),
            live.manifest,
            partial(_located_batches, store, store_ids, fingerprint),
        )
    else:
        build_writer.write_incremental(
            folder,
            build_id,
            directory.build_dir(live_id),
            live.manifest,
            live.deleted,
            partial(_located_batches, store, todo.added, fingerprint) if len(todo.added) else None,
            todo.removed,
        )
    # Checked before it goes live: recall@10 against exact search, and the calibration sample (issue 10).
    index = segmented.SegmentedIndex.load(
        folder,
        settings.device,
        stored=lambda t, f: store.find_embeddings(t.tolist(), f),
        located=store.read_located,
        rerank_factor=settings.rerank_factor,
    )
    _, text_vectors = store.text_matrix(fingerprint)

    def vectors_at(rows: np.ndarray) -> np.ndarray:
        return store.get_embeddings(store_ids[rows].tolist(), fingerprint)

    def from_build(ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # The new build's own record of where each vector lies: a pass over the vector files, not the database.
        return (index.stored_vectors(ids[i : i + BATCH]) for i in range(0, len(ids), BATCH))

    truth = None
    if todo.mode == "incremental":
        # The live build's exact answers, updated from what this publish adds and removes: no full scan.
        previous = RecallTruth.load(directory.build_file(live_id, TRUTH_FILE))
        if previous is not None and previous.queries.shape[1] == dim:
            truth = previous.updated(from_build(todo.added), todo.removed, len(store_ids))
    recall, truth = measure_recall(
        index,
        store_ids,
        lambda: from_build(store_ids),
        vectors_at,
        text_vectors,
        settings.recall_queries,
        truth,
    )
    checks = {"min_recall": settings.min_recall}
    if settings.target_recall > 0 and index.nlist is not None:
        target = max(settings.target_recall, settings.min_recall)
        if todo.mode != "incremental" or recall.recall < target:
            recall = tune_nprobe(index, truth, target, recall)
            manifest = replace(segmented.Manifest.read(folder), nprobe=index.nprobe)
            manifest.write(folder)
        checks.update(nprobe=index.nprobe, nlist=index.nlist, target_recall=target)
    sample = draw_calibration_sample(len(store_ids), settings.calibration_sample, vectors_at)
    store.set_build_checks(build_id, {**recall.as_dict(), **checks, "calibration_sample": len(sample)})
    if recall.recall < settings.min_recall:
        store.set_build_status(build_id, "failed")
        raise BuildRejected(
            f"index build {build_id} ({kind}, {len(store_ids)} vectors) has recall@10 {recall.recall:.3f} against "
            f"exact search, below the floor {settings.min_recall} (setting min_recall): it was not published and the "
            "previous index stays live; build an exact index (--index-type flat)"
            + (f" (it probed {index.nprobe} of {index.nlist} lists)" if index.nlist else "")
        )
    save_calibration_sample(directory.build_file(build_id, CALIBRATION_FILE), sample)
    truth.save(directory.build_file(build_id, TRUTH_FILE))
    store.set_build_checksum(build_id, directory.checksum(build_id))
    directory.publish(build_id)
    store.set_build_status(build_id, "live")
    return store.live_build()


class Publisher:
    def __init__(self, store: Store, directory: IndexDirectory, settings: Settings) -> None:
        self.store = store
        self.directory = directory
        self.settings = settings
        self._dirty = False
        # What ``update`` found wrong with the live index on disk, when it rebuilt it for that.
        self.damage: str | None = None

    def mark_dirty(self) -> None:
        """Remember, across crashes, that the store changed since the last published index: a run killed
        between its commits and the publish leaves the next run a rebuild to do even if it finds no work."""
        if not self._dirty:
            self.store.set_meta(DIRTY_KEY, "1")
            self._dirty = True

    def update(self, fingerprint: str, force: bool = False, retrain: bool = False) -> dict | None:
        """The live build of the stored vectors under ``fingerprint``, after publishing a new one when it is not
        current, is damaged, or ``force`` or ``retrain`` (train the quantiser again) asks for one."""
        count = self.store.counts()["embedded_by_model"].get(fingerprint, 0)
        live = self.store.live_build()
        settings = self.settings
        requested = build_writer.choose_kind(count, settings.index_type, settings.exact_max, settings.compress_above)
        # Counts and types say whether the index is current; only the file itself says whether it is sound.
        self.damage = self.directory.problem(live)
        if (
            not force
            and not retrain
            and self.damage is None
            and self.store.get_meta(DIRTY_KEY) != "1"
            and live
            and live["model_fingerprint"] == fingerprint
            and live["count"] == count
            and live["index_type"] == requested
        ):
            return live
        # A damaged live build is nothing to add to: build afresh.
        build = publish(self.store, self.directory, fingerprint, settings, retrain=retrain or self.damage is not None)
        self.store.set_meta(DIRTY_KEY, "0")
        self._dirty = False
        return build
