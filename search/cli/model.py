"""The commands that run the CONCH model itself: `model fetch`, `model info` and `embed`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from search.cli.inputs import image_files, read_image
from search.cli.options import model_options
from search.core.errors import BadInput
from search.core.settings import Settings


def cmd_embed(args: argparse.Namespace, settings: Settings) -> int:
    import numpy as np

    from search.conch.encoder import DEFAULT_TEMPLATES, Encoder

    images = image_files(args.image or [])
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
    # Bad images stop the command before the model loads.
    pixels = [read_image(p, settings) for p in images]
    encoder = Encoder.from_settings(settings)
    image_emb = encoder.encode_images(pixels, project=not args.unprojected)
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
    from search.conch.hub import fetch_checkpoint, resolve_tokenizer

    path = fetch_checkpoint(settings, progress=not args.quiet)
    print(f"checkpoint: {path}")
    print(f"tokenizer: {resolve_tokenizer(settings, path)}")
    return 0


def cmd_model_info(args: argparse.Namespace, settings: Settings) -> int:
    from search.conch.config import get_model_cfg
    from search.conch.encoder import resolve_batch_size, resolve_device, resolve_dtype
    from search.conch.hub import resolve_checkpoint, resolve_tokenizer

    cfg = get_model_cfg(settings.model)
    device = resolve_device(settings.device)
    info = {
        "model": cfg.name,
        "image_size": cfg.vision_cfg.image_size,
        "embed_dim": cfg.embed_dim,
        "context_length": cfg.text_cfg.context_length,
        "device": str(device),
        "dtype": resolve_dtype(settings.dtype, device),
        "batch_size": resolve_batch_size(settings.batch_size, device),
    }
    checkpoint = resolve_checkpoint(settings)
    info["checkpoint"] = str(checkpoint)
    info["tokenizer"] = str(resolve_tokenizer(settings, checkpoint, download=False))
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


def add_model(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="get or inspect the CONCH weights")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    fetch = model_sub.add_parser("fetch", help="download pytorch_model.bin from Hugging Face (needs HF_TOKEN)")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    model_options(fetch)
    fetch.set_defaults(func=cmd_model_fetch)
    info = model_sub.add_parser("info", help="show the model config, checkpoint and tokenizer in use")
    model_options(info)
    info.set_defaults(func=cmd_model_info)


def add_embed(sub: argparse._SubParsersAction) -> None:
    embed = sub.add_parser("embed", help="write CONCH embeddings of images and/or texts to .npy, .npz or .json")
    embed.add_argument("--image", type=Path, action="append", help="an image file or a folder (repeatable)")
    embed.add_argument("--text", action="append", help="a text (repeatable)")
    embed.add_argument("--texts-file", type=Path, action="append", help="a file with one text per line")
    embed.add_argument("--out", "-o", type=Path, required=True, help="output .npy, .npz or .json")
    embed.add_argument("--unprojected", action="store_true", help="image features before the projection")
    embed.add_argument("--ensemble", action="store_true", help="prompt-ensemble the texts")
    model_options(embed)
    embed.set_defaults(func=cmd_embed)
