"""Archive scale on one machine: ingest, full and incremental index builds, queries, disk, with no model.

    python -m bench.scale [--sizes 1000000 10000000] [--batch 1000] [--queries 50] [--work-dir DIR]
                          [--ingest-only]

For each size a fresh data folder is filled with synthetic tile rows (one slide's tiles together, 1,000
tiles a slide, 20 slides a case) and synthetic 512-d embeddings shaped like an archive's
(``bench.ann.SyntheticEmbeddings``), written through the store exactly as the indexer writes them
(``add_tiles`` in batches of ``--batch``; ``--ingest-only`` stops there and a later run with the same
``--work-dir`` starts from that folder, so the long ingest and the builds need not share one sitting). Then,
each phase in a fresh process so its peak RSS is its own:

- a full build and publish of the index (``indexer.build.publish``: the type ``auto`` picks by size),
- +1 % tiles and an incremental publish, then removing 1 % of the tiles and an incremental publish,
- queries through the engine (``Engine.search_text`` with the text tower replaced by fresh draws from the
  mixture: the HTTP layer and the model are left out), k = 24, without and with a case filter (the 20,000 tiles of
  one case), and recall@10 of the unfiltered answers against exact search over every stored vector; IVF
  builds are queried at the nprobe the build tuned (``target_recall``) and, query by query in turn, at the index
  type's default nprobe, the baseline of the same run;
- the same engine behind the web app on a real uvicorn server: distinct and repeated (query cache) text queries
  over HTTP (``/api/search``), still without the model.

Goals at 10M on a 2-core, 24 GB machine: ingest at the end within 20 % of the start, +1 % published in
under 60 s, peak RSS under 8 GB, query p95 under 50 ms at recall@10 >= 0.95. Peak RSS counts the pages of the
memory-mapped vector files a build or a query has read (up to all of them: 10 GB at 10M), which the kernel drops
before anything else, so each phase also reports its peak anonymous memory, the part that must fit in RAM.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from bench._machine import describe_machine
from bench._memory import AnonymousPeak
from bench.ann import SyntheticEmbeddings

FINGERPRINT = "bench-scale-synthetic"
DIM = 512
TILES_PER_SLIDE = 1000
SLIDES_PER_CASE = 20
GRID = 448
K = 24
# An ingest's figures, kept in its data folder for a later run to reuse.
INGESTED_NAME = "ingested.json"
# Share of the rows whose ingest rate is "the start" and "the end".
EDGE = 0.05


def _settings(data_dir: Path, compress_above: int | None):
    from search.core.settings import load_settings

    return load_settings(data_dir=data_dir, device="cpu", compress_above=compress_above)


def _peak_rss_gib() -> float:
    """Peak resident set, the vector files' memory-mapped pages included (the kernel drops those first)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def ingest(data_dir: Path, start: int, n: int, batch: int) -> dict:
    """Rows ``start .. start + n`` with their vectors; rows/s over the first and the last 5 % of them."""
    from search.storage.store import Store

    store = Store.from_settings(_settings(data_dir, None))
    mixture = SyntheticEmbeddings(DIM)
    source_id = store.get_or_create_source("folder", "/archive/synthetic")
    slides: dict[int, int] = {}
    cases: dict[int, int] = {}
    spent = []  # (rows, seconds) per batch, store time only
    cosine_error = None
    for begin in range(start, start + n, batch):
        m = min(batch, start + n - begin)
        vectors = mixture.sample(m, seed=begin, chunk=m)
        rows = []
        for i in range(begin, begin + m):
            slide = i // TILES_PER_SLIDE
            if slide not in slides:
                case = slide // SLIDES_PER_CASE
                if case not in cases:
                    cases[case] = store.upsert_case(f"case{case:05d}")
                slides[slide] = store.upsert_slide(f"slide{slide:06d}", source_id, cases[case], f"s{slide}.svs")
            cell = i % TILES_PER_SLIDE
            rows.append(
                {
                    "source_id": source_id,
                    "locator": f"s{slide}.svs@L0:{cell % 40 * GRID},{cell // 40 * GRID}:{GRID}",
                    "path": f"s{slide}.svs",
                    "slide_id": slides[slide],
                    "level": 0,
                    "x": cell % 40 * GRID,
                    "y": cell // 40 * GRID,
                    "size": GRID,
                    "content_hash": f"{i:064x}",
                    "fingerprint": f"{i}",
                    "meta": {"organ": ("breast", "colon", "lung", "prostate")[slide % 4]},
                }
            )
        t0 = time.perf_counter()
        ids = store.add_tiles(rows, vectors, FINGERPRINT)
        spent.append((m, time.perf_counter() - t0))
        if cosine_error is None:
            queries = mixture.sample(20, seed=999_999)
            stored = store.get_embeddings(ids, FINGERPRINT)
            cosine_error = float(np.abs(queries @ stored.T - queries @ vectors.T).max())
    store.close()
    rows_done = np.cumsum([r for r, _ in spent])
    head = [i for i, done in enumerate(rows_done) if done <= max(EDGE * n, batch)]
    tail = [i for i, done in enumerate(rows_done) if done > n - max(EDGE * n, batch)]

    def rate(batches: list[int]) -> float:
        return sum(spent[i][0] for i in batches) / sum(spent[i][1] for i in batches)

    return {
        "rate_start": rate(head),
        "rate_end": rate(tail),
        "seconds": sum(s for _, s in spent),
        "cosine_error": cosine_error,
        "rss": _peak_rss_gib(),
    }


