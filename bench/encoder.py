"""Encoder throughput: images/s and texts/s for the full CONCH model.

    python -m bench.encoder [--images 16] [--texts 512] [--batch 8]

CPU fp32 always; on a CUDA GPU also fp32 eager (baseline) vs bf16 autocast, with the bf16-vs-fp32 cosine on
the conformance images and the fraction of the GPU's bf16 peak the fast path reaches. Texts: the trimmed text
pass (real tokens + first pad + CLS) against the full padded 128-position pass, measured in the same run.
Weights are random (speed does not depend on their values); the tokenizer is the CONCH file when one is found.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench._machine import describe_machine
from search.conch.model import Conch, create_model

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "conch_reference"
# Dense bf16 peak of the GPUs this is run on (TFLOP/s, without sparsity).
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}

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


def image_flops(model: Conch, size: int) -> float:
    # Not under inference_mode: the counter's module tracker hooks into autograd.
    with FlopCounterMode(display=False) as counter:
        model.visual(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


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
    with torch.inference_mode():
        fp32 = timed(lambda: model.encode_image(pixels), 5, sync)
        rows.append(("gpu fp32 eager images/s (baseline)", batch / fp32, f"batch {batch}"))

        def bf16():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model.encode_image(pixels)

        fast = timed(bf16, 10, sync)
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        frac = f", {flops * batch / fast / (peak * 1e12):.1%} of bf16 peak" if peak else ""
        rows.append(("gpu bf16 autocast images/s", batch / fast, f"{fp32 / fast:.1f}x baseline{frac}"))
        compiled = torch.compile(model.visual)

        def bf16_compiled():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return compiled(pixels)

        comp = timed(bf16_compiled, 10, sync)
        rows.append(("gpu bf16 + torch.compile images/s", batch / comp, f"{fp32 / comp:.1f}x baseline"))
    if (REFERENCE / "expected" / "pixels_448.npy").is_file():
        ref = torch.from_numpy(np.load(REFERENCE / "expected" / "pixels_448.npy")).to(device)
        with torch.inference_mode():
            a = model.encode_image(ref)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                b = model.encode_image(ref).float()
        cos = torch.nn.functional.cosine_similarity(a, b).min().item()
        rows.append(("bf16 vs fp32 cosine (conformance images, min)", cos, "goal >= 0.999"))
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
