"""Peak anonymous memory of writing an index part (the bulk of a full or merge build): the writer before two
passes against ``build_writer._write_part``.

    python -m bench.build_memory [--vectors 2000000] [--kind ivfsq8] [--train-iterations 4] [--work-dir DIR]

Synthetic 512-d vectors shaped like an archive's (``bench.ann.SyntheticEmbeddings``) are written as float16 to a
memory-mapped file, as the vector segments a build reads them, with ascending tile ids and segment locations. A
quantiser is trained with the ``nlist`` a build of that size gets, on 39 points a list with k-means cut to
``--train-iterations``: the memory depends on the lists' sizes, not on how good they are. Then, each writer in a
fresh process so that its peak is its own, on the same trained index and batches of ``indexer.build.BATCH``:

- baseline, inline below: ``add_with_ids`` batch by batch into the IDMap2 (IVF lists growing as they fill,
  IDMap2's id -> position hash map);
- new: ``build_writer._write_part``: a first pass assigns the vectors to lists, the lists are allocated at their
  final size, a second pass encodes into them; no hash map; freed heap handed back (``malloc_trim``).

Each reports its peak RssAnon (sampled every 0.2 s: the pages of the mapped vector file are not in it), the
RssAnon it started from and the one left once the writer returned (what a build's checks start from; the
baseline's also after a ``malloc_trim``), its time, and its part file's sha256: the two files must be the same.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import faiss
import numpy as np

from bench._machine import describe_machine
from bench._memory import AnonymousPeak, rss_anon_gib
from bench.ann import SyntheticEmbeddings
from indexer.build import BATCH
from search.storage import build_writer
from search.storage.index_types import _new_index
from search.storage.segmented import _ids_name, _locations_name
from search.storage.vectors import VectorIndex, _as_ids

DIM = 512
PART = "part.faiss"
SEGMENT = 3


def one_pass_writer(build_dir: Path, name: str, trained: faiss.Index, batches) -> int:
    """The part writer as it was before two passes: the baseline."""
    index = build_writer._copy(trained)
    located = []
    for ids, vectors, locations in batches:
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), _as_ids(ids))
        located.append(np.asarray(locations, dtype=np.int64))
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexIVF):
        inner.make_direct_map()
    VectorIndex(index).save(build_dir / name)
    ids = faiss.vector_to_array(index.id_map)
    order = np.argsort(ids, kind="stable")
    np.save(build_dir / _ids_name(name), ids[order])
    if located:
        np.save(build_dir / _locations_name(name), np.concatenate(located)[order])
    return int(index.ntotal)


def prepare(work: Path, n: int, kind: str, iterations: int) -> tuple[Path, Path, int | None]:
    """The float16 vector file and the trained (empty) index the writers start from, and its lists."""
    vectors_path, trained_path = work / "vectors.npy", work / "trained.faiss"
    mixture = SyntheticEmbeddings(DIM)
    vectors = np.lib.format.open_memmap(vectors_path, mode="w+", dtype=np.float16, shape=(n, DIM))
    for start in range(0, n, BATCH):
        m = min(BATCH, n - start)
        vectors[start : start + m] = mixture.sample(m, seed=start, chunk=m)
    vectors.flush()
    trained = _new_index(kind, DIM, n, None)
    inner = faiss.downcast_index(trained.index)
    if kind in build_writer.TRAINED_TYPES:
        inner.cp.niter = iterations
        rows = np.sort(np.random.default_rng(0).choice(n, min(n, 39 * inner.nlist), replace=False))
        trained.train(np.asarray(vectors[rows], dtype=np.float32))
    faiss.write_index(trained, str(trained_path))
    return vectors_path, trained_path, getattr(inner, "nlist", None)


def measure(writer: str, vectors_path: Path, trained_path: Path, out: Path) -> dict:
    """Runs in a fresh process: one writer over every vector, and what it cost."""
    vectors = np.load(vectors_path, mmap_mode="r")
    trained = faiss.read_index(str(trained_path))
    n = len(vectors)
    ids = 2 * np.arange(n, dtype=np.int64) + 1  # ascending, not contiguous: as a store's embedded ids
    locations = (SEGMENT << 32) + np.arange(n, dtype=np.int64)

    def batches():
        for start in range(0, n, BATCH):
            rows = slice(start, start + BATCH)
            yield ids[rows], vectors[rows], locations[rows]

    out.mkdir(parents=True)
    before = rss_anon_gib()
    peak = AnonymousPeak()
    start = time.perf_counter()
    if writer == "baseline":
        one_pass_writer(out, PART, trained, batches())
    else:
        build_writer._write_part(out, PART, trained, batches)
    seconds = time.perf_counter() - start
    after = rss_anon_gib()
    build_writer._trim_heap()
    trimmed = rss_anon_gib()
    digest = hashlib.sha256()
    with open(out / PART, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return {
        "peak": peak.gib(),
        "before": before,
        "after": after,
        "trimmed": trimmed,
        "seconds": seconds,
        "sha256": digest.hexdigest(),
        "bytes": (out / PART).stat().st_size,
    }


def _in_child(*args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=2_000_000)
    parser.add_argument("--kind", default="ivfsq8", choices=sorted(build_writer.TRAINED_TYPES | {"flat"}))
    parser.add_argument("--train-iterations", type=int, default=4)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="histosearch-build-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        vectors_path, trained_path, nlist = prepare(work, args.vectors, args.kind, args.train_iterations)
        took = time.perf_counter() - start
        print(f"{args.vectors:,} x {DIM}-d vectors, {args.kind}, {nlist} lists: prepared in {took:.0f} s")
        rows = {w: _in_child(w, vectors_path, trained_path, work / w) for w in ("baseline", "new")}
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"part file: {rows['new']['bytes'] / 2**30:.2f} GiB")
    print("writer    peak RssAnon  at start  after  after malloc_trim  time")
    for writer, row in rows.items():
        print(
            f"{writer:<9} {row['peak']:>8.2f} GiB  {row['before']:>8.2f}  {row['after']:>5.2f}"
            f"  {row['trimmed']:>17.2f}  {row['seconds']:>5.0f} s"
        )
    base, new = rows["baseline"], rows["new"]
    ratio, slower = new["peak"] / base["peak"], new["seconds"] / base["seconds"]
    print(f"ratio new/baseline: peak RssAnon {ratio:.3f}, time {slower:.3f}")
    print(f"same part file: {'yes' if base['sha256'] == new['sha256'] else 'NO'}")
    print(describe_machine())


if __name__ == "__main__":
    main()
