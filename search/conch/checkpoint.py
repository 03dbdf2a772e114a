"""Loading CONCH checkpoints: strict and loud.

Accepted: the released ``pytorch_model.bin`` (read with ``weights_only=True``: a file that needs
arbitrary unpickling is refused) and ``.safetensors``; a ``{"state_dict": ...}`` wrapper and a
``module.`` prefix are unwrapped; ``text_decoder.*`` (the captioning decoder, not built here) is
ignored. Any other missing or unexpected tensor, or a shape mismatch, is an error naming them.

Input size: when the config's ``image_size`` differs from the checkpoint's (448 px for CONCH), the
ViT position embedding is resampled bicubically to the new patch grid (class-token slot kept), as
timm does for fine-tuning at another resolution. Embeddings at another size are not the released
model's: use it knowingly.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from search.conch.hub import sha256_file
from search.core.errors import CheckpointError

IGNORED_PREFIXES = ("text_decoder.",)
_LISTED = 12


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "Unsupported global" not in str(exc):
                # Not a pickle of Python objects, but bytes no unpickler makes sense of.
                raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt?)") from None
            raise CheckpointError(
                f"{path}: refused: the checkpoint needs arbitrary unpickling (it holds Python objects, not "
                f"only tensors), which can run code. Save a plain state dict (torch.save(model.state_dict())) "
                f"or convert it to .safetensors. Detail: {str(exc).splitlines()[0]}"
            ) from None
        except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, TypeError, struct.error) as exc:
            # Garbage reaches the unpickler's opcode tables: any of these means the same thing.
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a mapping of tensor names to tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" ... and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    state = read_state_dict(path)
    expected = model.state_dict()
    pos_key = "visual.trunk.pos_embed"
    if pos_key in state and state[pos_key].shape != expected[pos_key].shape:
        trunk = model.visual.trunk
        state[pos_key] = resample_abs_pos_embed(
            state[pos_key],
            new_size=list(trunk.patch_embed.grid_size),
            num_prefix_tokens=trunk.num_prefix_tokens,
            interpolation="bicubic",
            antialias=False,
        )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches: {_listing(wrong_shape)}")
    if problems:
        raise CheckpointError(
            f"{path}: does not match the model config {getattr(model, 'cfg', None) and model.cfg.name!r}: "
            + "; ".join(problems)
            + ". Check --model-config matches the checkpoint."
        )
    model.load_state_dict(state, strict=True)


def checkpoint_digest(path: str | Path, cache_dir: Path | None = None) -> str:
    """sha256 of the checkpoint file, remembered per (path, size, mtime) so a 1.6 GB file is hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_dir / "checkpoint_digests.json" if cache_dir else None
    known: dict[str, str] = {}
    if cache_file and cache_file.is_file():
        try:
            known = json.loads(cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            known = {}
    if key in known:
        return known[key]
    known[key] = sha256_file(path)
    if cache_file:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(known))
            tmp.replace(cache_file)
        except OSError:
            pass  # a read-only cache only costs a re-hash next time
    return known[key]
