"""Evaluation runs: a set on disk in, a run (dataset, model, index build, settings, report) out.

Two modes. ``exact`` embeds the set with the configured model (cached by content) and ranks by brute
force over the set itself: it measures the model. ``index`` finds the set's images in the live index
by content hash, uses their stored vectors, and ranks through the live FAISS index (its ANN and its
filter path), keeping only hits from the set: it measures what users of this deployment get.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from search.conch.encoder import DEFAULT_TEMPLATES, Encoder
from search.core.errors import BadInput, IndexUnavailable
from search.core.settings import Settings
from search.evaluation import metrics as m
from search.evaluation.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED
from search.evaluation.datasets import load_classes, load_labelled, load_pairs
from search.evaluation.embeddings import EmbeddingCache, cached_image_vectors, indexed_vectors
from search.evaluation.ranking import rank_exact, rank_index
from search.evaluation.reports import pairs_report, retrieval_report, zero_shot_report
from search.slides.aggregate import DESCRIPTIONS, METHODS, slide_vector
from search.storage.index_directory import IndexDirectory
from search.storage.segmented import live_tile_index
from search.storage.store import Store
from search.storage.vectors import VectorIndex

Mode = Literal["exact", "index"]
PAIR_KS = (1, 5, 10, 50)
# Score rows computed at once for cross-modal ranks: bounds memory to (this x set size) floats.
_ROWS = 512


@dataclass(frozen=True)
class Options:
    mode: Mode = "exact"
    k: int = 10
    tta: bool = False
    prompt_ensemble: bool = True
    filters: Mapping[str, Any] = field(default_factory=dict)
    n_boot: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    progress: bool = False
    pooling: str = "mean"  # slide vectors for `eval slides`: a built-in method of search.slides.aggregate

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "index"):
            raise BadInput(f"mode must be 'exact' or 'index', got {self.mode!r}")
        if not 1 <= self.k <= 1000:
            raise BadInput(f"--k must be between 1 and 1000, got {self.k}")
        if self.n_boot < 1:
            raise BadInput(f"the bootstrap needs at least one resample, got {self.n_boot}")
        if self.pooling not in METHODS:
            raise BadInput(f"--pooling must be one of {', '.join(METHODS)}, got {self.pooling!r}")
        if self.filters and self.mode != "index":
            raise BadInput("filters (--source, --slide, --case, --meta) apply to the live index: add --index")


@dataclass
class _Space:
    """Where a run's vectors live: the model fingerprint, and with --index the live build and its index."""

    fingerprint: str
    build: dict | None = None
    index: VectorIndex | None = None


