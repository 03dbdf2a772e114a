"""Encoder throughput: images/s and texts/s for the full CONCH model.

    python -m bench.encoder [--images 16] [--texts 512] [--batch 8]

CPU fp32 always; on a CUDA GPU also fp32 eager (baseline) vs bf16 autocast, with the bf16-vs-fp32 cosine on
images the benchmark makes itself (H&E-like tiles of several sizes, through the project's preprocessing) and the
fraction of the GPU's bf16 peak the fast path reaches (peak looked up by the full device name). Texts: the trimmed text
pass (real tokens + first pad + CLS) against the full padded 128-position pass, measured in the same run.
Weights are random (speed does not depend on their values); the tokenizer is the CONCH file when one is found.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from bench._machine import describe_machine
from search.conch.model import Conch, create_model
from search.conch.preprocess import Preprocess

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "conch_reference"
# Dense bf16 tensor-core peak (TFLOP/s, without sparsity) by the full name torch.cuda.get_device_name gives:
# an H100 PCIe (756) is not an H100 SXM (989), so a prefix match would mislead.
BF16_PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,  # SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.0,
}
# Bench-made test images: (width, height, format). Model-size tiles, larger tiles that need a resize, a
# non-square one; JPEG and PNG.
SAMPLE_IMAGES = ((448, 448, "JPEG"), (512, 512, "PNG"), (1024, 1024, "JPEG"), (600, 400, "JPEG"), (448, 448, "PNG"))

SAMPLE_TEXTS = [
    "cribriform glands with comedonecrosis",
    "invasive ductal carcinoma of the breast",
    "tumour-infiltrating lymphocytes surrounding nests of squamous cells",
    "mitotic figures and nuclear pleomorphism",
    "normal colonic mucosa",
    "signet ring cells infiltrating the gastric wall",
    "an H&E image of poorly differentiated adenocarcinoma",
    "necrosis",
]


def random_model() -> Conch:
    torch.manual_seed(0)
    model = create_model("conch_ViT-B-16")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


class StandInTokenizer:
    """Realistic token counts (text length) with ids hashed from the text, when the CONCH file is absent."""

    def __init__(self, context_length: int, pad_id: int = 0) -> None:
        self.context_length = context_length
        self.pad_id = pad_id

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            words = text.split()
            n = min(self.context_length - 1, 2 + int(1.3 * len(words)))
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            ids = np.random.default_rng(seed).integers(3, 32000, n)
            ids[0], ids[-1] = 1, 2
            out[row, :n] = torch.from_numpy(ids)
        return out


def bench_tokenizer(context: int, pad_id: int = 0) -> tuple[Callable[[list[str]], torch.Tensor], str]:
    """The CONCH tokenizer when ../shared/conch_reference has it, else the stand-in; and which one it is."""
    tok_file = REFERENCE / "tokenizer" / "conch_byte_level_bpe_uncased.json"
    if tok_file.is_file():
        from search.conch.tokenizer import ConchTokenizer

        return ConchTokenizer(tok_file, context, pad_id), "CONCH tokenizer"
    return StandInTokenizer(context, pad_id), "stand-in tokenizer (no CONCH file)"


def timed(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def image_flops(model: Conch, size: int) -> float:
    """FLOPs of one image through the image tower, attention included: on the CPU, SDPA runs as
    ``_scaled_dot_product_flash_attention_for_cpu``, which the counter does not know by itself."""
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    # Not under inference_mode: the counter's module tracker hooks into autograd.
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        model.visual(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def bf16_peak_tflops(device_name: str) -> float | None:
    return BF16_PEAK_TFLOPS.get(device_name)


def make_sample_images(folder: Path) -> list[Path]:
    """H&E-like images (pink/purple texture) of the SAMPLE_IMAGES sizes and formats, written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = []
    for i, (width, height, fmt) in enumerate(SAMPLE_IMAGES):
        noise = rng.integers(0, 255, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
        texture = np.asarray(Image.fromarray(noise).resize((width, height), Image.Resampling.BICUBIC), np.int16)
        pixels = np.clip(texture // 3 + np.array([170, 90, 160]) - 40, 0, 255).astype(np.uint8)
        path = folder / f"sample_{i}_{width}x{height}.{fmt.lower()}"
        Image.fromarray(pixels).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        paths.append(path)
    return paths


def sample_pixels(preprocess: Preprocess, folder: Path) -> torch.Tensor:
    """Normalised ``[n, 3, S, S]`` pixels of the bench-made images, through the project's preprocessing.
    Raises (never skips) when an image is missing: a cosine row must not vanish silently."""
    paths = make_sample_images(folder)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"bench sample images missing: {', '.join(missing)}")
    return preprocess.normalize(np.stack([preprocess.resize_crop(p) for p in paths]))


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float(), b.float()).min().item()