def publish(data_dir: Path, compress_above: int | None) -> dict:
    from indexer.build import publish as publish_index
    from search.storage.index_directory import IndexDirectory
    from search.storage.store import Store

    settings = _settings(data_dir, compress_above)
    anonymous = AnonymousPeak()
    store = Store.from_settings(settings)
    t0 = time.perf_counter()
    build = publish_index(store, IndexDirectory(data_dir / "index"), FINGERPRINT, settings)
    seconds = time.perf_counter() - t0
    store.close()
    return {
        "seconds": seconds,
        "rss": _peak_rss_gib(),
        "anonymous": anonymous.gib(),
        "type": build["index_type"],
        "count": build["count"],
    }


def remove(data_dir: Path, share: float) -> dict:
    from search.storage.store import Store

    store = Store.from_settings(_settings(data_dir, None))
    ids = store.embedded_ids(FINGERPRINT)
    chosen = np.random.default_rng(5).choice(ids, int(share * len(ids)), replace=False)
    t0 = time.perf_counter()
    store.delete_tiles(np.sort(chosen).tolist())
    seconds = time.perf_counter() - t0
    store.close()
    return {"seconds": seconds, "removed": len(chosen)}


class _QueryVectors:
    """Stands in for the encoder: a text's vector is a fresh draw from the mixture, as a text query would be."""

    fingerprint = FINGERPRINT

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors
        self.mixture = SyntheticEmbeddings(DIM)

    def encode_texts(self, texts: list[str], templates: object = None) -> np.ndarray:
        # Words the engine embeds on its own (a hit's match on the query's words) get a draw of their own.
        return np.stack([self.vectors[t] if t in self.vectors else self._draw(t) for t in texts])

    def _draw(self, text: str) -> np.ndarray:
        return self.mixture.sample(1, seed=zlib.crc32(text.encode()))[0]


def query(data_dir: Path, n: int, compress_above: int | None) -> dict:
    from search.engine.engine import Engine, Filters
    from search.storage.index_types import default_nprobe
    from search.storage.store import Store

    settings = _settings(data_dir, compress_above)
    anonymous = AnonymousPeak()
    draws = SyntheticEmbeddings(DIM).sample(4 * n + 2, seed=123_456)
    texts = {f"query {i}": v for i, v in enumerate(draws)}
    engine = Engine(settings, encoder=_QueryVectors(texts))
    store: Store = engine.store
    case = store.get_tiles([int(store.embedded_ids(FINGERPRINT)[0])])[0]["case_key"]
    names = list(texts)
    engine.search_text(names[-1], k=K)  # loads the index
    engine.search_text(names[-2], k=K, filters=Filters(case=case))
    index = engine.live_index.get()
    # The build's tuned nprobe against the index type's default, query by query in turn, so that neither
    # finds the page cache warmer than the other.
    tuned = index.nprobe
    default = default_nprobe(index.nlist) if index.nlist else None
    plain, filtered, baseline, found = [], [], [], []
    for i in range(n):
        t0 = time.perf_counter()
        result = engine.search_text(names[i], k=K)
        plain.append(time.perf_counter() - t0)
        found.append([r["tile_id"] for r in result["results"][:10]])
        t0 = time.perf_counter()
        engine.search_text(names[n + i], k=K, filters=Filters(case=case))
        filtered.append(time.perf_counter() - t0)
        if default is not None:
            index.nprobe = default
            t0 = time.perf_counter()
            engine.search_text(names[3 * n + i], k=K)
            baseline.append(time.perf_counter() - t0)
            index.nprobe = tuned
    # Exact top 10 over every stored vector, streamed.
    queries = draws[:n]
    best_scores = np.full((n, 0), -np.inf, np.float32)
    best_ids = np.zeros((n, 0), np.int64)
    for ids, vectors in store.iter_embeddings(FINGERPRINT, batch=262_144):
        scores = np.hstack([best_scores, queries @ vectors.T])
        all_ids = np.hstack([best_ids, np.broadcast_to(ids, (n, len(ids)))])
        top = np.argpartition(-scores, 9, axis=1)[:, :10]
        best_scores, best_ids = np.take_along_axis(scores, top, axis=1), np.take_along_axis(all_ids, top, axis=1)

    def recall(answers) -> float:
        return float(np.mean([len(set(a) & set(b.tolist())) / 10 for a, b in zip(answers, best_ids, strict=True)]))

    default_recall = None
    if default is not None:
        index.nprobe = default
        default_recall = recall(index.search(queries, 10)[1].tolist())
        index.nprobe = tuned
    http = _over_http(settings, engine, names[2 * n : 3 * n])
    engine.close()
    ms = lambda xs: (np.percentile(xs, 50) * 1000, np.percentile(xs, 95) * 1000) if xs else None  # noqa: E731
    return {
        "plain": ms(plain),
        "filtered": ms(filtered),
        "recall": recall(found),
        "nprobe": tuned,
        "default_nprobe": default,
        "default_plain": ms(baseline),
        "default_recall": default_recall,
        "parts": len(index.manifest.parts),
        "http": http,
        "rss": _peak_rss_gib(),
        "anonymous": anonymous.gib(),
    }


