"""Index and reindex: keep the store, the embeddings and the FAISS index in step with the archives.

For each source the reader's listing is compared with what the store holds: new tiles are embedded,
tiles whose cheap fingerprint moved are re-read and re-embedded only if their content hash changed,
tiles embedded by another model are re-embedded, and tiles no longer listed leave the store. Every
batch commits its tiles and their vectors in one transaction, so a run killed at any moment (kill -9
included) resumes where it stopped: no tile lost, none twice. The FAISS index is then brought in step
with the stored embeddings (new tiles added, removed ones deleted: indexer/build.py) in a new build
beside the live one, published by an atomic pointer swap.

One source's sync (open, plan, write its tiles, finish) is indexer/source_sync.py, what changed in it
indexer/plan.py; the run's row in ``jobs`` is indexer/job.py.
"""

from __future__ import annotations

from contextlib import closing
from itertools import groupby
from operator import itemgetter
from pathlib import Path

from indexer.build import Publisher
from indexer.job import Job, record_job
from indexer.lock import acquire as acquire_lock
from indexer.manifest import Manifest
from indexer.pipeline import DecodePool, default_workers
from indexer.ray_embed import RayEmbedPool
from indexer.report import RunReport
from indexer.slides import sync_slide_vectors
from indexer.source_sync import IndexRun, SourceSync
from indexer.texts import BUILTIN_CORPUS, TextItem, builtin_vocabulary, load_corpus, sync_word_vectors
from search.conch.encoder import Encoder
from search.core.errors import BadInput
from search.core.settings import Settings
from search.storage.index_directory import IndexDirectory
from search.storage.locks import IndexerLock
from search.storage.store import Store


