"""Decode-pool throughput over large archives: what worker processes add or cost on the CPU.

    python -m bench.pipeline [--members 100000] [--sample 2000] [--workers N] [--tile 64]

Builds a zip and a tar of ``--members`` JPEG tiles, then decodes ``--sample`` of them spread evenly over the
archive (so a tar reader must reach its far end) through ``indexer.pipeline.DecodePool``: once in the main
process (``workers=0``, the baseline) and once with worker processes, and prints each as tiles/s and the
workers' ratio to the baseline measured in the same run. The tiles are small (``--tile`` px, decoded and
resized for a model of that input size) so that the figure shows the pool's own overhead (per-chunk reader
transfer, archive reopening, result transfer), not the decoder; ``--tile 448`` shows the pixel transfer, pickled
through a pipe or through shared memory.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench._machine import describe_machine
from indexer.pipeline import DecodePool
from search.archives.readers import open_reader
from search.conch.config import get_model_cfg
from search.conch.preprocess import Preprocess
from search.core.settings import load_settings


def _jpegs(tile: int, distinct: int = 64) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(distinct):
        pixels = rng.integers(0, 255, (tile, tile, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_archives(folder: Path, members: int, tile: int) -> tuple[Path, Path, list[str]]:
    """A .zip and a .tar with the same ``members`` tiles; their member names in order."""
    data = _jpegs(tile)
    names = [f"slide{i // 1000:04d}/tile_{i:07d}.jpg" for i in range(members)]
    zip_path, tar_path = folder / "tiles.zip", folder / "tiles.tar"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as archive:
        for i, name in enumerate(names):
            archive.writestr(name, data[i % len(data)])
    with tarfile.open(tar_path, "w") as archive:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = len(data[i % len(data)])
            archive.addfile(info, io.BytesIO(data[i % len(data)]))
    return zip_path, tar_path, names


def tiles_per_s(
    path: Path, locators: list[str], workers: int, preprocess: Preprocess, settings, shared: bool = True
) -> float:
    reader = open_reader(path, settings)
    with DecodePool(workers, preprocess, settings.max_image_pixels, shared=shared) as pool:
        if workers:
            # Workers start (spawn, imports) before the clock: a run pays it once, not per archive.
            for _ in pool.decode(reader, locators[:1]):
                pass
        start = time.perf_counter()
        # Each tile copied out as it comes, as the indexer does into its batch buffer.
        count = sum(1 for result in pool.decode(reader, locators) if result.pixels.copy() is not None)
        elapsed = time.perf_counter() - start
    reader.close()
    assert count == len(locators), f"{path.name}: {len(locators) - count} tiles failed to decode"
    return count / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=max(1, len(os.sched_getaffinity(0))))
    parser.add_argument("--tile", type=int, default=64)
    args = parser.parse_args(argv)
    print(describe_machine())
    cfg = get_model_cfg("conch_tiny")
    preprocess = Preprocess(args.tile, cfg.pretrained_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(data_dir=Path(tmp) / "data")
        zip_path, tar_path, names = make_archives(Path(tmp), args.members, args.tile)
        step = max(1, len(names) // args.sample)
        locators = names[::step][: args.sample]
        print(f"{args.members} members per archive, {len(locators)} decoded (every {step}th), {args.tile} px tiles")
        for path in (zip_path, tar_path):
            kind = path.suffix[1:]
            base = tiles_per_s(path, locators, 0, preprocess, settings)
            print(f"{kind + ' main process tiles/s (baseline)':52s} {base:10.1f}", flush=True)
            for shared, how in ((False, "pixels pickled"), (True, "shared memory")):
                rate = tiles_per_s(path, locators, args.workers, preprocess, settings, shared)
                name = f"{kind} {args.workers} workers, {how}, tiles/s"
                print(f"{name:52s} {rate:10.1f}  {rate / base:.2f}x baseline", flush=True)


if __name__ == "__main__":
    main()
