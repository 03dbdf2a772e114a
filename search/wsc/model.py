"""The Whole Slide Concepts model (WSC, from the ``medicalmultitaskmodeling`` package, "mmm") as slide encoder.

The weights are rebuilt with mmm's own classes from what :mod:`search.wsc.pickles` recovered (class names,
configs, state dicts): the classes come from the installed, pinned mmm and the file contributes only data.
mmm is licensed for non-commercial scientific research only; importing it requires the user to have accepted
that licence by setting ``MMM_LICENSE_ACCEPTED`` themselves. This module never sets it.
"""

from __future__ import annotations

import enum
import importlib
import importlib.metadata
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search.core.errors import CheckpointError, ConfigError, ModelUnavailable
from search.wsc.pickles import MODULE_NAMES, ModuleRecord

MMM_DISTRIBUTION = "medicalmultitaskmodeling"
MMM_VERSION = "1.6.3"  # the pickled modules run this version's forward: pinned in the [wsc] extra
LICENCE_ENV = "MMM_LICENSE_ACCEPTED"
LICENCE_VALUE = "i accept"
LICENCE_URL = "https://github.com/FraunhoferMEVIS/MedicalMultitaskModeling/blob/main/license.md"
LICENCE_TEXT = (
    "the Fraunhofer MEVIS \u00bbMedicalMultitaskModeling\u00ab licence: scientific non-commercial research only, "
    "no redistribution, with a patent notice"
)


def check_licence() -> None:
    """Stop unless the user accepted mmm's licence; mmm itself would raise on import."""
    if os.environ.get(LICENCE_ENV, "").strip().lower() != LICENCE_VALUE:
        raise ModelUnavailable(
            f"WSC slide vectors use the mmm package, under {LICENCE_TEXT} ({LICENCE_URL}). If you accept it, set "
            f"{LICENCE_ENV}='{LICENCE_VALUE}' in your environment; histosearch never sets it for you."
        )


def check_mmm_version() -> str:
    """The installed mmm version, which must be the pinned one: a different forward gives different vectors."""
    try:
        installed = importlib.metadata.version(MMM_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailable(
            f"WSC slide vectors need the [wsc] extra: pip install 'histosearch[wsc]' "
            f"({MMM_DISTRIBUTION}=={MMM_VERSION} and m3-sdk)"
        ) from None
    if installed != MMM_VERSION:
        raise ConfigError(
            f"{MMM_DISTRIBUTION} {installed} is installed, but WSC is read with {MMM_VERSION}: "
            f"pip install '{MMM_DISTRIBUTION}=={MMM_VERSION}'"
        )
    return installed


def _import_mmm() -> None:
    check_licence()
    check_mmm_version()
    try:
        importlib.import_module("mmm")
    except Exception as exc:  # mmm raises bare Exceptions (licence) and ImportErrors (m3-sdk) on import
        raise ModelUnavailable(f"cannot import mmm {MMM_VERSION}: {exc}") from None


def _resolve(module: str, qualname: str, where: str) -> Any:
    if not module.startswith("mmm.") and module != "mmm":
        raise CheckpointError(f"{where}: configuration names {module}.{qualname}; only mmm classes are rebuilt")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise ConfigError(
            f"{where}: {module}.{qualname} does not exist in mmm {MMM_VERSION}: the weights were saved with another "
            f"version"
        ) from None
    return obj


def from_json(value: Any, where: str) -> Any:
    """Real objects for the JSON form of :func:`search.wsc.pickles.to_json`, built with mmm's classes."""
    if isinstance(value, list):
        return [from_json(v, where) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(from_json(v, where) for v in value["__tuple__"])
    if "__set__" in value:
        return {from_json(v, where) for v in value["__set__"]}
    if "__float__" in value:
        return float(value["__float__"])
    if "__mapping__" in value:
        return {from_json(k, where): from_json(v, where) for k, v in value["__mapping__"]}
    if "__global__" in value:
        obj = _resolve(value["__global__"], value["qualname"], where)
        if not isinstance(obj, enum.Enum):
            raise CheckpointError(f"{where}: {value['__global__']}.{value['qualname']} is not an enum member")
        return obj
    if "__call__" in value:
        cls = _resolve(value["__call__"], value["qualname"], where)
        if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
            raise CheckpointError(f"{where}: {value['__call__']}.{value['qualname']} is not an enum")
        return cls(*(from_json(a, where) for a in value["args"]))
    if "__model__" in value:
        from pydantic import BaseModel, ValidationError

        cls = _resolve(value["__model__"], value["qualname"], where)
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            raise CheckpointError(f"{where}: {value['__model__']}.{value['qualname']} is not a configuration class")
        fields = from_json(value["fields"], where)
        if "pretrained" in fields:
            # The weights come from the file; pretrained=True would download ImageNet weights while building.
            fields["pretrained"] = False
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise ConfigError(
                f"{where}: the saved {value['qualname']} does not fit mmm {MMM_VERSION}: "
                f"{str(exc).splitlines()[0]} ({exc.error_count()} errors)"
            ) from None
    return {k: from_json(v, where) for k, v in value.items()}


def build_module(class_path: str, attributes: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                 where: str) -> nn.Module:  # fmt: skip
    """Construct ``class_path`` from its saved constructor arguments and load its tensors strictly."""
    module_name, _, qualname = class_path.rpartition(".")
    cls = _resolve(module_name, qualname, where)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"{where}: {class_path} is not a torch module")
    kwargs = {}
    for name in list(inspect.signature(cls.__init__).parameters)[1:]:
        if name not in attributes:
            raise ConfigError(f"{where}: {class_path} needs {name!r}, which the saved module does not hold")
        kwargs[name] = from_json(attributes[name], f"{where} {name}")
    module = cls(**kwargs)
    try:
        module.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:600]
        raise CheckpointError(f"{where}: the tensors do not fit mmm {MMM_VERSION}'s {qualname}: {detail}") from None
    return module.eval()


