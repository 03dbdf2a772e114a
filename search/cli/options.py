"""Options that more than one command takes: setting overrides typed from the Settings model, and the model's.

An option that overrides a setting names the setting as its dest, so ``settings_from`` finds every override by
the Settings model's field names, with no list of options kept by hand.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Literal

from search.core.settings import Settings, load_settings


def setting_option(parser: argparse._ActionsContainer, field: str, *flags: str, help: str, **extra: object) -> None:
    """An option that overrides the setting ``field``: its type (or choices) comes from the Settings model."""
    annotation = Settings.model_fields[field].annotation
    members = [annotation]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
    # Annotated[int, Field(ge=1)] -> int: the bounds are checked by the settings, with the setting's name.
    members = [typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a for a in members]
    kwargs: dict = {}
    if members == [bool]:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif len(members) == 1 and typing.get_origin(members[0]) is Literal:
        kwargs["choices"] = list(typing.get_args(members[0]))
    elif len(members) == 1 and members[0] in (str, int, float, Path):
        kwargs["type"] = members[0]
    elif members[0] is int and all(typing.get_origin(m) is Literal for m in members[1:]):
        kwargs["type"] = _int_or([w for m in members[1:] for w in typing.get_args(m)])
    else:
        raise TypeError(f"setting {field}: no command line option for a {annotation!r} value")
    env = f"HISTOSEARCH_{field.upper()}"
    kwargs.update(extra)
    parser.add_argument(*(flags or (f"--{field.replace('_', '-')}",)), dest=field, help=f"{help}; env {env}", **kwargs)


def _int_or(words: list[str]):
    """An option type for a setting that is a number or one of ``words`` (``batch_size``: 64 or auto)."""

    def parse(value: str) -> int | str:
        if value in words:
            return value
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r}: a whole number or {' or '.join(words)}") from None

    return parse


def model_options(parser: argparse.ArgumentParser) -> None:
    """The model settings, for every command that may load the encoder."""
    group = parser.add_argument_group("model")
    setting_option(group, "model", "--model-config", help="config name (conch_ViT-B-16, conch_tiny) or JSON file")
    setting_option(group, "checkpoint", help="pytorch_model.bin or .safetensors")
    setting_option(group, "tokenizer", help="CONCH tokenizer JSON file")
    setting_option(group, "device", help="auto (default), cpu, cuda, cuda:N")
    setting_option(group, "dtype", help="auto (default: bf16 on a GPU, fp32 on a CPU); bf16/fp16 on a GPU only")
    setting_option(group, "batch_size", help="images per encoder batch, or auto (256 on a GPU, 32 on a CPU)")
    setting_option(group, "compile", help="torch.compile the image tower, at start (for GPUs)")
    setting_option(group, "gpu_decode", help="decode and resize JPEG tiles on the GPU (nvJPEG; PIL where it refuses)")


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings, with every option whose dest names a setting (see ``setting_option``) as an override."""
    return load_settings(**{k: getattr(args, k, None) for k in Settings.model_fields})
