"""One source of an indexing run brought up to date, in the three steps the indexer drives.

``SourceSync.start`` opens the archive and plans what changed in it (indexer/plan.py); ``embed`` writes the source's
tiles as they come back decoded (or embedded already, by Ray actors), a batch per transaction; ``finish`` removes the
tiles the listing no longer names, marks the source scanned and closes its reader. A local run takes each source
through the three steps before the next; a Ray run starts every source first and streams the tiles of all of them
through one pool of actors (indexer/ray_embed.py), so that each actor loads the model once per run, not per source.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from indexer.batches import BatchEncoder, Encoded
from indexer.build import Publisher
from indexer.job import Job, where
from indexer.manifest import Manifest
from indexer.pipeline import Decoded, Failed
from indexer.plan import Plan, Work, plan
from indexer.ray_embed import EmbeddedBatches
from indexer.report import SourceReport
from indexer.tile_rows import TileRows
from search.archives.readers import Reader, open_reader
from search.conch.encoder import Encoder
from search.core.errors import BadInput
from search.core.settings import Settings
from search.storage.store import Store

MOVED_CHUNK = 4096


@dataclass(frozen=True)
class IndexRun:
    """What every source of a run is written to and with: the store, the index publisher, the model, the job."""

    store: Store
    publisher: Publisher
    settings: Settings
    encoder: Encoder
    job: Job
    progress: bool


class SourceSync:
    """One source's report, reader and planned work, from ``start`` to ``finish``; ``close`` on every way out."""

    def __init__(self, run: IndexRun, report: SourceReport) -> None:
        self.run = run
        self.report = report
        self.reader: Reader | None = None  # None: the archive could not be opened
        self.todo = Plan([], None)
        self.manifest: Manifest | None = None

    @classmethod
    def start(cls, run: IndexRun, path: Path, manifest_path: Path | None, manifest: Manifest | None) -> SourceSync:
        """Open ``path`` and plan its work; an archive that cannot be opened is reported, with nothing to do."""
        store, uri = run.store, str(path.resolve())
        sync = cls(run, SourceReport(uri))
        report = sync.report
        try:
            reader = open_reader(path, run.settings)
        except BadInput as exc:
            # A missing or unreadable archive keeps what was indexed from it: nothing is lost to bad input.
            report.problem = run.job.error(report, uri, exc.message, str(path), path.name, uri)
            report.kept = next((src["tiles"] for src in store.sources() if src["uri"] == uri), 0)
            return sync
        sync.reader = reader
        try:
            report.kind = reader.kind
            source_id = report.source_id = store.get_or_create_source(reader.kind, uri)
            store.clear_errors(None, path=uri)
            manifest_key = f"manifest:{source_id}"
            if manifest_path is not None:
                store.set_meta(manifest_key, str(manifest_path.resolve()))
            elif (saved := store.get_meta(manifest_key)) and Path(saved).is_file():
                manifest = Manifest.load(Path(saved))
            sync.manifest = manifest
            sync.todo = plan(reader, store.tile_states(source_id), run.encoder.fingerprint, run.job, report)
        except BaseException:
            reader.close()
            raise
        return sync

    @property
    def locators(self) -> list[str]:
        """The tiles to read, in plan order: the order they are committed in, and given ids."""
        return [w.entry.locator for w in self.todo.work]

    def embed(self, results: Iterable[Decoded | Failed]) -> None:
        """Write ``results``, the planned tiles decoded (embedded here) or embedded already (``vector`` set), in plan
        order: tiles whose content and model did not change only take their new fingerprint."""
        if not self.todo.work:
            return
        run, reader, report = self.run, self.reader, self.report
        fingerprint = run.encoder.fingerprint
        by_locator = {w.entry.locator: w for w in self.todo.work}
        rows = TileRows(run.store, report.source_id, self.manifest, run.settings.path_pattern)
        # Tiles whose fingerprint moved but whose content did not: written in chunks, not a transaction each.
        moved: list[tuple[int, str]] = []
        bar = tqdm(total=len(self.todo.work), unit="tile", desc=Path(reader.root).name, disable=not run.progress)
        batches: BatchEncoder[tuple[Work, Decoded]] | EmbeddedBatches[tuple[Work, Decoded]]
        if run.settings.ray_address is not None:  # the tiles come embedded, from Ray actors
            batches = EmbeddedBatches(run.encoder.batch_size)
        else:
            batches = BatchEncoder(run.encoder, run.settings.max_image_pixels)
        try:
            for result in results:
                w = by_locator[result.locator]
                if isinstance(result, Failed):
                    # A tile already indexed keeps its old vector until it reads well again.
                    path = where(reader, report.uri, w.entry.path)
                    run.job.error(report, path, result.reason, f"{reader.root.name}:{w.entry.locator}", w.entry.locator)
                    bar.update(1)
                    continue
                state = w.state
                if state and state.content_hash == result.content_hash and state.model_fingerprint == fingerprint:
                    moved.append((state.id, w.entry.fingerprint))
                    if len(moved) >= MOVED_CHUNK:
                        run.store.update_fingerprints(moved)
                        moved.clear()
                    report.unchanged += 1
                    bar.update(1)
                    continue
                # The pixels are copied into the batch now; the item keeps no view of the pool's shared memory.
                batches.add((w, replace(result, pixels=None)), result)
                if batches.full():
                    for encoded in batches.submit():
                        self._write(encoded, rows, bar)
            for encoded in batches.finish():
                self._write(encoded, rows, bar)
        finally:
            batches.close()
        run.store.update_fingerprints(moved)
        bar.close()

    def _write(self, encoded: Encoded[tuple[Work, Decoded]], rows: TileRows, bar: tqdm) -> None:
        """One batch's tiles and vectors, in one transaction per kind of change."""
        run, report = self.run, self.report
        store, fingerprint = run.store, run.encoder.fingerprint
        for (w, _), reason in encoded.failed:
            run.job.error(report, where(self.reader, report.uri, w.entry.path), reason, w.entry.locator)
        batch, vectors = encoded.items, encoded.vectors
        if batch:
            run.publisher.mark_dirty()
        new, replaced, reembed = [], [], []
        for i, (w, d) in enumerate(batch):
            if w.state is None:
                new.append(i)
            elif w.state.content_hash != d.content_hash:
                replaced.append(i)
            else:
                reembed.append(i)
        if new:
            store.add_tiles([rows.row(batch[i][0].entry, batch[i][1]) for i in new], vectors[new], fingerprint)
        if replaced:
            store.replace_tiles(
                [batch[i][0].state.id for i in replaced],
                [rows.row(batch[i][0].entry, batch[i][1]) for i in replaced],
                vectors[replaced],
                fingerprint,
            )
        if reembed:
            ids = [batch[i][0].state.id for i in reembed]
            store.set_embeddings(ids, vectors[reembed], fingerprint)
            store.update_fingerprints([(batch[i][0].state.id, batch[i][0].entry.fingerprint) for i in reembed])
        report.new += len(new)
        report.changed += len(replaced)
        report.reembedded += len(reembed)
        bar.update(len(batch) + len(encoded.failed))
        run.job.save_counts()

    def finish(self) -> SourceReport:
        """Remove what the listing no longer names (when it reached its end), mark the source scanned, close it."""
        run, report, removed = self.run, self.report, self.todo.removed
        try:
            if self.reader is not None and removed is not None:
                if removed:
                    run.publisher.mark_dirty()
                run.store.delete_tiles(removed)
                report.removed = len(removed)
                run.store.mark_scanned(report.source_id)
                # An error is a state of a file: one that reads well now, or is gone, has none any more.
                run.store.clear_errors(report.source_id, keep_job=run.job.id)
        finally:
            self.close()
        if self.reader is not None and report.yielded_nothing and report.errors:
            report.problem = f"{report.errors} files refused; `histosearch status` lists them"
        return report

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
