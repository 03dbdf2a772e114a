"""Index and reindex: keep the store, the embeddings and the FAISS index in step with the archives.

For each source the reader's listing is compared with what the store holds: new tiles are embedded,
tiles whose cheap fingerprint moved are re-read and re-embedded only if their content hash changed,
tiles embedded by another model are re-embedded, and tiles no longer listed leave the store. Every
batch commits its tiles and their vectors in one transaction, so a run killed at any moment (kill -9
included) resumes where it stopped: no tile lost, none twice. The FAISS index is then brought in step
with the stored embeddings (new tiles added, removed ones deleted: indexer/build.py) in a new build
beside the live one, published by an atomic pointer swap.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from indexer.batches import BatchEncoder, Encoded
from indexer.build import publish
from indexer.lock import acquire as acquire_lock
from indexer.manifest import Manifest, identity, manifest_mpp
from indexer.pipeline import Decoded, DecodePool, Failed, default_workers
from indexer.ray_embed import EmbeddedBatches, RayEmbedPool
from indexer.slides import SlideReport, sync_slide_vectors
from indexer.texts import BUILTIN_CORPUS, TextItem, builtin_vocabulary, load_corpus
from search.archives.readers import Reader, Skipped, TileEntry, open_reader
from search.conch.encoder import Encoder
from search.core.errors import BadInput, HistosearchError
from search.core.settings import Settings
from search.storage.database import describe_error
from search.storage.index_directory import IndexDirectory
from search.storage.locks import IndexerLock
from search.storage.segmented import choose_kind
from search.storage.store import Store, TileState

DIRTY_KEY = "index_dirty"
MOVED_CHUNK = 4096


@dataclass
class SourceReport:
    uri: str
    kind: str = ""
    source_id: int | None = None
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    reembedded: int = 0
    removed: int = 0
    errors: int = 0
    # Why the input could not be read at all, when it could not, and how many of its tiles indexed before
    # are kept meanwhile.
    problem: str = ""
    kept: int = 0

    @property
    def tiles(self) -> int:
        """Tiles of this input that are indexed and up to date after the run."""
        return self.new + self.changed + self.unchanged + self.reembedded

    @property
    def yielded_nothing(self) -> bool:
        return self.tiles == 0 and self.removed == 0 and self.kept == 0

    def line(self) -> str:
        if self.yielded_nothing:
            return f"{self.uri}: no tiles ({self.problem or 'no tile image found in it'})"
        if self.kept:
            return f"{self.uri}: not read ({self.problem}); its {self.kept} indexed tiles are kept"
        return (
            f"{self.uri} ({self.kind or '?'}): {self.new} new, {self.changed} changed, {self.reembedded} re-embedded, "
            f"{self.removed} removed, {self.unchanged} unchanged, {self.errors} errors"
        )


@dataclass
class RunReport:
    job_id: int
    sources: list[SourceReport] = field(default_factory=list)
    texts_embedded: int = 0
    build: dict | None = None
    manifest: str = ""
    # Why the live index had to be rebuilt though nothing changed, when it was damaged.
    damage: str | None = None
    slides: SlideReport | None = None

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.sources)

    @property
    def tiles(self) -> int:
        return sum(s.tiles for s in self.sources)

    def summary(self) -> str:
        lines = [self.manifest] if self.manifest else []
        lines += [s.line() for s in self.sources]
        if self.texts_embedded:
            lines.append(f"texts: {self.texts_embedded} embedded")
        if self.damage:
            lines.append(
                f"index: the live index was damaged ({self.damage}): rebuilt from the stored vectors, "
                "nothing re-embedded"
            )
        if self.build:
            lines.append(f"index: build {self.build['id']}, {self.build['index_type']}, {self.build['count']} vectors")
        if self.slides:
            kinds = ", ".join(
                f"{k} {self.slides.updated.get(k, 0)} updated / {self.slides.removed.get(k, 0)} removed"
                for k in self.slides.updated
            )
            lines.append(f"slide vectors: {kinds}")
            lines.extend(f"slide vectors: {error}" for error in self.slides.errors)
        return "\n".join(lines)


@dataclass
class _Job:
    id: int
    message: str | None = None


@dataclass(frozen=True)
class _Work:
    entry: TileEntry
    state: TileState | None  # None: a new tile


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
        self.directory = IndexDirectory(settings.data_dir / "index")
        self._dirty = False
        self._pool: DecodePool | RayEmbedPool | None = None
        self._report = RunReport(0)
        # What build_index found wrong with the live index on disk, when it rebuilt it for that.
        self.damage: str | None = None

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
            with self._job(kind, args) as job:
                report = self._report
                manifest_obj = Manifest.load(manifest) if manifest else None
                if manifest_obj is not None:
                    report.manifest = f"manifest {manifest}: {len(manifest_obj)} rows keyed by '{manifest_obj.key}'"
                fingerprint = self.encoder.fingerprint
                changed = False
                for path in paths:
                    source = self._sync_source(Path(path), manifest, manifest_obj, job.id)
                    report.sources.append(source)
                    self._save_counts()
                    changed |= bool(source.new or source.changed or source.reembedded or source.removed)
                if report.sources and all(s.yielded_nothing for s in report.sources):
                    # Nothing to search came of any input: an error, not a quiet success.
                    raise BadInput("; ".join(s.line() for s in report.sources))
                report.texts_embedded = self._sync_texts(fingerprint)
                report.build = self.build_index(force=changed, retrain=retrain)
                report.damage = self.damage
                report.slides = sync_slide_vectors(self.store, self.settings, fingerprint)
                job.message = report.summary()
            return report
        finally:
            self._close_pool()
            lock.release()

    @contextmanager
    def _job(self, kind: str, args: dict) -> Iterator[_Job]:
        """A row in ``jobs`` for the run in the block (status, `histosearch status`): done with ``job.message``
        when the block ends, failed or interrupted when it raises."""
        self.store.mark_stale_jobs_interrupted()
        job = _Job(self.store.start_job(kind, args))
        self._report = RunReport(job.id)
        try:
            yield job
        except KeyboardInterrupt:
            self._save_counts()
            self.store.finish_job(job.id, "interrupted", "interrupted by the user")
            raise
        except Exception as exc:
            try:
                self._save_counts()
                self.store.finish_job(job.id, "failed", _reason(exc, self.settings.db_path))
            except Exception:  # noqa: BLE001 - a full disk may refuse this write too; `status` then shows
                pass  # the job interrupted by its dead pid, and the original error is what is raised
            raise
        self._save_counts()
        self.store.finish_job(job.id, "done", job.message)

    # --- progress and errors -----------------------------------------------------------------------

    def _save_counts(self, current: SourceReport | None = None) -> None:
        """The run's counts so far over every source, ``current`` (the source being synced) included:
        written with each commit, so `status` shows the whole run, never one source's share of it."""
        report = self._report
        sources = [*report.sources, current] if current is not None else report.sources
        done, errors = sum(s.tiles for s in sources), sum(s.errors for s in sources)
        self.store.update_job(report.job_id, done=done, errors=errors)

    def _error(self, report: SourceReport, where: str, reason: str, *prefixes: str) -> str:
        """Record that ``where`` cannot be used now. ``reason`` loses a leading ``prefix: `` naming the file
        again: the record already names it."""
        for prefix in prefixes:
            if reason.startswith(f"{prefix}: "):
                reason = reason[len(prefix) + 2 :]
                break
        self.store.record_error(where, reason, job_id=self._report.job_id, source_id=report.source_id)
        report.errors += 1
        return reason

    # --- sources ---------------------------------------------------------------------------------

    def _sync_source(
        self, path: Path, manifest_path: Path | None, manifest: Manifest | None, job_id: int
    ) -> SourceReport:
        uri = str(path.resolve())
        report = SourceReport(uri)
        try:
            reader = open_reader(path, self.settings)
        except BadInput as exc:
            # A missing or unreadable archive keeps what was indexed from it: nothing is lost to bad input.
            report.problem = self._error(report, uri, exc.message, str(path), path.name, uri)
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
            work, seen, complete = self._plan(reader, existing, report)
            self._embed(reader, work, source_id, manifest, report)
            if complete:
                removed = [state.id for locator, state in existing.items() if locator not in seen]
                if removed:
                    self._mark_dirty()
                self.store.delete_tiles(removed)
                report.removed = len(removed)
                self.store.mark_scanned(source_id)
                # An error is a state of a file: one that reads well now, or is gone, has none any more.
                self.store.clear_errors(source_id, keep_job=job_id)
        finally:
            reader.close()
        if report.yielded_nothing and report.errors:
            report.problem = f"{report.errors} files refused; `histosearch status` lists them"
        return report

    @staticmethod
    def _where(reader: Reader, uri: str, path: str) -> str:
        """A file of an input as people find it: its own path in a folder, ``archive:member`` otherwise."""
        if reader.kind == "folder" and path not in ("", "."):
            return os.path.join(uri, path)
        return f"{uri}:{path}" if path not in ("", ".", reader.root.name) else uri

    def _plan(
        self, reader: Reader, existing: dict[str, TileState], report: SourceReport
    ) -> tuple[list[_Work], set[str], bool]:
        fingerprint = self.encoder.fingerprint
        work: list[_Work] = []
        seen: set[str] = set()
        uri = report.uri
        try:
            for item in reader.scan():
                if isinstance(item, Skipped):
                    self._error(report, self._where(reader, uri, item.path), item.reason, item.path)
                    continue
                seen.add(item.locator)
                state = existing.get(item.locator)
                if state and state.fingerprint == item.fingerprint and state.model_fingerprint == fingerprint:
                    report.unchanged += 1
                else:
                    work.append(_Work(item, state))
        except (BadInput, OSError, EOFError) as exc:
            # A listing cut short must not read as "every later tile was removed".
            reason = exc.message if isinstance(exc, BadInput) else f"listing failed ({exc})"
            self._error(report, uri, reason, str(reader.root), reader.root.name)
            return work, seen, False
        return work, seen, True

    def _embed(
        self,
        reader: Reader,
        work: list[_Work],
        source_id: int,
        manifest: Manifest | None,
        report: SourceReport,
    ) -> None:
        if not work:
            return
        encoder = self.encoder
        by_locator = {w.entry.locator: w for w in work}
        identities = _Identities(self.store, source_id, manifest, self.settings.path_pattern)
        # Tiles whose fingerprint moved but whose content did not: written in chunks, not a transaction each.
        moved: list[tuple[int, str]] = []
        bar = tqdm(total=len(work), unit="tile", desc=Path(reader.root).name, disable=not self.progress)
        done = 0

        def write(encoded: Encoded[tuple[_Work, Decoded]]) -> None:
            """One batch's tiles and vectors, in one transaction per kind of change."""
            nonlocal done
            for (w, _), reason in encoded.failed:
                self._error(report, self._where(reader, report.uri, w.entry.path), reason, w.entry.locator)
            batch, vectors = encoded.items, encoded.vectors
            if batch:
                self._mark_dirty()
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
                    [identities.row(batch[i][0].entry, batch[i][1]) for i in new], vectors[new], encoder.fingerprint
                )
            if replaced:
                self.store.replace_tiles(
                    [batch[i][0].state.id for i in replaced],
                    [identities.row(batch[i][0].entry, batch[i][1]) for i in replaced],
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
            self._save_counts(report)

        fingerprint = encoder.fingerprint
        batches: BatchEncoder[tuple[_Work, Decoded]] | EmbeddedBatches[tuple[_Work, Decoded]]
        if self.settings.ray_address is not None:  # the tiles come embedded, from Ray actors
            batches = EmbeddedBatches(encoder.batch_size)
        else:
            batches = BatchEncoder(encoder, self.settings.max_image_pixels)
        try:
            for result in self._decode_pool().decode(reader, [w.entry.locator for w in work]):
                w = by_locator[result.locator]
                if isinstance(result, Failed):
                    # A tile already indexed keeps its old vector until it reads well again.
                    where = self._where(reader, report.uri, w.entry.path)
                    self._error(report, where, result.reason, f"{reader.root.name}:{w.entry.locator}", w.entry.locator)
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
            with self._job("index-texts", {"files": [str(p) for p in files], "corpus": corpus}) as job:
                added = 0
                for path in files:
                    added += self._add_texts(corpus or Path(path).stem, load_corpus(Path(path)))
                self._sync_texts(self.encoder.fingerprint)
                job.message = f"{added} texts added"
            return added
        finally:
            lock.release()

    # --- FAISS -------------------------------------------------------------------------------------

    def _mark_dirty(self) -> None:
        """Remember, across crashes, that the store changed since the last published index: a run killed
        between its commits and the publish leaves the next run a rebuild to do even if it finds no work."""
        if not self._dirty:
            self.store.set_meta(DIRTY_KEY, "1")
            self._dirty = True

    def build_index(self, force: bool = False, fingerprint: str | None = None, retrain: bool = False) -> dict | None:
        """Publish an index of the stored embeddings beside the live one, incrementally where it can be
        (indexer/build.py; ``retrain``: train the quantiser again). ``fingerprint``: the model whose vectors
        to index (default: the configured model, which loads it)."""
        fingerprint = fingerprint or self.encoder.fingerprint
        count = self.store.counts()["embedded_by_model"].get(fingerprint, 0)
        live = self.store.live_build()
        requested = choose_kind(count, self.settings.index_type, self.settings.exact_max, self.settings.compress_above)
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
        build = publish(
            self.store, self.directory, fingerprint, self.settings, retrain=retrain or self.damage is not None
        )
        self.store.set_meta(DIRTY_KEY, "0")
        self._dirty = False
        return build


class _Identities:
    """Tile rows with their case and slide, resolved once per slide/case key per run."""

    def __init__(self, store: Store, source_id: int, manifest: Manifest | None, pattern: str) -> None:
        self.store = store
        self.source_id = source_id
        self.manifest = manifest
        self.pattern = pattern
        self._cases: dict[str, int] = {}
        self._slides: dict[str, int] = {}

    def row(self, entry: TileEntry, decoded: Decoded) -> dict:
        wsi = entry.slide_path is not None
        case_key, slide_key, extra = identity(entry.slide_path or entry.path, self.manifest, self.pattern, slide=wsi)
        case_id = None
        if case_key:
            if case_key not in self._cases:
                self._cases[case_key] = self.store.upsert_case(case_key)
            case_id = self._cases[case_key]
        slide_id = None
        if slide_key:
            if slide_key not in self._slides:
                # A whole slide's level-0 scale and size come from the slide; a folder of tiles has none.
                info = entry.slide_info
                self._slides[slide_key] = self.store.upsert_slide(
                    slide_key,
                    self.source_id,
                    case_id,
                    entry.slide_path or str(Path(entry.path).parent),
                    mpp=info.mpp if info else None,
                    width=info.width if info else None,
                    height=info.height if info else None,
                )
            slide_id = self._slides[slide_key]
        return {
            "source_id": self.source_id,
            "locator": entry.locator,
            "path": entry.path,
            "slide_id": slide_id,
            "level": entry.level,
            "x": entry.x,
            "y": entry.y,
            "size": entry.size,
            "mpp": entry.mpp if entry.mpp is not None else manifest_mpp(extra),
            "width": decoded.width,
            "height": decoded.height,
            "content_hash": decoded.content_hash,
            "fingerprint": entry.fingerprint,
            "meta": {**extra, **entry.meta},
        }


def _reason(exc: Exception, db_path: Path) -> str:
    """What a failed job's record says: one line, the path included, no traceback."""
    if isinstance(exc, HistosearchError):
        return exc.message
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    return describe_error(exc, db_path) or str(exc)
