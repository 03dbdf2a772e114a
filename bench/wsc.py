"""WSC cost per slide on the CPU, against CONCH embedding the same slide's tiles, measured in the same run.

    MMM_LICENSE_ACCEPTED='i accept' python -m bench.wsc [--bag 512] [--sample 16]

Needs the [wsc] extra and mmm's licence accepted by you (histosearch never sets it). Two WSC models built
from mmm's own classes with random weights (cost does not depend on their values):

- tiny: the real-class test model (MiniConvNet encoder, 48-d squeezer, 2-layer 4-head grouper);
- stand-in: an assumed WSC-MTL-tiny architecture (torchvision Swin-V2-T encoder, 768-d squeezer, 4-layer
  8-head grouper: 768-d vectors and 8 attention heads as the model card shows). The real file's encoder was
  not inspected here (no weights downloaded), so this is an estimate of the real model's cost.

A bag of ``--bag`` crops (224 px at 0.5 um/px) comes from ``--bag / 4`` indexed 448 px tiles at 0.5 um/px, so
the baseline is CONCH ViT-B/16 embedding that many 448 px tiles. The encoders run on ``--sample`` crops and
are scaled to the bag (their cost is per crop); the grouper runs on the whole bag. FLOPs are counted too.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench._machine import describe_machine
from search.conch.model import create_model
from search.wsc.model import WscModel, check_licence, check_mmm_version


def _models() -> dict[str, WscModel]:
    from mmm.mtl_modules.shared_blocks.Grouper import Grouper, MHAReducer
    from mmm.mtl_modules.shared_blocks.PyramidEncoder import PyramidEncoder
    from mmm.mtl_modules.shared_blocks.Squeezer import Squeezer
    from mmm.neural.modules.simple_cnn import MiniConvNet
    from mmm.neural.modules.swinformer import TorchVisionSwinformer

    def build(encoder_model, squeeze: int, dim: int, layers: int, heads: int) -> WscModel:
        encoder = PyramidEncoder(PyramidEncoder.Config(model=encoder_model))
        squeezer = Squeezer(Squeezer.Config(out_channels=squeeze), encoder.get_feature_pyramid_channels(),
                            encoder.get_strides())  # fmt: skip
        grouper = Grouper(Grouper.Config(reducer=MHAReducer.Config(num_layers=layers, num_heads=heads)), dim)
        return WscModel({"encoder": encoder, "squeezer": squeezer, "grouper": grouper})

    torch.manual_seed(0)
    return {
        "tiny (test model)": build(MiniConvNet.Config(num_filters=8, depth=2), 48, 48, 2, 4),
        "stand-in (Swin-V2-T, 768-d)": build(TorchVisionSwinformer.Config(variant="tiny"), -1, 768, 4, 8),
    }


def _seconds(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _measure(model: WscModel, crops: torch.Tensor, bag: int) -> tuple[float, float]:
    """(seconds, FLOPs) of one slide's bag: the encoder and squeezer per crop scaled to the bag, the grouper
    on the whole bag."""
    from mmm.mmm_types.GroupUsage import GroupingStrategy, GroupUsage

    encoder, squeezer, grouper = (model.modules[k] for k in ("encoder", "squeezer", "grouper"))

    def latent(x: torch.Tensor) -> torch.Tensor:
        return squeezer(encoder(x))[1].flatten(1)

    per_crop = _seconds(lambda: latent(crops), 1) / len(crops)
    bag_latent = torch.randn(bag, latent(crops[:1]).shape[1])
    ids = torch.zeros(bag, dtype=torch.long)
    usage = GroupUsage(grouping=GroupingStrategy.single)
    group = _seconds(lambda: grouper(bag_latent, ids, usage))
    flops = _flops(lambda: latent(crops[:1])) * bag + _flops(lambda: grouper(bag_latent, ids, usage))
    return per_crop * bag + group, flops


@torch.no_grad()  # not inference_mode: the FLOP counter needs autograd's bookkeeping
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bag", type=int, default=512, help="crops per slide (the wsc_max_tiles default)")
    parser.add_argument("--sample", type=int, default=16, help="crops timed through the encoder")
    args = parser.parse_args()
    check_licence()
    check_mmm_version()
    tiles = max(1, args.bag // 4)

    conch = create_model("conch_ViT-B-16").eval()
    conch_batch = torch.rand(4, 3, 448, 448)
    conch_per_tile = _seconds(lambda: conch.encode_image(conch_batch), 1) / len(conch_batch)
    conch_flops = _flops(lambda: conch.encode_image(conch_batch[:1]))
    baseline = conch_per_tile * tiles
    rows = [(f"CONCH ViT-B/16, {tiles} tiles of 448 px (baseline)", baseline, conch_flops * tiles)]

    crops = torch.rand(args.sample, 3, 224, 224)
    for name, model in _models().items():
        seconds, flops = _measure(model, crops, args.bag)
        rows.append((f"WSC {name}, bag of {args.bag} crops", seconds, flops))

    print(f"{'per slide':<52} {'seconds':>9} {'GFLOP':>9} {'vs CONCH':>9}")
    for name, seconds, flops in rows:
        print(f"{name:<52} {seconds:>9.2f} {flops / 1e9:>9.1f} {seconds / baseline:>8.3f}x")
    print(f"torch threads: {torch.get_num_threads()}; {describe_machine()}")


if __name__ == "__main__":
    main()