def _over_http(settings, engine, texts: list[str]) -> dict:
    """p50/p95 ms of distinct and of repeated text queries through the web app on a uvicorn server."""
    import httpx

    from bench.query import start_server, timed_ms
    from webui.app import create_app

    server, thread, base = start_server(create_app(settings, engine))
    try:
        with httpx.Client(base_url=base, timeout=120) as client:

            def get(text: str) -> None:
                client.get("/api/search", params={"q": text, "k": K}).raise_for_status()

            get(texts[0])
            distinct = timed_ms(lambda i: get(texts[i]), len(texts))
            repeated = timed_ms(lambda i: get(texts[0]), len(texts))
    finally:
        server.should_exit = True
        thread.join(10)
    ms = lambda xs: (float(np.percentile(xs, 50)), float(np.percentile(xs, 95)))  # noqa: E731
    return {"distinct": ms(distinct[1:]), "cached": ms(repeated)}


def disk(data_dir: Path) -> dict:
    def size(path: Path) -> int:
        if path.is_file():
            return path.stat().st_size
        seen, total = set(), 0
        for p in path.rglob("*"):
            if p.is_file() and p.stat().st_ino not in seen:  # hard-linked parts counted once
                seen.add(p.stat().st_ino)
                total += p.stat().st_size
        return total

    db = sum(size(p) for p in data_dir.glob("histosearch.db*"))
    return {"db": db, "vectors": size(data_dir / "vectors"), "index": size(data_dir / "index")}


