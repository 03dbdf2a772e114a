"""The GPU check: one command for a machine with a GPU, under ten minutes, every figure against fp32 eager.

    python -m bench.gpu [--batch 256] [--tiles 6000] [--faiss-n 1000000] [--json gpu.json]
    python -m bench.gpu --smoke     # the same code paths on the CPU, tiny model and sizes: checks the script only

Rows, each printed as soon as it is measured (a run cut short still leaves its first rows):

1. Image tower, full CONCH ViT-B/16 with random weights, a ``--batch`` of 448 px images: fp32 eager (TF32 off: the
   baseline), TF32, bf16 autocast, bf16 + torch.compile. images/s, the ratio to the baseline, the fraction of the
   GPU's bf16 peak, and the minimum cosine to fp32 on images the benchmark makes itself (bench.encoder).
2. Text query p50 (one distinct text per call, through ``Encoder.encode_texts``), fp32 and bf16; the ratio is
   fp32's p50 over this one (> 1 is faster).
3. Device resize: nvJPEG decode + resize on the GPU against PIL decode + resize (the reference), cosine of the
   embeddings of the bench-made images that need a resize (goal >= 0.9999).
4. End to end (``histosearch index`` on ``--tiles`` synthetic 448 px JPEG tiles; warm-up run first): the default GPU
   path (dtype and batch auto, torch.compile, PIL decode workers on every CPU but one) and the same with nvJPEG
   (``gpu_decode``). Ratios to the fp32 eager images/s of row 1, and to the encoder alone at bf16 + compile (the
   ceiling: how much the host pipeline leaves of it). Goal >= 2,000 tiles/s on one H100.
5. FAISS at ``--faiss-n`` vectors when the GPU build is installed: flat and IVF search on the GPU, as a ratio to CPU
   flat search of the same queries measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench._machine import describe_machine
from bench.encoder import (
    SAMPLE_TEXTS,
    bench_tokenizer,
    bf16_peak_tflops,
    image_flops,
    make_sample_images,
    min_cosine,
    sample_pixels,
)
from bench.index import index_tiles_per_s, make_jpeg_tiles
from search.conch.encoder import Encoder
from search.conch.model import Conch, create_model
from search.conch.preprocess import Preprocess

Row = dict[str, object]


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, name: str, value: float, unit: str, ratio: float | None = None, note: str = "") -> None:
        row = {"name": name, "value": value, "unit": unit, "ratio_to_baseline": ratio, "note": note}
        self.rows.append(row)
        shown = "" if ratio is None else f"{ratio:7.2f}x"
        print(f"{name:46s} {value:12.4f} {unit:9s} {shown:>8s}  {note}", flush=True)


def _timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def _model(smoke: bool) -> Conch:
    torch.manual_seed(0)
    model = create_model("conch_tiny" if smoke else "conch_ViT-B-16")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def image_rows(report: Report, model: Conch, device: torch.device, batch: int, repeats: int) -> dict[str, float]:
    """Row 1; returns images/s by variant for the end-to-end ratios."""
    size = model.cfg.vision_cfg.image_size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pixels = torch.randn(batch, 3, size, size, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        sample = sample_pixels(Preprocess(size, model.cfg.pretrained_cfg), Path(tmp)).to(device)
    flops = image_flops(model.cpu(), size)
    model.to(device)
    peak = bf16_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    compiled = torch.compile(model.visual, dynamic=False)

    def run(forward: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype | None):
        def call(x: torch.Tensor = pixels) -> torch.Tensor:
            if dtype is None:
                return forward(x)
            with torch.autocast(device.type, dtype=dtype):
                return forward(x)

        return call

    variants = {
        "fp32 eager": (run(model.visual, None), "highest"),
        "tf32": (run(model.visual, None), "high"),
        "bf16 autocast": (run(model.visual, torch.bfloat16), "highest"),
        "bf16 + compile": (run(compiled, torch.bfloat16), "highest"),
    }
    rates: dict[str, float] = {}
    reference = None
    with torch.inference_mode():
        for name, (call, precision) in variants.items():
            torch.set_float32_matmul_precision(precision)
            try:
                start = time.perf_counter()
                call()  # compiles the graph for the compiled variant
                sync()
                first = time.perf_counter() - start
                seconds = _timed(call, repeats, sync)
                # The sample batch is padded to the timed batch so the compiled graph is the same one.
                padded = torch.cat([sample, sample.new_zeros((max(0, batch - len(sample)), *sample.shape[1:]))])
                out = call(padded[: max(batch, len(sample))])[: len(sample)].float()
            finally:
                torch.set_float32_matmul_precision("highest")
            reference = out if reference is None else reference
            rates[name] = batch / seconds
            notes = [f"batch {batch}", f"cosine to fp32 {min_cosine(reference, out):.6f}"]
            if peak and name.startswith("bf16"):
                notes.append(f"{flops * batch / seconds / (peak * 1e12):.1%} of bf16 peak")
            if name == "bf16 + compile":
                notes.append(f"first call (compile) {first:.0f} s")
            report.add(f"images/s {name}", rates[name], "images/s", rates[name] / rates["fp32 eager"], ", ".join(notes))
    return rates


def text_rows(report: Report, model: Conch, device: torch.device, dtypes: list[str], n: int) -> None:
    tokenizer, which = bench_tokenizer(model.cfg.text_cfg.context_length, model.cfg.text_cfg.pad_id)
    texts = [f"{SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} {i}" for i in range(n + 1)]
    base = None
    for dtype in dtypes:
        encoder = Encoder(model, tokenizer, fingerprint="bench", device=str(device), dtype=dtype)
        encoder.encode_texts(texts[:1])  # warm-up
        times = []
        for text in texts[1:]:
            start = time.perf_counter()
            encoder.encode_texts([text])
            times.append(time.perf_counter() - start)
        p50 = statistics.median(times) * 1000
        base = base or p50
        report.add(f"text query p50 {dtype}", p50, "ms", base / p50, f"{n} distinct texts, {which}")


def resize_row(report: Report, model: Conch, device: torch.device) -> None:
    """Embeddings of JPEGs decoded and resized on the device against PIL's, for the sample images that need a
    resize (row 3)."""
    encoder = Encoder(model, None, fingerprint="bench", device=str(device), dtype="fp32", batch_size=8)
    size = encoder.image_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = [p for p in make_sample_images(Path(tmp)) if p.suffix == ".jpeg"]
        data = [p.read_bytes() for p in paths]
        reference = np.stack([encoder.preprocess.resize_crop(p) for p in paths])
    tiles = encoder.decode_jpegs(data)
    refused = [str(p.name) for p, t in zip(paths, tiles, strict=True) if t is None]
    if refused:
        raise RuntimeError(f"the device decoder refused bench JPEGs {refused}")
    device_side = encoder.encode_uint8(torch.stack(tiles))
    pil = encoder.encode_uint8(reference)
    cosine = float((device_side * pil).sum(1).min())
    note = f"{len(paths)} JPEGs to {size} px, goal >= 0.9999"
    report.add("device resize vs PIL cosine (min)", cosine, "cosine", None, note)


def end_to_end_rows(
    report: Report, model: Conch, device: torch.device, tiles: int, rates: dict[str, float], smoke: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = model.cfg.vision_cfg.image_size
        make_jpeg_tiles(tmp / "tiles", tiles, size=size)
        encoder = Encoder(
            model, None, fingerprint="bench", device=str(device), dtype="auto", batch_size="auto", compile=not smoke
        )
        if smoke:
            encoder.batch_size = 8
        ceiling = rates["bf16 + compile"]
        for name, gpu_decode in (("PIL workers", False), ("nvJPEG", True)):
            rate = index_tiles_per_s(encoder, tmp / "tiles", tiles, tmp / name.replace(" ", "-"), gpu_decode=gpu_decode)
            report.add(
                f"end-to-end tiles/s, {name}",
                rate,
                "tiles/s",
                rate / rates["fp32 eager"],
                f"{rate / ceiling:.2f} of the bf16+compile encoder; {tiles} tiles, batch {encoder.batch_size}, "
                f"{encoder.dtype}, goal >= 2000",
            )


def faiss_rows(report: Report, n: int, smoke: bool) -> None:
    from bench.ann import SyntheticEmbeddings
    from search.storage.gpu import gpu_available
    from search.storage.vectors import VectorIndex

    if not gpu_available() and not smoke:
        report.add("faiss gpu", float("nan"), "", None, "the FAISS GPU build is not installed: unmeasured")
        return
    device = "cuda" if gpu_available() else "cpu"
    data = SyntheticEmbeddings(dim=512)
    vectors = data.sample(n, seed=1)
    queries = data.sample(1000, seed=2)
    ids = np.arange(n, dtype=np.int64)
    cpu = VectorIndex.build(ids, vectors, "flat", device="cpu")
    base = _search_seconds(cpu, queries)
    report.add("faiss cpu flat search queries/s", len(queries) / base, "queries/s", 1.0, f"{n} vectors, k=10")
    _, truth = cpu.search(queries, 10)
    del cpu
    for kind in ("flat", "ivf"):
        start = time.perf_counter()
        index = VectorIndex.build(ids, vectors, kind, device=device, exact_max=n)
        built = time.perf_counter() - start
        seconds = _search_seconds(index, queries)
        _, found = index.search(queries, 10)
        recall = np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth, strict=True)])
        report.add(
            f"faiss {index.device} {kind} search queries/s",
            len(queries) / seconds,
            "queries/s",
            base / seconds,
            f"recall@10 {recall:.3f}, built in {built:.1f} s",
        )
        del index


def _search_seconds(index, queries: np.ndarray) -> float:
    index.search(queries[:10], 10)
    start = time.perf_counter()
    index.search(queries, 10)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tiles", type=int, default=6000)
    parser.add_argument("--faiss-n", type=int, default=1_000_000)
    parser.add_argument("--texts", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="run the code paths on the CPU at toy sizes")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.tiles, args.faiss_n, args.texts = 8, 24, 5000, 5
    elif not torch.cuda.is_available():
        print("bench.gpu: torch sees no CUDA GPU: run it on a GPU machine (--smoke checks the script on a CPU)")
        return 2
    device = torch.device("cuda" if not args.smoke else "cpu")
    print(describe_machine(), flush=True)
    print("model: random weights (speed does not depend on them; the cosines are for these weights)", flush=True)
    report = Report()
    started = time.perf_counter()
    try:
        model = _model(args.smoke)
        rates = image_rows(report, model, device, args.batch, 2 if args.smoke else 10)
        text_rows(report, model, device, ["fp32"] if args.smoke else ["fp32", "bf16"], args.texts)
        resize_row(report, model, device)
        end_to_end_rows(report, model, device, args.tiles, rates, args.smoke)
        faiss_rows(report, args.faiss_n, args.smoke)
    finally:
        print(f"total {time.perf_counter() - started:.0f} s", flush=True)
        if args.json:
            args.json.write_text(json.dumps(report.rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
