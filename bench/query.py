"""Query latency over HTTP: a real uvicorn server, an httpx client, the full CONCH model.

    python -m bench.query [--vectors 100000] [--n 50]

The index holds ``--vectors`` synthetic 512-d embeddings shaped like an archive's (bare store rows, the
index the indexer publishes for that many: IVF at 100k, its nprobe tuned to ``target_recall``); the model
is ``conch_ViT-B-16`` with random weights (speed does not depend on their values) and the CONCH tokenizer
when ../shared/conch_reference has it. Every text and image query is distinct, so the figures are for
queries the server has not seen (their words are mostly the vocabulary's, embedded ahead as the indexer
does; a few are new and embedded in the query's own pass); a repeated text (served from the query cache) is
measured apart. Every result option is at its default, so each query also pays for the issue-10 work: exact re-rank,
calibration against the build's sample, spread across slides, the hits' best vocabulary terms and
per-word scores, and the query log; rotation/flip averaging (off by default on a CPU) and composed
queries have rows of their own. Goals on a 2-core CPU: text p50 <= 100 ms (tighter:
60 ms), image p50 <= 2 s.
"""

from __future__ import annotations

import argparse
import io
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

from bench._machine import describe_machine
from bench.ann import SyntheticEmbeddings
from bench.encoder import bench_tokenizer, random_model
from indexer.build import publish
from indexer.texts import builtin_vocabulary, sync_word_vectors
from search.conch.encoder import Encoder
from search.core.settings import load_settings
from search.engine.engine import Engine
from search.storage.index_directory import IndexDirectory
from search.storage.store import Store
from webui.app import create_app

FINGERPRINT = "conch_ViT-B-16-bench-random"
GOALS_MS = {"text": (100.0, 60.0), "image": (2000.0, None)}
TERMS = [
    "cribriform glands", "comedonecrosis", "signet ring cells", "tumour-infiltrating lymphocytes",
    "mitotic figures", "nuclear pleomorphism", "desmoplastic stroma", "perineural invasion",
    "keratin pearls", "psammoma bodies", "goblet cells", "apoptotic bodies", "foamy macrophages",
    "lymphovascular invasion", "micropapillary pattern", "clear cell change",
]  # fmt: skip
ROWS_PER_INSERT = 20_000


def make_encoder(device: str = "auto", dtype: str = "fp32") -> tuple[Encoder, str]:
    model = random_model()
    context = model.cfg.text_cfg.context_length
    tokenizer, which = bench_tokenizer(context, model.cfg.text_cfg.pad_id)
    return Encoder(model, tokenizer, fingerprint=FINGERPRINT, device=device, dtype=dtype), which


def build_store(settings, n: int, encoder: Encoder) -> float:
    """n bare tile rows with synthetic embeddings shaped like an archive's (``bench.ann``), the built-in
    vocabulary and its words embedded, and the index published as the indexer publishes it (the type ``auto`` picks
    for n, its nprobe tuned, recall and calibration sample checked); returns seconds."""
    start = time.perf_counter()
    dim = encoder.dim
    store = Store.from_settings(settings)
    vocabulary = builtin_vocabulary()
    texts = [item.text for item in vocabulary]
    store.add_texts(
        "vocabulary", [(item.text, dict(item.tags)) for item in vocabulary], encoder.encode_texts(texts), FINGERPRINT
    )
    # As `histosearch index` does: the vocabulary's words embedded ahead of queries.
    sync_word_vectors(store, encoder, settings.data_dir, texts_changed=True)
    source_id = store.get_or_create_source("folder", str(settings.data_dir / "tiles"))
    cases = [store.upsert_case(f"case{c:03d}") for c in range(20)]
    slides = [
        store.upsert_slide(f"slide{s:04d}", source_id, cases[s % 20], f"case{s % 20:03d}/slide{s:04d}")
        for s in range(200)
    ]
    ids = []
    vectors = SyntheticEmbeddings(dim).sample(n, seed=0)
    for begin in range(0, n, ROWS_PER_INSERT):
        rows = [
            {
                "source_id": source_id,
                "locator": f"tile_{i:07d}.jpg",
                "path": f"tile_{i:07d}.jpg",
                "slide_id": slides[i % len(slides)],
                "content_hash": f"{i:064x}",
                "fingerprint": f"{i}",
                "meta": {"organ": ("breast", "colon", "lung", "prostate")[i % 4]},
            }
            for i in range(begin, min(n, begin + ROWS_PER_INSERT))
        ]
        ids += store.add_tiles(rows, vectors[begin : begin + len(rows)], FINGERPRINT)
    publish(store, IndexDirectory(settings.data_dir / "index"), FINGERPRINT, settings)
    store.close()
    return time.perf_counter() - start