def _run(pool_fn, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(pool_fn, *args).result()


def run_size(n: int, work: Path, batch: int, queries: int, compress_above: int | None, ingest_only: bool) -> dict:
    data_dir = work / f"scale-{n}"
    ingested = data_dir / INGESTED_NAME
    out: dict = {"n": n}
    if ingested.is_file() and not (data_dir / "index").exists():
        # An ingest that --ingest-only left in this work folder: its figures stand for this run's.
        out["ingest"] = json.loads(ingested.read_text())
        print(f"  {n}: ingest reused from {data_dir}", flush=True)
    else:
        shutil.rmtree(data_dir, ignore_errors=True)
        out["ingest"] = _run(ingest, data_dir, 0, n, batch)
        ingested.write_text(json.dumps(out["ingest"]))
        print(f"  {n}: ingest done {out['ingest']}", flush=True)
    if ingest_only:
        return out
    out["full"] = _run(publish, data_dir, compress_above)
    print(f"  {n}: full build {out['full']}", flush=True)
    extra = max(1, n // 100)
    out["ingest_more"] = _run(ingest, data_dir, n, extra, batch)
    out["add"] = _run(publish, data_dir, compress_above)
    print(f"  {n}: +1% {out['add']}", flush=True)
    out["remove"] = _run(remove, data_dir, 0.01)
    out["delete"] = _run(publish, data_dir, compress_above)
    print(f"  {n}: -1% {out['delete']}", flush=True)
    out["query"] = _run(query, data_dir, queries, compress_above)
    print(f"  {n}: query {out['query']}", flush=True)
    out["disk"] = disk(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)
    return out


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _pair(values: tuple[float, float] | None) -> str:
    return "n/a" if values is None else f"{values[0]:.1f} / {values[1]:.1f}"


def _fixed(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(tuned: tuple[float, float], default: tuple[float, float] | None) -> str:
    return "n/a" if default is None else f"{tuned[1] / default[1]:.2f}"


def report(results: list[dict]) -> None:
    cols = [r["n"] for r in results]
    print(f"\n{'tiles':44s}" + "".join(f"{n:>16,d}" for n in cols))
    rows = [
        ("ingest rows/s, first 5 %", lambda r: f"{r['ingest']['rate_start']:,.0f}"),
        ("ingest rows/s, last 5 %", lambda r: f"{r['ingest']['rate_end']:,.0f}"),
        ("  end / start", lambda r: f"{r['ingest']['rate_end'] / r['ingest']['rate_start']:.2f}"),
        ("ingest total s", lambda r: f"{r['ingest']['seconds']:,.0f}"),
        ("full build: index type", lambda r: r["full"]["type"]),
        ("full build s", lambda r: f"{r['full']['seconds']:,.1f}"),
        ("full build peak RSS GiB (mapped files too)", lambda r: f"{r['full']['rss']:.2f}"),
        ("full build peak anonymous GiB", lambda r: _gib(r["full"].get("anonymous"))),
        ("publish +1 % s", lambda r: f"{r['add']['seconds']:,.1f}"),
        ("publish +1 % peak RSS GiB", lambda r: f"{r['add']['rss']:.2f}"),
        ("publish +1 % peak anonymous GiB", lambda r: _gib(r["add"].get("anonymous"))),
        ("delete 1 % rows s", lambda r: f"{r['remove']['seconds']:,.1f}"),
        ("publish -1 % s", lambda r: f"{r['delete']['seconds']:,.1f}"),
        ("query p50 ms (k=24)", lambda r: f"{r['query']['plain'][0]:.1f}"),
        ("query p95 ms", lambda r: f"{r['query']['plain'][1]:.1f}"),
        ("query + case filter p50 ms", lambda r: f"{r['query']['filtered'][0]:.1f}"),
        ("query + case filter p95 ms", lambda r: f"{r['query']['filtered'][1]:.1f}"),
        ("recall@10 vs exact", lambda r: f"{r['query']['recall']:.3f}"),
        ("default nprobe: query p50 / p95 ms", lambda r: _pair(r["query"].get("default_plain"))),
        ("default nprobe: recall@10", lambda r: _fixed(r["query"].get("default_recall"), 3)),
        ("  query p95 tuned / default", lambda r: _ratio(r["query"]["plain"], r["query"].get("default_plain"))),
        ("HTTP text p50 / p95 ms (no model)", lambda r: "{:.1f} / {:.1f}".format(*r["query"]["http"]["distinct"])),
        ("HTTP repeated text p50 / p95 ms", lambda r: "{:.1f} / {:.1f}".format(*r["query"]["http"]["cached"])),
        (
            "index parts / nprobe (default)",
            lambda r: f"{r['query']['parts']} / {r['query']['nprobe']} ({r['query'].get('default_nprobe')})",
        ),
        ("query process peak RSS GiB", lambda r: f"{r['query']['rss']:.2f}"),
        ("query process peak anonymous GiB", lambda r: _gib(r["query"].get("anonymous"))),
        ("max |cos f16 - cos f32|", lambda r: f"{r['ingest']['cosine_error']:.1e}"),
        ("disk bytes/tile: database", lambda r: f"{r['disk']['db'] / r['n']:,.0f}"),
        ("disk bytes/tile: vector segments", lambda r: f"{r['disk']['vectors'] / r['n']:,.0f}"),
        ("disk bytes/tile: index (live + previous)", lambda r: f"{r['disk']['index'] / r['n']:,.0f}"),
        ("disk bytes/tile: total", lambda r: f"{sum(r['disk'].values()) / r['n']:,.0f}"),
    ]
    for name, cell in rows:
        print(f"{name:44s}" + "".join(f"{cell(r):>16s}" for r in results))
    print(describe_machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--batch", type=int, default=1000, help="tiles per add_tiles call (one transaction)")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--compress-above", type=int, help="the compress_above setting (default: the setting's)")
    parser.add_argument("--work-dir", type=Path, help="where the data folders go (default: a temporary folder)")
    parser.add_argument(
        "--ingest-only",
        action="store_true",
        help="fill the data folders and stop; a later run with the same --work-dir starts from them",
    )
    args = parser.parse_args()
    if args.ingest_only and args.work_dir is None:
        parser.error("--ingest-only needs --work-dir: the folder a later run starts from")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="histosearch-scale-"))
    results = []
    for n in args.sizes:
        results.append(run_size(n, work, args.batch, args.queries, args.compress_above, args.ingest_only))
        if not args.ingest_only:
            report(results)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
