"""What the benchmarks compute besides timings: FLOPs, the peak they divide by, the inputs of their cosines."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import encoder as bench_encoder
from search.conch.config import get_model_cfg
from search.conch.model import create_model
from search.conch.preprocess import Preprocess


def test_image_flops_count_cpu_attention():
    model = create_model("conch_tiny")
    with FlopCounterMode(display=False) as plain:
        model.visual(torch.zeros(1, 3, 64, 64))
    cfg = model.cfg.vision_cfg
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    # Trunk self-attention: QK^T and AV, 2 FLOPs per multiply-add, every layer.
    attention = cfg.layers * 2 * 2 * tokens * tokens * cfg.width
    counted = bench_encoder.image_flops(model, 64)
    assert counted - plain.get_total_flops() >= attention


def test_peak_is_looked_up_by_the_full_device_name():
    assert bench_encoder.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench_encoder.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench_encoder.bf16_peak_tflops("NVIDIA H100") is None  # unknown: no made-up fraction


def test_sample_pixels_are_made_here_and_a_missing_one_fails_loudly(tmp_path, monkeypatch):
    preprocess = Preprocess(64, get_model_cfg("conch_tiny").pretrained_cfg)
    pixels = bench_encoder.sample_pixels(preprocess, tmp_path / "a")
    assert pixels.shape == (len(bench_encoder.SAMPLE_IMAGES), 3, 64, 64)
    made = bench_encoder.make_sample_images
    monkeypatch.setattr(bench_encoder, "make_sample_images", lambda folder: [*made(folder), folder / "gone.png"])
    with pytest.raises(FileNotFoundError, match="gone.png"):
        bench_encoder.sample_pixels(preprocess, tmp_path / "b")
