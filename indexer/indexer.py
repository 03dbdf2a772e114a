"""Index and reindex: keep the store, the embeddings and the FAISS index in step with the archives.

For each source the reader's listing is compared with what the store holds: new tiles are embedded,
tiles whose cheap fingerprint moved are re-read and re-embedded only if their content hash changed,
tiles embedded by another model are re-embedded, and tiles no longer listed leave the store. Every
batch commits its tiles and their vectors in one transaction, so a run killed at any moment (kill -9
included) resumes where it stopped: no tile lost, none twice. The FAISS index is then brought in step
with the stored embeddings (new tiles added, removed ones deleted: indexer/build.py) in a new build
beside the live one, published by an atomic pointer swap.

What changed in a source is planned in indexer/plan.py; the run's row in ``jobs`` is indexer/job.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from indexer.batches import BatchEncoder, Encoded
from indexer.build import Publisher
from indexer.job import Job, record_job, where
from indexer.lock import acquire as acquire_lock
from indexer.manifest import Manifest
from indexer.pipeline import Decoded, DecodePool, Failed, default_workers
from indexer.plan import Work, plan
from indexer.ray_embed import EmbeddedBatches, RayEmbedPool
from indexer.report import RunReport, SourceReport
from indexer.slides import sync_slide_vectors
from indexer.texts import BUILTIN_CORPUS, TextItem, builtin_vocabulary, load_corpus
from indexer.tile_rows import TileRows
from search.archives.readers import Reader, open_reader
from search.conch.encoder import Encoder
from search.core.errors import BadInput
from search.core.settings import Settings
from search.storage.index_directory import IndexDirectory
from search.storage.locks import IndexerLock
from search.storage.store import Store

MOVED_CHUNK = 4096


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
                changed = False
                for path in paths:
                    source = self._sync_source(Path(path), manifest, manifest_obj, job)
                    report.sources.append(source)
                    job.save_counts()
                    changed |= bool(source.new or source.changed or source.reembedded or source.removed)
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

    def _sync_source(self, path: Path, manifest_path: Path | None, manifest: Manifest | None, job: Job) -> SourceReport:
        uri = str(path.resolve())
        report = SourceReport(uri)
        try:
            reader = open_reader(path, self.settings)
        except BadInput as exc:
            # A missing or unreadable archive keeps what was indexed from it: nothing is lost to bad input.
            report.problem = job.error(report, uri, exc.message, str(path), path.name, uri)
            report.kept = next((src["tiles"] for src in self.store.sources() if src["uri"] == uri), 0)
            return report
        report.kind = reader.kind
        source_id = report.source_id = self.store.get_or_create_source(reader.kind, uri)
        self.store.clear_errors(None, path=uri)
        manifest_key = f"manifest:{source_id}"
        if manifest_path is not None:
            self.store.set_meta(manifest_key, str(manifest_path.resolve()))
        elif (saved := self.store.get_meta(manifest_key)) and Path(saved).is_file():
            manifest = Manifest.load(Path(saved))
        try:
            existing = self.store.tile_states(source_id)
            todo = plan(reader, existing, self.encoder.fingerprint, job, report)
            self._embed(reader, todo.work, source_id, manifest, job, report)
            if todo.removed is not None:
                if todo.removed:
                    self.publisher.mark_dirty()
                self.store.delete_tiles(todo.removed)
                report.removed = len(todo.removed)
                self.store.mark_scanned(source_id)
                # An error is a state of a file: one that reads well now, or is gone, has none any more.
                self.store.clear_errors(source_id, keep_job=job.id)
        finally:
            reader.close()
        if report.yielded_nothing and report.errors:
            report.problem = f"{report.errors} files refused; `histosearch status` lists them"
        return report

    def _embed(
        self,
        reader: Reader,
        work: list[Work],
        source_id: int,
        manifest: Manifest | None,
        job: Job,
        report: SourceReport,
    ) -> None:
        if not work:
            return
        encoder = self.encoder
        by_locator = {w.entry.locator: w for w in work}
        rows = TileRows(self.store, source_id, manifest, self.settings.path_pattern)
        # Tiles whose fingerprint moved but whose content did not: written in chunks, not a transaction each.
        moved: list[tuple[int, str]] = []
        bar = tqdm(total=len(work), unit="tile", desc=Path(reader.root).name, disable=not self.progress)
        done = 0

        def write(encoded: Encoded[tuple[Work, Decoded]]) -> None:
            """One batch's tiles and vectors, in one transaction per kind of change."""
            nonlocal done
            for (w, _), reason in encoded.failed:
                job.error(report, where(reader, report.uri, w.entry.path), reason, w.entry.locator)
            batch, vectors = encoded.items, encoded.vectors
            if batch:
                self.publisher.mark_dirty()
            new, replaced, reembed = [], [], []
            for i, (w, d) in enumerate(batch):
                if w.state is None:
                    new.append(i)
                elif w.state.content_hash != d.content_hash:
                    replaced.append(i)
                else:
                    reembed.append(i)
            if new:
                self.store.add_tiles(
                    [rows.row(batch[i][0].entry, batch[i][1]) for i in new], vectors[new], encoder.fingerprint
                )
            if replaced:
                self.store.replace_tiles(
                    [batch[i][0].state.id for i in replaced],
                    [rows.row(batch[i][0].entry, batch[i][1]) for i in replaced],
                    vectors[replaced],
                    encoder.fingerprint,
                )
            if reembed:
                ids = [batch[i][0].state.id for i in reembed]
                self.store.set_embeddings(ids, vectors[reembed], encoder.fingerprint)
                self.store.update_fingerprints([(batch[i][0].state.id, batch[i][0].entry.fingerprint) for i in reembed])
            report.new += len(new)
            report.changed += len(replaced)
            report.reembedded += len(reembed)
            done += len(batch) + len(encoded.failed)
            bar.update(len(batch) + len(encoded.failed))
            job.save_counts(report)

        fingerprint = encoder.fingerprint
        batches: BatchEncoder[tuple[Work, Decoded]] | EmbeddedBatches[tuple[Work, Decoded]]
        if self.settings.ray_address is not None:  # the tiles come embedded, from Ray actors
            batches = EmbeddedBatches(encoder.batch_size)
        else:
            batches = BatchEncoder(encoder, self.settings.max_image_pixels)
        try:
            for result in self._decode_pool().decode(reader, [w.entry.locator for w in work]):
                w = by_locator[result.locator]
                if isinstance(result, Failed):
                    # A tile already indexed keeps its old vector until it reads well again.
                    path = where(reader, report.uri, w.entry.path)
                    job.error(report, path, result.reason, f"{reader.root.name}:{w.entry.locator}", w.entry.locator)
                    bar.update(1)
                    continue
                state = w.state
                if state and state.content_hash == result.content_hash and state.model_fingerprint == fingerprint:
                    moved.append((state.id, w.entry.fingerprint))
                    if len(moved) >= MOVED_CHUNK:
                        self.store.update_fingerprints(moved)
                        moved.clear()
                    report.unchanged += 1
                    bar.update(1)
                    continue
                # The pixels are copied into the batch now; the item keeps no view of the pool's shared memory.
                batches.add((w, replace(result, pixels=None)), result)
                if batches.full():
                    for encoded in batches.submit():
                        write(encoded)
            for encoded in batches.finish():
                write(encoded)
        finally:
            batches.close()
        self.store.update_fingerprints(moved)
        bar.close()

    def _decode_pool(self) -> DecodePool | RayEmbedPool:
        """One pool of decode workers for the whole run (starting workers costs seconds), sized by the
        ``workers`` setting or, when unset, one per usable CPU but one for a GPU encoder and none for a CPU one; with
        ``ray_address``, actors on a Ray cluster that decode and embed."""
        if self._pool is None and self.settings.ray_address is not None:
            self._pool = RayEmbedPool(self.settings, self.encoder.fingerprint)
        if self._pool is None:
            workers = self.settings.workers
            if workers is None:
                workers = default_workers() if self.encoder.device.type == "cuda" else 0
            self._pool = DecodePool(
                workers, self.encoder.preprocess, self.settings.max_image_pixels, self.settings.gpu_decode
            )
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

    def _sync_texts(self, fingerprint: str) -> int:
        """The built-in vocabulary once per index, and texts embedded by another model re-embedded."""
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
                self._sync_texts(self.encoder.fingerprint)
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
