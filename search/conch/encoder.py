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


def make_current(device: torch.device) -> None:
    """Make a numbered GPU (``cuda:1``) the current one: pinned host memory and nvJPEG otherwise open a context on
    the current device, GPU 0. Plain ``cuda`` means the current device already."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What "auto" means per device type. On a GPU: bf16 autocast (fused attention, tensor cores; cosine to fp32
# measured by `python -m bench.gpu`) and batches large enough to keep an H100 busy (~5 GB of activations).
AUTO_DTYPE = {"cuda": "bf16", "cpu": "fp32"}
AUTO_BATCH_SIZE = {"cuda": 256, "cpu": 32}


def resolve_dtype(dtype: str, device: torch.device) -> str:
    return AUTO_DTYPE.get(device.type, "fp32") if dtype == "auto" else dtype


def resolve_batch_size(batch_size: int | str, device: torch.device) -> int:
    return AUTO_BATCH_SIZE.get(device.type, 32) if batch_size == "auto" else int(batch_size)


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
        batch_size: int | str = 32,
        compile: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        make_current(self.device)
        dtype = resolve_dtype(dtype, self.device)
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
        if dtype != "fp32" and self.device.type != "cuda":
            raise ConfigError(f"dtype {dtype} needs a CUDA device (this one is {self.device}): use --dtype fp32")
        self.dtype = dtype
        self.batch_size = resolve_batch_size(batch_size, self.device)
        self.model = model.to(self.device).eval()
        self.compiled = compile
        if compile:
            # One graph per batch shape: image batches are padded to one of two sizes (see encode_pixels), so a
            # short last batch never compiles another graph. Both are compiled now, not on the first query,
            # which would compile while holding a server's model lock.
            self.model.visual = torch.compile(self.model.visual, dynamic=False)
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        cfg = model.cfg
        self.preprocess = Preprocess(cfg.vision_cfg.image_size, cfg.pretrained_cfg)
        if compile:
            for size in self._compiled_sizes():
                self.encode_pixels(torch.zeros(size, 3, self.image_size, self.image_size))

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
        """Embeddings of normalised ``[n, 3, S, S]`` pixels (see Preprocess): one forward pass, or with a
        compiled tower one per ``batch_size`` rows, each padded to one of the compiled sizes: 1 (a query) or
        ``batch_size`` (indexing, whose last batch is short)."""
        pixels = pixels.to(self.device, non_blocking=True)
        if not (self.compiled and project):
            with self._autocast():
                out = self.model.encode_image(pixels, normalize=normalize, project=project)
            return out.float().cpu().numpy()
        outs = []
        for start in range(0, len(pixels), self.batch_size):
            part = pixels[start : start + self.batch_size]
            n = len(part)
            size = next(s for s in self._compiled_sizes() if s >= n)
            if n < size:
                part = torch.cat([part, part.new_zeros((size - n, *part.shape[1:]))])
            with self._autocast():
                outs.append(self.model.encode_image(part, normalize=normalize)[:n])
        return torch.cat(outs).float().cpu().numpy()

    def _compiled_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({1, self.batch_size}))

    def host_buffer(self, n: int) -> torch.Tensor:
        """An uninitialised uint8 ``[n, S, S, 3]`` host tensor to stack tiles into: pinned for a GPU, so the
        upload is one DMA with no staging copy."""
        size = self.image_size
        return torch.empty((n, size, size, 3), dtype=torch.uint8, pin_memory=self.device.type == "cuda")

    def decode_jpegs(self, data: Sequence[bytes]) -> list[torch.Tensor | None]:
        """Decode JPEG files on this encoder's device (nvJPEG on a GPU) and resize/crop them there to
        ``[S, S, 3]`` uint8 tiles (``Preprocess.resize_crop_tensor``); None for a file this decoder refuses,
        which the caller decodes with PIL instead (nvJPEG refuses valid 12-bit, arithmetic-coded or oddly
        subsampled JPEGs)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        try:
            images: list[torch.Tensor | None] = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            # One refused file fails the batch: decode one by one to find it.
            images = []
            for one in raw:
                try:
                    images.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    images.append(None)
        return [None if im is None else self.preprocess.resize_crop_tensor(im.permute(1, 2, 0)) for im in images]

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
            part = tokens[idx]
            # The trimmed length from the host tokens: on the device it would cost a sync (and a graph break).
            length = self.model.text.trimmed_length(part)
            with self._autocast():
                emb = self.model.encode_text(part.to(self.device), normalize=normalize, length=length)
            out[idx] = emb.float().cpu().numpy()
        return out


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
