"""Model configurations as data: JSON files in ``model_configs/`` read into typed dataclasses."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from search.core.errors import ConfigError


@dataclass(frozen=True)
class VisionCfg:
    image_size: int = 448
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    attn_pooler_heads: int = 8
    n_queries_contrast: int = 1
    n_queries_caption: int = 256


@dataclass(frozen=True)
class TextCfg:
    context_length: int = 128
    vocab_size: int = 32007
    width: int = 768
    heads: int = 12
    layers: int = 12
    pad_id: int = 0


@dataclass(frozen=True)
class PretrainedCfg:
    """What a set of weights expects around it (timm's PretrainedCfg idea)."""

    hf_repo: str | None = "MahmoodLab/CONCH"
    filename: str | None = "pytorch_model.bin"
    license: str = ""
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class ModelCfg:
    name: str
    embed_dim: int
    embed_dim_caption: int
    vision_cfg: VisionCfg = field(default_factory=VisionCfg)
    text_cfg: TextCfg = field(default_factory=TextCfg)
    pretrained_cfg: PretrainedCfg = field(default_factory=PretrainedCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _typed(cls: type, data: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


def list_models() -> list[str]:
    folder = resources.files(__package__) / "model_configs"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def parse_model_cfg(data: dict, name: str) -> ModelCfg:
    data = dict(data)
    # The reference configs carry decoder settings we do not build (no captioning decoder).
    data.pop("multimodal_cfg", None)
    try:
        vision = _typed(VisionCfg, _drop_flags(data.pop("vision_cfg", {})), f"{name}: vision_cfg")
        text = _typed(TextCfg, _drop_flags(data.pop("text_cfg", {})), f"{name}: text_cfg")
        pretrained = _typed(PretrainedCfg, data.pop("pretrained_cfg", {}), f"{name}: pretrained_cfg")
        return _typed(
            ModelCfg,
            {**data, "name": name, "vision_cfg": vision, "text_cfg": text, "pretrained_cfg": pretrained},
            name,
        )
    except TypeError as exc:
        raise ConfigError(f"{name}: {exc}") from None


# Reference-config flags that are always true for CONCH and that this implementation assumes.
_ALWAYS_ON = {"attentional_pool_caption", "attentional_pool_contrast", "output_tokens", "embed_cls"}


def _drop_flags(section: dict) -> dict:
    for flag in _ALWAYS_ON & set(section):
        if section[flag] is not True:
            raise ConfigError(f"{flag}={section[flag]!r} is not supported: CONCH needs it true")
    return {k: v for k, v in section.items() if k not in _ALWAYS_ON}


def get_model_cfg(name_or_path: str | Path) -> ModelCfg:
    """A registered config name (``conch_ViT-B-16``, ``conch_tiny``) or a path to a JSON file."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        return parse_model_cfg(data, path.stem)
    name = str(name_or_path)
    if name not in list_models():
        raise ConfigError(f"unknown model config {name!r}: use one of {list_models()} or a path to a JSON file")
    text = (resources.files(__package__) / "model_configs" / f"{name}.json").read_text()
    return parse_model_cfg(json.loads(text), name)
