"""The `histosearch` command line: one subcommand per job, all reading the one Settings object."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import BadInput, HistosearchError
from .settings import Settings, load_settings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"}

Command = Callable[[argparse.Namespace, Settings], int]


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model-config", dest="model", help="config name (conch_ViT-B-16, conch_tiny) or JSON file")
    group.add_argument("--checkpoint", type=Path, help="pytorch_model.bin or .safetensors")
    group.add_argument("--tokenizer", type=Path, help="CONCH tokenizer JSON file")
    group.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    group.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="fp32 (default); bf16/fp16 on GPU")
    group.add_argument("--batch-size", type=int)


def _settings_from(args: argparse.Namespace) -> Settings:
    keys = ("data_dir", "model", "checkpoint", "tokenizer", "device", "dtype", "batch_size", "workers", "index_type")
    keys += ("host", "port", "auth_token")
    return load_settings(**{k: getattr(args, k) for k in keys if getattr(args, k, None) is not None})


def _image_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise BadInput(f"{path}: no such file or folder")
    return files


def cmd_embed(args: argparse.Namespace, settings: Settings) -> int:
    from PIL import Image, UnidentifiedImageError

    from .encoder import DEFAULT_TEMPLATES, Encoder

    images = _image_files(args.image or [])
    texts = list(args.text or [])
    for texts_file in args.texts_file or []:
        if not texts_file.is_file():
            raise BadInput(f"{texts_file}: no such file")
        texts += [line.strip() for line in texts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not images and not texts:
        raise BadInput("nothing to embed: give --image FILE|FOLDER, --text TEXT or --texts-file FILE")
    out: Path = args.out
    if out.suffix not in {".npy", ".npz", ".json"}:
        raise BadInput(f"{out}: the output must end in .npy, .npz or .json")
    if out.suffix == ".npy" and images and texts:
        raise BadInput(f"{out}: one .npy holds one matrix; write images and texts to .npz or .json")
    encoder = Encoder.from_settings(settings)
    loaded = []
    for path in images:
        try:
            with Image.open(path) as im:
                im.load()
                loaded.append(im.copy())
        except (UnidentifiedImageError, OSError) as exc:
            raise BadInput(f"{path}: not a readable image ({exc})") from None
    image_emb = encoder.encode_images(loaded, project=not args.unprojected)
    text_emb = encoder.encode_texts(texts, templates=DEFAULT_TEMPLATES if args.ensemble else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, image_emb if images else text_emb)
    elif out.suffix == ".npz":
        np.savez(
            out,
            images=image_emb,
            image_paths=np.array([str(p) for p in images]),
            texts=text_emb,
            text_inputs=np.array(texts),
        )
    else:
        records = [
            {"kind": "image", "input": str(p), "embedding": e.tolist()} for p, e in zip(images, image_emb, strict=True)
        ]
        records += [{"kind": "text", "input": t, "embedding": e.tolist()} for t, e in zip(texts, text_emb, strict=True)]
        out.write_text(json.dumps({"model": encoder.fingerprint, "dim": encoder.dim, "embeddings": records}))
    print(f"wrote {len(images)} image and {len(texts)} text embeddings ({encoder.dim}-d) to {out}")
    return 0


def cmd_model_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from .hub import fetch_checkpoint, resolve_tokenizer

    path = fetch_checkpoint(settings, progress=not args.quiet)
    print(f"checkpoint: {path}")
    print(f"tokenizer: {resolve_tokenizer(settings, path)}")
    return 0


def cmd_model_info(args: argparse.Namespace, settings: Settings) -> int:
    from .config import get_model_cfg
    from .encoder import resolve_device
    from .hub import resolve_checkpoint, resolve_tokenizer

    cfg = get_model_cfg(settings.model)
    info = {
        "model": cfg.name,
        "image_size": cfg.vision_cfg.image_size,
        "embed_dim": cfg.embed_dim,
        "context_length": cfg.text_cfg.context_length,
        "device": str(resolve_device(settings.device)),
        "dtype": settings.dtype,
    }
    checkpoint = resolve_checkpoint(settings)
    info["checkpoint"] = str(checkpoint)
    info["tokenizer"] = str(resolve_tokenizer(settings, checkpoint, download=False))
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histosearch", description="Search pathology tile archives with CONCH.")
    parser.add_argument("--data-dir", type=Path, help="where the index lives (HISTOSEARCH_DATA_DIR)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = sub.add_parser("model", help="get or inspect the CONCH weights")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    fetch = model_sub.add_parser("fetch", help="download pytorch_model.bin from Hugging Face (needs HF_TOKEN)")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    _model_options(fetch)
    fetch.set_defaults(func=cmd_model_fetch)
    info = model_sub.add_parser("info", help="show the model config, checkpoint and tokenizer in use")
    _model_options(info)
    info.set_defaults(func=cmd_model_info)

    embed = sub.add_parser("embed", help="write CONCH embeddings of images and/or texts to .npy, .npz or .json")
    embed.add_argument("--image", type=Path, action="append", help="an image file or a folder (repeatable)")
    embed.add_argument("--text", action="append", help="a text (repeatable)")
    embed.add_argument("--texts-file", type=Path, action="append", help="a file with one text per line")
    embed.add_argument("--out", "-o", type=Path, required=True, help="output .npy, .npz or .json")
    embed.add_argument("--unprojected", action="store_true", help="image features before the projection")
    embed.add_argument("--ensemble", action="store_true", help="prompt-ensemble the texts")
    _model_options(embed)
    embed.set_defaults(func=cmd_embed)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings_from(args)
        return args.func(args, settings)
    except HistosearchError as exc:
        print(f"histosearch: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("histosearch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
