"""The CONCH encoder: images and texts in, L2-normalised float32 embeddings out."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from search.conch.config import ModelCfg, get_model_cfg
from search.conch.model import Conch, create_model
from search.conch.preprocess import ImageInput, Preprocess
from search.conch.tokenizer import ConchTokenizer
from search.core.errors import ConfigError
from search.core.settings import Settings

# Prompt ensembling for text queries, as CONCH's zero-shot evaluation does: several phrasings of the
# same description, embeddings averaged and renormalised.
DEFAULT_TEMPLATES = (
    "{}.",
    "an H&E image of {}.",
    "a histopathology image showing {}.",
    "a photomicrograph of {}.",
    "an H&E stained tissue section with {}.",
)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU: use --device cpu")
    return resolved


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_fingerprint(cfg: ModelCfg, checkpoint_digest: str) -> str:
    """Identifies the embedding space: same config and weights give the same vectors."""
    payload = json.dumps(cfg.to_dict(), sort_keys=True) + checkpoint_digest
    return f"{cfg.name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


class Encoder:
    def __init__(
        self,
        model: Conch,
        tokenizer: ConchTokenizer,
        *,
        fingerprint: str,
        device: str = "auto",
        dtype: str = "fp32",
        batch_size: int = 32,
        compile: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if dtype != "fp32" and self.device.type != "cuda":
            raise ConfigError(f"dtype {dtype} needs a CUDA device (this one is {self.device}): use --dtype fp32")
        self.dtype = dtype
        self.model = model.to(self.device).eval()
        if compile and self.device.type == "cuda":
            self.model.visual = torch.compile(self.model.visual)
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.batch_size = batch_size
        cfg = model.cfg
        self.preprocess = Preprocess(cfg.vision_cfg.image_size, cfg.pretrained_cfg)

    @classmethod
    def from_settings(cls, settings: Settings) -> Encoder:
        """Build from settings: config, checkpoint and tokenizer resolved as the docs describe."""
        from search.conch.checkpoint import checkpoint_digest
        from search.conch.hub import resolve_checkpoint, resolve_tokenizer

        cfg = get_model_cfg(settings.model)
        checkpoint = resolve_checkpoint(settings)
        tokenizer_path = resolve_tokenizer(settings, checkpoint)
        model = create_model(cfg, checkpoint=checkpoint)
        tokenizer = ConchTokenizer(tokenizer_path, cfg.text_cfg.context_length, cfg.text_cfg.pad_id)
        return cls(
            model,
            tokenizer,
            fingerprint=model_fingerprint(cfg, checkpoint_digest(checkpoint, settings.cache_dir)),
            device=settings.device,
            dtype=settings.dtype,
            batch_size=settings.batch_size,
            compile=settings.compile,
        )

    @property
    def dim(self) -> int:
        return self.model.cfg.embed_dim

    @property
    def image_size(self) -> int:
        return self.model.cfg.vision_cfg.image_size

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.dtype])

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, *, normalize: bool = True, project: bool = True) -> np.ndarray:
        """Embeddings of normalised ``[n, 3, S, S]`` pixels (see Preprocess), in one forward pass."""
        pixels = pixels.to(self.device, non_blocking=True)
        with self._autocast():
            out = self.model.encode_image(pixels, normalize=normalize, project=project)
        return out.float().cpu().numpy()

    def decode_jpegs(self, data: Sequence[bytes]) -> list[torch.Tensor | None]:
        """Decode JPEG files on this encoder's device (nvJPEG on a GPU) to ``[H, W, 3]`` uint8 tensors there;
        None for a file that does not decode."""
        from torchvision.io import ImageReadMode, decode_jpeg

        raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        try:
            images: list[torch.Tensor | None] = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            # One bad file fails the batch: decode one by one to find it.
            images = []
            for one in raw:
                try:
                    images.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    images.append(None)
        return [None if im is None else im.permute(1, 2, 0) for im in images]

    def encode_uint8(
        self, pixels: np.ndarray | torch.Tensor, *, normalize: bool = True, project: bool = True
    ) -> np.ndarray:
        """Embeddings of resized and cropped uint8 ``[n, S, S, 3]`` tiles (host array or tensor on any device);
        normalisation runs on the encoder's device."""
        return self.encode_pixels(self.preprocess.normalize(pixels, self.device), normalize=normalize, project=project)

    def encode_images(
        self, images: Sequence[ImageInput], *, normalize: bool = True, project: bool = True
    ) -> np.ndarray:
        """PIL images, uint8 arrays or paths -> ``[n, 512]`` float32 (``project=False``: the pooled feature)."""
        chunks = [
            self.encode_uint8(
                np.stack([self.preprocess.resize_crop(im) for im in batch]), normalize=normalize, project=project
            )
            for batch in _batches(images, self.batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def encode_texts(
        self, texts: Sequence[str], *, normalize: bool = True, templates: Sequence[str] | None = None
    ) -> np.ndarray:
        """Texts -> ``[n, 512]`` float32. With ``templates``, each text is embedded in every template and
        the normalised embeddings are averaged and renormalised (prompt ensembling)."""
        if templates:
            expanded = [t.format(text) for text in texts for t in templates]
            each = self.encode_texts(expanded, normalize=True).reshape(len(texts), len(templates), -1)
            mean = each.mean(axis=1)
            return mean / np.linalg.norm(mean, axis=1, keepdims=True) if normalize else mean
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        tokens = self.tokenizer(list(texts))
        # Batches of similar length waste least work: the text tower computes only up to the longest text.
        order = np.argsort(-(tokens != self.tokenizer.pad_id).sum(1).numpy(), kind="stable")
        out = np.empty((len(texts), self.dim), np.float32)
        for batch in _batches(order, max(self.batch_size, 64)):
            idx = np.asarray(batch)
            with self._autocast():
                emb = self.model.encode_text(tokens[idx].to(self.device), normalize=normalize)
            out[idx] = emb.float().cpu().numpy()
        return out


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