def bench_cpu(model: Conch, n_images: int, n_texts: int, batch: int) -> list[tuple[str, float, str]]:
    rows = []
    pixels = torch.randn(batch, 3, 448, 448)
    repeats = max(1, n_images // batch)
    with torch.inference_mode():
        sec = timed(lambda: model.encode_image(pixels), repeats)
    rows.append(("cpu fp32 images/s", batch / sec, f"batch {batch}"))
    texts = (SAMPLE_TEXTS * (n_texts // len(SAMPLE_TEXTS) + 1))[:n_texts]
    tokens = bench_tokenizer(128)[0](texts)
    with torch.inference_mode():
        padded = timed(lambda: model.encode_text(tokens, trim=False), 1)
        trimmed = timed(lambda: model.encode_text(tokens, trim=True), 3)
        diff = (model.encode_text(tokens, trim=False) - model.encode_text(tokens, trim=True)).abs().max().item()
    rows.append(("cpu fp32 texts/s, padded 128 (baseline)", n_texts / padded, ""))
    rows.append(
        ("cpu fp32 texts/s, trimmed", n_texts / trimmed, f"{padded / trimmed:.1f}x baseline, max diff {diff:.1e}")
    )
    return rows


def bench_gpu(model: Conch, batch: int, flops: float) -> list[tuple[str, float, str]]:
    """fp32 eager (baseline) vs bf16 autocast vs bf16 + torch.compile; ``flops`` per image for the peak fraction."""
    device = torch.device("cuda")
    model = model.to(device)
    sync = torch.cuda.synchronize
    rows = []
    pixels = torch.randn(batch, 3, 448, 448, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        test = sample_pixels(Preprocess(448, model.cfg.pretrained_cfg), Path(tmp)).to(device)
    with torch.inference_mode():
        fp32 = timed(lambda: model.encode_image(pixels), 5, sync)
        rows.append(("gpu fp32 eager images/s (baseline)", batch / fp32, f"batch {batch}"))

        def bf16():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model.encode_image(pixels)

        fast = timed(bf16, 10, sync)
        name = torch.cuda.get_device_name()
        peak = bf16_peak_tflops(name)
        frac = f", {flops * batch / fast / (peak * 1e12):.1%} of bf16 peak" if peak else f", no peak known for {name!r}"
        rows.append(("gpu bf16 autocast images/s", batch / fast, f"{fp32 / fast:.1f}x baseline{frac}"))
        compiled = torch.compile(model.visual, dynamic=False)

        def bf16_compiled():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return compiled(pixels)

        comp = timed(bf16_compiled, 10, sync)
        rows.append(("gpu bf16 + torch.compile images/s", batch / comp, f"{fp32 / comp:.1f}x baseline"))
        reference = model.encode_image(test)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model.encode_image(test)
    rows.append(("bf16 vs fp32 cosine (bench sample images, min)", min_cosine(reference, half), "goal >= 0.999"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--gpu-batch", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    model = random_model()
    print(describe_machine())
    flops = image_flops(model, 448)
    print(f"model: conch_ViT-B-16 image tower, {flops / 1e9:.1f} GFLOP per 448 px image")
    rows = bench_cpu(model, args.images, args.texts, args.batch)
    if torch.cuda.is_available():
        rows += bench_gpu(model, args.gpu_batch, flops)
    else:
        rows.append(("gpu", float("nan"), "no CUDA GPU on this machine: GPU figures unmeasured"))
    for name, value, note in rows:
        print(f"{name:48s} {value:10.3f}  {note}")
    if args.json:
        args.json.write_text(json.dumps([{"name": n, "value": v, "note": s} for n, v, s in rows]))


if __name__ == "__main__":
    main()