class Evaluator:
    """Runs evaluations for one deployment (settings, store, live index); the encoder loads when needed."""

    def __init__(self, settings: Settings, store: Store, encoder: Encoder | None = None) -> None:
        self.settings = settings
        self.store = store
        self._encoder = encoder
        self.cache = EmbeddingCache(settings.cache_dir / "eval")
        self.live_index = live_tile_index(
            IndexDirectory(settings.data_dir / "index"), store, settings.device, settings.rerank_factor
        )

    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = Encoder.from_settings(self.settings)
        return self._encoder

    # --- the four evaluations ----------------------------------------------------------------

    def tiles(self, path: Path, options: Options) -> dict:
        """Image -> image on labelled tiles, leaving out each query's case (or slide)."""
        data = load_labelled(path)
        space, vectors, ids = self._image_vectors(data.items, data.hashes, str(path), options)
        in_db = self._database_mask(ids, options)
        depth = max(5, options.k)
        db = np.flatnonzero(in_db)
        with self._bar(len(data.items), "ranking", options) as step:
            if space.index is not None:
                allowed = None if self._covers_index(ids[db], space.index, options) else np.sort(ids[db])
                ranked = rank_index(
                    space.index, vectors, ids[db], depth, allowed=allowed,
                    query_groups=data.groups, db_groups=data.groups[db], progress=step,
                )  # fmt: skip
            else:
                ranked = rank_exact(
                    vectors, vectors[db], depth, query_groups=data.groups, db_groups=data.groups[db],
                    query_labels=data.labels, db_labels=data.labels[db], progress=step,
                )  # fmt: skip
        report = retrieval_report(
            data.labels, ranked, data.labels[db], _relevant(data.labels, data.groups, in_db), data.classes,
            ap_k=options.k, n_boot=options.n_boot, seed=options.seed,
        )  # fmt: skip
        return self._run("tiles", data.source, data.content_hash, len(data.items), space, options, report)

    def slides(self, path: Path, options: Options) -> dict:
        """Slide -> slide: each slide pooled from its tiles' vectors (``options.pooling``, the built-in slide
        vectors); leave-one-patient-out."""
        data = load_labelled(path)
        if any(item.slide is None for item in data.items):
            raise BadInput(f"{path}: slide evaluation needs a slide_id on every row (CSV path,label,case_id,slide_id)")
        space, vectors, _ = self._image_vectors(data.items, data.hashes, str(path), options)
        slide_keys, slide_of = np.unique([item.slide for item in data.items], return_inverse=True)
        labels = np.zeros(len(slide_keys), np.int64)
        patients = np.zeros(len(slide_keys), np.int64)
        for s in range(len(slide_keys)):
            members = slide_of == s
            found = np.unique(data.labels[members])
            if len(found) != 1:
                names = ", ".join(data.classes[c] for c in found)
                raise BadInput(f"{path}: slide {slide_keys[s]} has tiles of several labels ({names}): one per slide")
            labels[s], patients[s] = found[0], data.patients[members][0]
        pooled = np.stack([slide_vector(vectors[slide_of == s], options.pooling) for s in range(len(slide_keys))])
        ranked = rank_exact(
            pooled, pooled, 5, query_groups=patients, db_groups=patients, query_labels=labels, db_labels=labels
        )
        every = np.ones(len(labels), bool)
        report = retrieval_report(
            labels, ranked, labels, _relevant(labels, patients, every), data.classes,
            mv_k=3, ap_k=None, mv_name="MVAcc", n_boot=options.n_boot, seed=options.seed,
        )  # fmt: skip
        report["pooling"] = f"{options.pooling}: {DESCRIPTIONS[options.pooling]}, L2-normalised"
        return self._run("slides", data.source, data.content_hash, len(slide_keys), space, options, report)

    def zeroshot(self, path: Path, classes_file: Path | None, options: Options) -> dict:
        """Text -> image: class names (and synonyms) as prompts; accuracy, balanced accuracy, precision@k."""
        data = load_labelled(path)
        names = load_classes(classes_file, data.classes)
        space, vectors, ids = self._image_vectors(data.items, data.hashes, str(path), options)
        encoder = self._text_encoder(space)
        class_vectors = np.stack([self._class_vector(encoder, synonyms, options) for synonyms in names])
        in_db = self._database_mask(ids, options)
        db = np.flatnonzero(in_db)
        class_ids = np.arange(len(names))
        if space.index is not None:
            allowed = None if self._covers_index(ids[db], space.index, options) else np.sort(ids[db])
            ranked = rank_index(space.index, class_vectors, ids[db], options.k, allowed=allowed)
        else:
            ranked = rank_exact(
                class_vectors, vectors[db], options.k, query_labels=class_ids, db_labels=data.labels[db]
            )
        report = zero_shot_report(
            data.labels, vectors @ class_vectors.T, np.where(ranked >= 0, db[np.clip(ranked, 0, None)], -1),
            data.classes, k=options.k, n_boot=options.n_boot, seed=options.seed,
        )  # fmt: skip
        report["prompts"] = {label: synonyms for label, synonyms in zip(data.classes, names, strict=True)}
        # The prompts are part of the set: other synonyms make another benchmark.
        prompts = "\n".join("|".join(synonyms) for synonyms in names)
        dataset_hash = hashlib.sha256(f"{data.content_hash}\n{prompts}".encode()).hexdigest()
        return self._run("zeroshot", data.source, dataset_hash, len(data.items), space, options, report)

    def pairs(self, path: Path, options: Options) -> dict:
        """Text -> image and image -> text Recall@1/5/10/50 and their mean over image-caption pairs."""
        data = load_pairs(path)
        items = [Path(p) for p in data.images]
        space, images, ids = self._image_vectors(items, data.hashes, str(path), options)
        encoder = self._text_encoder(space)
        captions = encoder.encode_texts(data.captions)
        ks = tuple(sorted({*PAIR_KS, options.k}))
        if space.index is not None:
            allowed = None if self._covers_index(ids, space.index, options) else np.sort(ids)
            ranked = rank_index(space.index, captions, ids, max(ks), allowed=allowed)
            found = ranked == data.caption_image[:, None]
            t2i = np.where(found.any(axis=1), found.argmax(axis=1), max(ks))
        else:
            t2i = _ranks(captions, images, lambda rows: data.caption_image[rows, None] == np.arange(len(images)))
        i2t = _ranks(images, captions, lambda rows: data.caption_image[None, :] == rows[:, None])
        report = pairs_report(t2i, i2t, data.caption_image, ks=ks, n_boot=options.n_boot, seed=options.seed)
        report["several_captions"] = (
            "text -> image: each caption is a query for its image; image -> text: a hit when any of the "
            "image's captions is within the top k"
        )
        return self._run("pairs", data.source, data.content_hash, len(data.captions), space, options, report)

    # --- vectors -------------------------------------------------------------------------------

    def _image_vectors(
        self, items: list, hashes: list[str], where: str, options: Options
    ) -> tuple[_Space, np.ndarray, np.ndarray]:
        """(space, vectors [n, d], tile ids [n] or -1 in exact mode)."""
        if options.mode == "index":
            build = self.store.live_build()
            if build is None:
                raise IndexUnavailable("no index has been built yet: run `histosearch index FOLDER`, or use --exact")
            index = self.live_index.get()
            ids, vectors = indexed_vectors(self.store, index, build["model_fingerprint"], hashes, where)
            return _Space(build["model_fingerprint"], build, index), vectors, ids
        encoder = self.encoder()
        paths = [getattr(item, "path", item) for item in items]
        with self._bar(len(paths), "embedding", options) as step:
            vectors, _ = cached_image_vectors(
                encoder, self.cache, paths, hashes,
                max_pixels=self.settings.max_image_pixels, tta=options.tta, progress=step,
            )  # fmt: skip
        return _Space(encoder.fingerprint), vectors, np.full(len(paths), -1, np.int64)

    def _text_encoder(self, space: _Space) -> Encoder:
        encoder = self.encoder()
        if encoder.fingerprint != space.fingerprint:
            raise IndexUnavailable(
                f"the live index was built with model {space.fingerprint}, but the configured model is "
                f"{encoder.fingerprint}: run `histosearch reindex`, or evaluate with --exact"
            )
        return encoder

    @staticmethod
    def _class_vector(encoder: Encoder, synonyms: list[str], options: Options) -> np.ndarray:
        # CONCH's zero-shot recipe: every name in every template, averaged, renormalised.
        templates = DEFAULT_TEMPLATES if options.prompt_ensemble else ("{}",)
        each = encoder.encode_texts([t.format(name) for name in synonyms for t in templates])
        mean = each.mean(axis=0)
        return (mean / np.linalg.norm(mean)).astype(np.float32)

    def _database_mask(self, ids: np.ndarray, options: Options) -> np.ndarray:
        """Which items are searchable: all, or with --index and filters, those the filters admit."""
        if not options.filters:
            return np.ones(len(ids), bool)
        f = options.filters
        admitted = self.store.tile_ids_matching(f.get("source"), f.get("slide"), f.get("case"), dict(f.get("meta", {})))
        mask = np.isin(ids, admitted)
        if not mask.any():
            raise BadInput("the filters admit none of the set's images: nothing to search")
        return mask

    @staticmethod
    def _covers_index(db_ids: np.ndarray, index: VectorIndex, options: Options) -> bool:
        """Whether the set is the whole index, so the search can run unfiltered (the plain ANN path)."""
        return not options.filters and len(np.unique(db_ids)) == index.ntotal

    @contextmanager
    def _bar(self, total: int, what: str, options: Options) -> Iterator[Callable[[int], None]]:
        with tqdm(total=total, desc=what, unit="img", disable=not options.progress, leave=False) as bar:
            yield bar.update

    # --- the run record ----------------------------------------------------------------------------

    def _run(
        self, kind: str, source: Path, dataset_hash: str, size: int, space: _Space, options: Options, report: dict
    ) -> dict:
        index = space.index
        return {
            "kind": kind,
            "dataset": {
                "name": source.stem if source.is_file() else source.name,
                "path": str(source),
                "hash": dataset_hash,
                "size": size,
            },  # fmt: skip
            "model_fingerprint": space.fingerprint,
            "build_id": space.build["id"] if space.build else None,
            "settings": {
                "mode": options.mode,
                "index_type": index.index_type if index is not None else "exact",
                # Slides are ranked by brute force in both modes: there is no slide index yet.
                "ranking": "index" if index is not None and kind != "slides" else "exact",
                "nprobe": index.nprobe if index is not None else None,
                "prompt_ensemble": options.prompt_ensemble if kind == "zeroshot" else None,
                "tta": options.tta if options.mode == "exact" else None,
                "pooling": options.pooling if kind == "slides" else None,
                "k": options.k,
                "filters": dict(options.filters),
                "bootstrap": {"resamples": options.n_boot, "seed": options.seed},
            },
            "report": report,
        }


def _relevant(labels: np.ndarray, groups: np.ndarray, in_db: np.ndarray) -> np.ndarray:
    """Per query: database items with its label, minus those of its own group."""
    n_labels = int(labels.max()) + 1
    per_label = np.bincount(labels[in_db], minlength=n_labels)
    key = groups * n_labels + labels
    per_group_label = np.bincount(key[in_db], minlength=int(key.max()) + 1)
    return per_label[labels] - per_group_label[key]


def _ranks(queries: np.ndarray, database: np.ndarray, correct: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Pessimistic rank of each query's best correct item; ``correct(rows)`` is the bool [rows, database] mask."""
    out = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), _ROWS):
        rows = np.arange(start, min(start + _ROWS, len(queries)))
        out[rows] = m.pessimistic_rank(queries[rows] @ database.T, correct(rows))
    return out