@dataclass
class SlideEmbedding:
    vector: torch.Tensor  # (dim,) float32
    attention: torch.Tensor  # (n_tiles,) float32, sums to 1: how much the grouper attended to each tile


class WscModel:
    """Encoder -> squeezer -> grouper: one vector per bag of tiles (a slide)."""

    def __init__(self, modules: Mapping[str, nn.Module], device: str = "cpu") -> None:
        self.modules = {name: modules[name].to(device).eval() for name in MODULE_NAMES}
        self.device = device

    @classmethod
    def from_records(cls, records: Mapping[str, ModuleRecord], label: str, device: str = "cpu") -> WscModel:
        _import_mmm()
        return cls(
            {
                name: build_module(r.class_path, r.attributes, r.state_dict, f"{label} {name}.pt")
                for name, r in records.items()
            },
            device,
        )

    @classmethod
    def from_trusted_zip(cls, path: Path, device: str = "cpu") -> WscModel:
        """mmm's own loader: unpickles (and so runs) the file. Only for a local file the user trusts by sha256."""
        _import_mmm()
        from mmm.api.M3Model import M3Model

        if not path.name.endswith(".pt.zip"):
            raise ConfigError(f"{path}: mmm's loader reads only files named *.pt.zip")
        loaded = M3Model(str(path), device)
        # mmm logs and skips a module it cannot load: a missing one is an error here.
        present = set(loaded.keys())
        missing = [name for name in MODULE_NAMES if name not in present]
        if missing:
            raise CheckpointError(f"{path}: mmm's loader did not load {', '.join(missing)}")
        return cls({name: loaded[name] for name in MODULE_NAMES}, device)

    @torch.inference_mode()
    def embed_bag(self, tiles: torch.Tensor, batch_size: int = 64) -> SlideEmbedding:
        """``tiles``: (n, 3, 224, 224) RGB in [0, 1] (no mean/std), one slide."""
        from mmm.mmm_types.GroupUsage import GroupingStrategy, GroupUsage

        if tiles.ndim != 4 or tiles.shape[0] == 0:
            raise ValueError(f"expected a non-empty (n, 3, H, W) bag, got {tuple(tiles.shape)}")
        latents = []
        for start in range(0, tiles.shape[0], batch_size):
            batch = tiles[start : start + batch_size].to(self.device)
            _, pooled = self.modules["squeezer"](self.modules["encoder"](batch))
            latents.append(pooled.flatten(1))
        latent = torch.cat(latents)
        ids = torch.zeros(latent.shape[0], dtype=torch.long, device=self.device)
        # The model card's grouper(latent, ids) fails on mmm 1.6.3: the usage argument is required.
        vector, meta = self.modules["grouper"](latent, ids, GroupUsage(grouping=GroupingStrategy.single))
        return SlideEmbedding(vector[0].float().cpu(), tile_attention(meta["attn_weights"], latent.shape[0]))


def tile_attention(attn: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """Per-tile weights summing to 1 from the grouper's first-layer attention.

    mmm 1.6.3 returns it as (1, heads, n, n) (query x key); the attention a tile receives is summed over
    queries, as mmm's own ``reshape_weights_into_instance_heads`` does, then averaged over heads. An already
    reduced (n, heads) tensor is accepted too.
    """
    attn = attn.float().cpu()
    if attn.ndim == 4:
        attn = attn[0].sum(dim=1).T  # (n, heads)
    if attn.ndim != 2 or attn.shape[0] != n_tiles:
        raise ValueError(f"unexpected attention shape {tuple(attn.shape)} for {n_tiles} tiles")
    per_tile = attn.mean(dim=1).clamp_min(0)
    total = per_tile.sum()
    return per_tile / total if total > 0 else torch.full((n_tiles,), 1.0 / n_tiles)