class Indexer:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        encoder: Encoder | None = None,
        progress: bool = False,
        lock: IndexerLock | None = None,
    ) -> None:
        """``lock``: the indexer lock when the caller took it already (the CLI does, before importing this)."""
        self.settings = settings
        self._held = lock
        self.store = store or Store.from_settings(settings)
        self._encoder = encoder
        self.progress = progress
        self.publisher = Publisher(self.store, IndexDirectory(settings.data_dir / "index"), settings)
        self._pool: DecodePool | RayEmbedPool | None = None

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = Encoder.from_settings(self.settings)
        return self._encoder

    def lock(self, wait: bool = False) -> IndexerLock:
        """The one-indexer-at-a-time lock (indexer/lock.py); the one given at construction is re-entered."""
        if self._held is not None:
            self._held.acquire()
            return self._held
        return acquire_lock(self.settings, wait)

    def run(
        self,
        paths: list[Path] | None = None,
        *,
        manifest: Path | None = None,
        kind: str = "index",
        wait: bool = False,
        retrain: bool = False,
    ) -> RunReport:
        """Bring the given sources (all known ones when None) up to date, then publish the index
        (``retrain``: train its quantiser again instead of adding to it)."""
        lock = self.lock(wait)
        try:
            self.store.remove_unreferenced_segments()
            if paths is None:
                paths = [Path(s["uri"]) for s in self.store.sources()]
            args = {"paths": [str(p) for p in paths], "manifest": str(manifest) if manifest else None}
            with record_job(self.store, kind, args, self.settings.db_path) as job:
                report = job.report
                manifest_obj = Manifest.load(manifest) if manifest else None
                if manifest_obj is not None:
                    report.manifest = f"manifest {manifest}: {len(manifest_obj)} rows keyed by '{manifest_obj.key}'"
                fingerprint = self.encoder.fingerprint
                self._sync_sources(paths, manifest, manifest_obj, job)
                changed = any(s.new or s.changed or s.reembedded or s.removed for s in report.sources)
                if report.sources and all(s.yielded_nothing for s in report.sources):
                    # Nothing to search came of any input: an error, not a quiet success.
                    raise BadInput("; ".join(s.line() for s in report.sources))
                report.texts_embedded = self._sync_texts(fingerprint)
                report.build = self.build_index(force=changed, retrain=retrain)
                report.damage = self.publisher.damage
                report.slides = sync_slide_vectors(self.store, self.settings, fingerprint)
                job.message = report.summary()
            return report
        finally:
            self._close_pool()
            lock.release()

    # --- sources ---------------------------------------------------------------------------------

    def _sync_sources(self, paths: list[Path], manifest_path: Path | None, manifest: Manifest | None, job: Job) -> None:
        """Bring each source up to date (indexer/source_sync.py), its report joining the run's as it starts. Locally
        source after source; on Ray every source is planned first and all their tiles go through one pool of actors,
        each loading the model once for the run, then each source is finished, in the same order."""
        run = IndexRun(self.store, self.publisher, self.settings, self.encoder, job, self.progress)
        # A source named twice is synced once: a Ray run plans every source before it embeds any, so a second sync of
        # one would add its new tiles again.
        unique: dict[Path, Path] = {}
        for path in paths:
            unique.setdefault(Path(path).resolve(), Path(path))
        paths = list(unique.values())
        if self.settings.ray_address is None:
            for path in paths:
                with closing(SourceSync.start(run, path, manifest_path, manifest)) as sync:
                    job.report.sources.append(sync.report)
                    if sync.todo.work:
                        sync.embed(self._local_pool().decode(sync.reader, sync.locators))
                    sync.finish()
                job.save_counts()
            return
        syncs: list[SourceSync] = []
        for path in paths:
            sync = SourceSync.start(run, path, manifest_path, manifest)
            job.report.sources.append(sync.report)
            # The actors read the archive, not the driver: a run over thousands of shards must not hold them all open.
            sync.close()
            syncs.append(sync)
        readers = {i: sync.reader for i, sync in enumerate(syncs) if sync.todo.work}
        tiles = [(i, locator) for i in readers for locator in syncs[i].locators]
        # In plan order, source after source: each source's tiles are one run of the stream.
        for i, results in groupby(self._ray_pool().embed(readers, tiles), key=itemgetter(0)):
            syncs[i].embed(result for _, result in results)
        for sync in syncs:
            sync.finish()
            job.save_counts()

    def _local_pool(self) -> DecodePool:
        """One pool of decode workers for the whole run (starting workers costs seconds), sized by the
        ``workers`` setting or, when unset, one per usable CPU but one for a GPU encoder and none for a CPU one."""
        if self._pool is None:
            workers = self.settings.workers
            if workers is None:
                workers = default_workers() if self.encoder.device.type == "cuda" else 0
            self._pool = DecodePool(
                workers, self.encoder.preprocess, self.settings.max_image_pixels, self.settings.gpu_decode
            )
        return self._pool

    def _ray_pool(self) -> RayEmbedPool:
        """Actors on the Ray cluster at ``ray_address`` that decode and embed."""
        if self._pool is None:
            self._pool = RayEmbedPool(self.settings, self.encoder.fingerprint)
        return self._pool

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def remove(self, paths: list[Path], *, wait: bool = False) -> dict[str, int]:
        """Forget sources (an archive moved away for good): their tiles leave the store and a new index is
        published. Returns the number of tiles removed per source; BadInput for a path that is not a source."""
        lock = self.lock(wait)
        try:
            known = {s["uri"] for s in self.store.sources()}
            uris = [str(Path(p).resolve()) for p in paths]
            unknown = [u for u in uris if u not in known]
            if unknown:
                raise BadInput(f"not an indexed source: {', '.join(unknown)}; `histosearch status` lists the sources")
            removed = {uri: self.store.delete_source(uri) or 0 for uri in uris}
            self.build_index(force=True)
            sync_slide_vectors(self.store, self.settings, self.encoder.fingerprint)
            return removed
        finally:
            lock.release()

    # --- texts -------------------------------------------------------------------------------------

    def _sync_texts(self, fingerprint: str, texts_changed: bool = False) -> int:
        """The built-in vocabulary once per index, texts embedded by another model re-embedded, and the words of
        the texts embedded for per-word scores (``texts_changed``: texts were added since the last sync)."""
        embedded = 0
        if self.store.get_meta("builtin_vocabulary") is None:
            embedded += self._add_texts(BUILTIN_CORPUS, builtin_vocabulary())
            self.store.set_meta("builtin_vocabulary", "1")
        missing = self.store.texts_missing_embeddings(fingerprint)
        if missing:
            ids = [i for i, _ in missing]
            vectors = self.encoder.encode_texts([t for _, t in missing])
            self.store.set_text_embeddings(ids, vectors, fingerprint)
            embedded += len(ids)
        sync_word_vectors(self.store, self.encoder, self.settings.data_dir, texts_changed=texts_changed or embedded > 0)
        return embedded

    def _add_texts(self, corpus: str, items: list[TextItem]) -> int:
        vectors = self.encoder.encode_texts([item.text for item in items])
        return self.store.add_texts(
            corpus, [(item.text, dict(item.tags)) for item in items], vectors, self.encoder.fingerprint
        )

    def index_texts(self, files: list[Path], corpus: str | None = None, *, wait: bool = False) -> int:
        """Add caption / term corpora (txt, csv, jsonl) for image -> text search."""
        lock = self.lock(wait)
        try:
            args = {"files": [str(p) for p in files], "corpus": corpus}
            with record_job(self.store, "index-texts", args, self.settings.db_path) as job:
                added = 0
                for path in files:
                    added += self._add_texts(corpus or Path(path).stem, load_corpus(Path(path)))
                self._sync_texts(self.encoder.fingerprint, texts_changed=added > 0)
                job.message = f"{added} texts added"
            return added
        finally:
            lock.release()

    # --- FAISS -------------------------------------------------------------------------------------

    def build_index(self, force: bool = False, fingerprint: str | None = None, retrain: bool = False) -> dict | None:
        """Publish an index of the stored embeddings beside the live one when it is not current, incrementally
        where it can be (indexer/build.py; ``retrain``: train the quantiser again). ``fingerprint``: the model
        whose vectors to index (default: the configured model, which loads it)."""
        return self.publisher.update(fingerprint or self.encoder.fingerprint, force=force, retrain=retrain)
