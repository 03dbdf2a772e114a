"""Image preprocessing identical to the reference CONCH transform.

Bicubic (PIL) resize of the shorter side to the input size, centre crop to a square, then RGB,
[0, 1] scaling and OpenAI CLIP mean/std. Resize and crop happen before the RGB conversion, as in
the reference: for palette or greyscale inputs the order changes the pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from .config import PretrainedCfg

ImageInput = Image.Image | np.ndarray | str | Path

_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def to_pil(image: ImageInput) -> Image.Image:
    """A PIL image from a PIL image, an HxW / HxWxC uint8 array, or a file path."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 HxW or HxWxC, got {image.dtype}")
        return Image.fromarray(image)
    with Image.open(image) as opened:
        opened.load()
        return opened


class Preprocess:
    """Picklable (for decode workers) transform from an image to a normalised [3, S, S] tensor."""

    def __init__(self, image_size: int, pretrained: PretrainedCfg) -> None:
        self.image_size = image_size
        self.interpolation = _INTERPOLATION[pretrained.interpolation]
        self.mean = list(pretrained.mean)
        self.std = list(pretrained.std)

    def __call__(self, image: ImageInput) -> torch.Tensor:
        image = to_pil(image)
        image = TF.resize(image, self.image_size, interpolation=self.interpolation)
        image = TF.center_crop(image, self.image_size)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)
