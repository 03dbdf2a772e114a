"""Indexing throughput and FAISS search quality/speed.

    python -m bench.index [--tiles 64] [--ann-sizes 100000 1000000] [--skip-ann] [--skip-cpu]

1. End-to-end tiles/s (read + decode + resize, encode, write to SQLite, build FAISS) over a generated
   folder of 448 px JPEG tiles with the full CONCH model, as a ratio to the encoder's own images/s on already
   decoded batches measured in the same run (goal >= 0.9: the pipeline adds little).
   On a CUDA GPU also: baseline = PIL decode in the main process + fp32 eager, against the fast path (decode workers
   on every core but one, bf16 autocast, torch.compile), goal >= 2,000 tiles/s on one H100 (use --tiles 20000 and
   --skip-cpu: the CPU rows alone take over 10 minutes at that size). Every timed run comes after a warm-up run over
   one full and one partial batch (cuDNN/cuBLAS autotuning, allocator growth, the compiled graph).
2. FAISS: search latency and recall@10 against exact search for each index type (bench/ann.py).
Weights are random: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench._machine import describe_machine
from bench.encoder import random_model
from indexer.indexer import Indexer
from search.conch.encoder import Encoder
from search.core.settings import load_settings
from search.storage.store import Store


def make_jpeg_tiles(folder: Path, n: int, size: int = 448) -> list[Path]:
    """H&E-like tiles: pink/purple textured noise, JPEG quality 90, in folders of 1,000."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size * 2, size * 2, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        y, x = rng.integers(0, size, 2)
        tile = base[y : y + size, x : x + size].astype(np.int16)
        tile = np.clip(tile // 3 + np.array([170, 90, 160]) + rng.integers(-20, 20, 3), 0, 255).astype(np.uint8)
        path = folder / f"case{i % 10}" / f"slide{i // 1000}" / f"tile_{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tile).save(path, quality=90)
        paths.append(path)
    return paths


def encoder_images_per_s(encoder: Encoder, paths: list[Path], batch: int) -> float:
    pixels = np.stack([encoder.preprocess.resize_crop(Image.open(p)) for p in paths[: batch * 2]])
    encoder.encode_uint8(pixels[:batch])  # warm-up
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(pixels), batch):
        encoder.encode_uint8(pixels[i : i + batch])
    return len(pixels) / (time.perf_counter() - start)


def _index_run(
    encoder: Encoder, folder: Path, data_dir: Path, workers: int | None, gpu_decode: bool
) -> tuple[int, float]:
    settings = load_settings(
        data_dir=data_dir,
        workers=workers,
        batch_size=encoder.batch_size,
        device=str(encoder.device),
        gpu_decode=gpu_decode,
    )
    store = Store.from_settings(settings)
    store.set_meta("builtin_vocabulary", "0")  # texts are not part of tile throughput
    indexer = Indexer(settings, store=store, encoder=encoder)
    start = time.perf_counter()
    report = indexer.run([folder])
    return report.sources[0].new, time.perf_counter() - start


def index_tiles_per_s(
    encoder: Encoder, folder: Path, n: int, data_dir: Path, *, workers: int | None = None, gpu_decode: bool = False
) -> float:
    """Tiles/s of a whole `index` run; ``workers=None`` is the default (per device) sizing. A warm-up run over
    one full and one partial batch of the same tiles comes first, untimed."""
    warm = data_dir.with_name(data_dir.name + "-warm-up")
    sample = warm / "tiles"
    for path in sorted(folder.rglob("*.jpg"))[: encoder.batch_size + max(1, encoder.batch_size // 2)]:
        (sample / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, sample / path.relative_to(folder))
    _index_run(encoder, sample, warm / "data", workers, gpu_decode)
    new, elapsed = _index_run(encoder, folder, data_dir, workers, gpu_decode)
    assert new == n, f"{n - new} tiles not indexed"
    return n / elapsed


def end_to_end(n_tiles: int, batch: int, skip_cpu: bool = False) -> list[tuple[str, float, str]]:
    rows = []
    model = random_model()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_jpeg_tiles(tmp / "tiles", n_tiles)
        if not skip_cpu:
            cpu = Encoder(model, None, fingerprint="bench-random", device="cpu", batch_size=batch)
            enc = encoder_images_per_s(cpu, paths, batch)
            rows.append(("cpu encoder images/s (decoded batches)", enc, f"batch {batch}"))
            e2e = index_tiles_per_s(cpu, tmp / "tiles", n_tiles, tmp / "cpu")
            rows.append(("cpu end-to-end tiles/s", e2e, f"{e2e / enc:.2f}x encoder (goal >= 0.9)"))
        if torch.cuda.is_available():
            gpu_batch = 256
            base = Encoder(model, None, fingerprint="bench-random", device="cuda", batch_size=gpu_batch)
            baseline = index_tiles_per_s(base, tmp / "tiles", n_tiles, tmp / "gpu-base", workers=0)
            rows.append(("gpu baseline tiles/s (PIL in main, fp32 eager)", baseline, ""))
            fast = Encoder(
                model, None, fingerprint="bench-random", device="cuda", dtype="bf16", batch_size=gpu_batch, compile=True
            )
            fast_rate = index_tiles_per_s(fast, tmp / "tiles", n_tiles, tmp / "gpu-fast")
            rows.append(("gpu fast path tiles/s", fast_rate, f"{fast_rate / baseline:.1f}x baseline (goal >= 2000/s)"))
            nvjpeg = index_tiles_per_s(fast, tmp / "tiles", n_tiles, tmp / "gpu-nvjpeg", gpu_decode=True)
            rows.append(("gpu fast path + nvJPEG tiles/s", nvjpeg, f"{nvjpeg / baseline:.1f}x baseline"))
        else:
            rows.append(("gpu end-to-end", float("nan"), "no CUDA GPU on this machine: unmeasured"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ann-sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--skip-ann", action="store_true")
    parser.add_argument("--skip-cpu", action="store_true", help="no CPU rows (minutes per thousand tiles)")
    args = parser.parse_args()
    print(describe_machine())
    for name, value, note in end_to_end(args.tiles, args.batch, args.skip_cpu):
        print(f"{name:48s} {value:10.2f}  {note}")
    if not args.skip_ann:
        from bench.ann import main as ann_main

        ann_main(["--sizes", *map(str, args.ann_sizes)])


if __name__ == "__main__":
    main()