def he_like_jpeg(seed: int, size: int = 448) -> bytes:
    """A pink/purple textured JPEG: a distinct upload per seed, so no query is served from a cache."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 80, (size, size, 3)) + np.array([170, 90, 160])
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def start_server(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it Nagle's algorithm and delayed ACKs add ~40 ms to every response (as `serve` never does).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def timed_ms(call: Callable[[int], object], n: int) -> np.ndarray:
    out = []
    for i in range(n):
        start = time.perf_counter()
        call(i)
        out.append((time.perf_counter() - start) * 1000)
    return np.asarray(out)


def ok(response: httpx.Response) -> httpx.Response:
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.url}: {response.status_code} {response.text[:300]}")
    return response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=100_000, help="index size")
    parser.add_argument("--n", type=int, default=50, help="queries of each kind")
    parser.add_argument("--k", type=int, default=24, help="results per query")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="bf16/fp16 need a GPU")
    args = parser.parse_args()

    encoder, tokenizer = make_encoder(args.device, args.dtype)
    if encoder.device.type == "cuda":
        GOALS_MS["text"] = (15.0, None)  # the GPU goal of the performance issue
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(data_dir=Path(tmp), model="conch_ViT-B-16", device=str(encoder.device))
        setup_s = build_store(settings, args.vectors, encoder)
        engine = Engine(settings, encoder=encoder)
        server, thread, base = start_server(create_app(settings, engine))
        texts = [f"{TERMS[i % len(TERMS)]} with {TERMS[(i * 7 + 3) % len(TERMS)]}, case {i}" for i in range(args.n + 1)]
        ensembled_texts = [f"{t} (ensembled)" for t in texts]
        images = [he_like_jpeg(i) for i in range(args.n + 1)]
        tta_n = max(2, args.n // 5)
        tta_images = [he_like_jpeg(10_000 + i) for i in range(tta_n)]
        composed_images = [he_like_jpeg(20_000 + i) for i in range(args.n)]
        try:
            with httpx.Client(base_url=base, timeout=120) as client:

                def text(i: int) -> httpx.Response:
                    return ok(client.get("/api/search", params={"q": texts[i], "k": args.k}))

                def cached(i: int) -> httpx.Response:
                    return ok(client.get("/api/search", params={"q": texts[0], "k": args.k}))

                def image(i: int) -> httpx.Response:
                    files = {"image": ("query.jpg", images[i], "image/jpeg")}
                    return ok(client.post("/api/search/image", files=files, data={"k": str(args.k)}))

                def image_tta(i: int) -> httpx.Response:
                    files = {"image": ("query.jpg", tta_images[i], "image/jpeg")}
                    return ok(client.post("/api/search/image", files=files, data={"k": str(args.k), "tta": "1"}))

                def composed(i: int) -> httpx.Response:
                    files = {"image": ("query.jpg", composed_images[i], "image/jpeg")}
                    data = {"k": str(args.k), "plus": TERMS[i % len(TERMS)], "minus": TERMS[(i + 5) % len(TERMS)]}
                    return ok(client.post("/api/search/image", files=files, data=data))

                # Warm-up: the first query loads the FAISS index and runs each tower once.
                text(args.n), image(args.n)
                text_ms = timed_ms(text, args.n)
                cached_ms = timed_ms(cached, args.n)
                image_ms = timed_ms(image, args.n)
                # Rotation/flip averaging (8 views in one batch): off by default on a CPU, measured here on.
                tta_ms = timed_ms(image_tta, tta_n)
                composed_ms = timed_ms(composed, args.n)
                # The same server with prompt_ensemble on (five phrasings per query), on texts it has not seen.
                engine.settings = settings.model_copy(update={"prompt_ensemble": True})
                ensembled_ms = timed_ms(
                    lambda i: ok(client.get("/api/search", params={"q": ensembled_texts[i], "k": args.k})), args.n
                )
            index = engine.live_index.get()
            queries = np.random.default_rng(1).standard_normal((args.n, encoder.dim)).astype(np.float32)
            faiss_ms = timed_ms(lambda i: index.search(queries[i], args.k), args.n)
            # "Why this hit" for a page of tiles never explained before (the per-tile cache is cold).
            build = engine.store.live_build()
            fresh = np.random.default_rng(2).choice(index.ids, (args.n, args.k), replace=False)

            def explain(i: int) -> None:
                ids, vectors = engine.store.find_embeddings([int(t) for t in fresh[i]], FINGERPRINT)
                hits = [{"tile_id": t} for t in ids]
                engine.explainer.annotate(build, hits, dict(zip(ids, vectors, strict=True)), ())

            explain_ms = timed_ms(explain, args.n)
        finally:
            server.should_exit = True
            thread.join(10)
            engine.close()

    print(describe_machine())
    print(
        f"model conch_ViT-B-16 (random weights, {tokenizer}) on {encoder.device} {encoder.dtype}, "
        f"torch threads {torch.get_num_threads()}; "
        f"index {args.vectors} x {encoder.dim} {index.index_type} (store + index built in {setup_s:.0f} s); "
        f"k={args.k}, n={args.n} per row, over HTTP on 127.0.0.1"
    )
    print(f"{'query':34s} {'p50 ms':>9s} {'p95 ms':>9s}  vs goal")
    rows = [
        ("text (distinct, default)", text_ms, "text"),
        ("text (distinct, prompt_ensemble)", ensembled_ms, "text"),
        ("text (repeated: query cache)", cached_ms, None),
        ("image (448 px JPEG upload)", image_ms, "image"),
        ("image, rotation/flip averaged (8)", tta_ms, "image"),
        ("image + 2 texts (composed)", composed_ms, "image"),
        ("FAISS search alone (in process)", faiss_ms, None),
        (f"why-this-hit, {args.k} new tiles", explain_ms, None),
    ]
    for name, ms, goal in rows:
        p50, p95 = np.percentile(ms, 50), np.percentile(ms, 95)
        note = ""
        if goal:
            target, tight = GOALS_MS[goal]
            note = f"p50 / {target:.0f} ms goal = {p50 / target:.2f}"
            if tight:
                note += f"; / {tight:.0f} ms tighter goal = {p50 / tight:.2f}"
        print(f"{name:34s} {p50:9.1f} {p95:9.1f}  {note}")


if __name__ == "__main__":
    main()
