"""Image preprocessing identical to the reference CONCH transform.

Bicubic (PIL) resize of the shorter side to the input size, centre crop to a square, then RGB,
[0, 1] scaling and OpenAI CLIP mean/std. Resize and crop happen before the RGB conversion, as in
the reference: for palette or greyscale inputs the order changes the pixels.

The work is split in two so the indexer can run the first half in decode workers and send uint8
pixels (4x smaller than float) to the encoder, which normalises them, on the GPU when there is one:
``resize_crop`` (PIL only) and ``normalize`` (torch). ``Preprocess.__call__`` does both.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from search.conch.config import PretrainedCfg

if TYPE_CHECKING:
    import torch

ImageInput = Image.Image | np.ndarray | str | Path

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


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
        self.resample = _RESAMPLE[pretrained.interpolation]
        # Plain floats: decode workers use only resize_crop and never import torch.
        self.mean = tuple(pretrained.mean)
        self.std = tuple(pretrained.std)

    def resize_crop(self, image: ImageInput) -> np.ndarray:
        """``[S, S, 3]`` uint8 RGB. Tiles already at the model's size are not resampled."""
        image = to_pil(image)
        size = self.image_size
        width, height = image.size
        if (width, height) != (size, size):
            new, (left, top) = self._resized(width, height)
            if new != (width, height):
                image = image.resize(new, self.resample)
            image = image.crop((left, top, left + size, top + size))
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.array(image, dtype=np.uint8)

    def _resized(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(width, height) after the resize and the crop's (left, top) corner."""
        size = self.image_size
        # torchvision's Resize(int) rule: the shorter side becomes `size`, the longer is truncated.
        new = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
        return new, (int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0)))

    def resize_crop_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """``resize_crop`` for an RGB ``[H, W, 3]`` uint8 tensor, on its device (a GPU after nvJPEG).

        Antialiased bicubic (or bilinear) interpolation, which follows PIL's kernel: PIL stays the exact
        reference, this matches it to rounding (cosine >= 0.99999 on the conformance images)."""
        import torch.nn.functional as F

        height, width = image.shape[:2]
        size = self.image_size
        if (width, height) == (size, size):
            return image
        (new_w, new_h), (left, top) = self._resized(width, height)
        x = image.permute(2, 0, 1).unsqueeze(0).float()
        if (new_w, new_h) != (width, height):
            mode = "bicubic" if self.resample == Image.Resampling.BICUBIC else "bilinear"
            x = F.interpolate(x, size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
        x = x[..., top : top + size, left : left + size]
        return x.round_().clamp_(0, 255).to(image.dtype)[0].permute(1, 2, 0)

    def normalize(self, pixels: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """uint8 ``[n, S, S, 3]`` -> normalised float ``[n, 3, S, S]`` on ``device``."""
        import torch

        batch = torch.as_tensor(pixels)
        if torch.device(device).type == "cuda" and batch.device.type == "cpu" and not batch.is_pinned():
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=True)
        batch = batch.permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return batch.sub_(mean).div_(std)

    def __call__(self, image: ImageInput) -> torch.Tensor:
        return self.normalize(self.resize_crop(image)[None])[0]
