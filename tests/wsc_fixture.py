"""WSC test helpers: whether mmm can be used here, and a small model of mmm's real classes in the WSC zip layout."""

from __future__ import annotations

import importlib.util
import io
import os
import zipfile
from pathlib import Path

import torch

from search.wsc import model as wsc_model


def mmm_ready() -> str | None:
    if importlib.util.find_spec("mmm") is None:
        return "the [wsc] extra (medicalmultitaskmodeling==1.6.3, m3-sdk) is not installed"
    if os.environ.get(wsc_model.LICENCE_ENV, "").lower() != wsc_model.LICENCE_VALUE:
        return f"mmm's licence is not accepted in this environment ({wsc_model.LICENCE_ENV})"
    return None


def real_tiny_zip(path: Path) -> None:
    from mmm.mtl_modules.shared_blocks.Grouper import Grouper, MHAReducer
    from mmm.mtl_modules.shared_blocks.PyramidEncoder import PyramidEncoder
    from mmm.mtl_modules.shared_blocks.Squeezer import Squeezer
    from mmm.neural.modules.simple_cnn import MiniConvNet

    torch.manual_seed(0)
    encoder = PyramidEncoder(PyramidEncoder.Config(model=MiniConvNet.Config(num_filters=8, depth=2)))
    squeezer = Squeezer(Squeezer.Config(out_channels=48), encoder.get_feature_pyramid_channels(), encoder.get_strides())
    grouper = Grouper(Grouper.Config(reducer=MHAReducer.Config(num_layers=2, num_heads=4)), 48)
    with zipfile.ZipFile(path, "w") as z:
        for name, module in (("encoder", encoder), ("squeezer", squeezer), ("grouper", grouper)):
            buffer = io.BytesIO()
            torch.save(module, buffer)
            z.writestr(f"{name}.pt", buffer.getvalue())
