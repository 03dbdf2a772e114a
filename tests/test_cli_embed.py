"""`histosearch embed` and the shared model options, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from search.cli import main
from search.conch.encoder import DEFAULT_TEMPLATES
from tests.archives import bomb_png
from tests.test_model import assert_embeddings_match


def test_embed_images_folder_and_texts_to_npz_and_json(tmp_path, tiny_model_args, conch_reference):
    expected = np.load(conch_reference / "expected" / "tiny.npz")
    texts = json.loads((conch_reference / "texts.json").read_text())
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\n".join(texts[:4]) + "\n\n")
    model = tiny_model_args
    out = tmp_path / "emb.npz"
    assert (
        main(
            [
                "embed",
                "--image",
                str(conch_reference / "images" / "roi1.jpg"),
                "--texts-file",
                str(texts_file),
                "-o",
                str(out),
                *model,
            ]
        )
        == 0
    )
    data = np.load(out)
    assert_embeddings_match(data["images"], expected["image_embedding"][:1])
    assert_embeddings_match(data["texts"], expected["text_embedding"][:4])

    out_json = tmp_path / "emb.json"
    assert (
        main(["embed", "--image", str(conch_reference / "images"), "--text", texts[0], "-o", str(out_json), *model])
        == 0
    )
    records = json.loads(out_json.read_text())["embeddings"]
    assert [r["kind"] for r in records] == ["image"] * 5 + ["text"]
    assert_embeddings_match(np.array([records[-1]["embedding"]], np.float32), expected["text_embedding"][:1])


def test_embed_npy_single_kind_and_errors(tmp_path, tiny_model_args, conch_reference, capsys):
    model = tiny_model_args
    out = tmp_path / "t.npy"
    assert main(["embed", "--text", "necrosis", "-o", str(out), *model]) == 0
    assert np.load(out).shape == (1, 32)
    both = ["embed", "--text", "x", "--image", str(conch_reference / "images" / "roi1.jpg"), "-o", str(out), *model]
    assert main(both) == 2
    assert ".npz or .json" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["embed", "--image", str(bad), "-o", str(tmp_path / "x.json"), *model]) == 2
    assert "bad.png: not a JPEG, PNG, TIFF or WebP image" in capsys.readouterr().err


def test_console_script_without_weights_explains(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HISTOSEARCH_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "search.cli", "embed", "--text", "x", "-o", str(tmp_path / "a.npy")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    assert "histosearch model fetch" in proc.stderr and "HF_TOKEN" in proc.stderr


def test_embed_unprojected_gives_the_pooled_feature(tmp_path, tiny_model_args, conch_reference):
    expected = np.load(conch_reference / "expected" / "tiny.npz")
    image = conch_reference / "images" / "roi1.jpg"
    projected, unprojected = tmp_path / "p.npy", tmp_path / "u.npy"
    assert main(["embed", "--image", str(image), "-o", str(projected), *tiny_model_args]) == 0
    assert main(["embed", "--image", str(image), "-o", str(unprojected), "--unprojected", *tiny_model_args]) == 0
    # The attention-pooled feature before proj_contrast, L2-normalised like every embedding `embed` writes.
    pooled = expected["image_embedding_unprojected"][:1]
    assert_embeddings_match(np.load(unprojected), pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    assert_embeddings_match(np.load(projected), expected["image_embedding"][:1])
    assert not np.allclose(np.load(unprojected), np.load(projected), atol=1e-2)


def test_embed_ensemble_is_the_normalised_mean_of_the_templates(tmp_path, tiny_model_args, tiny_encoder):
    single, ensemble = tmp_path / "s.npy", tmp_path / "e.npy"
    assert main(["embed", "--text", "tumour necrosis", "-o", str(single), *tiny_model_args]) == 0
    assert main(["embed", "--text", "tumour necrosis", "-o", str(ensemble), "--ensemble", *tiny_model_args]) == 0
    each = tiny_encoder.encode_texts([template.format("tumour necrosis") for template in DEFAULT_TEMPLATES])
    mean = each.mean(axis=0)
    np.testing.assert_allclose(np.load(ensemble)[0], mean / np.linalg.norm(mean), atol=1e-5)
    assert not np.allclose(np.load(ensemble), np.load(single), atol=1e-3)


@pytest.mark.parametrize(("limit", "side"), [(None, 20_000), ("4000", 100)])
def test_embed_refuses_an_image_claiming_too_many_pixels(tmp_path, tiny_model_args, capsys, monkeypatch, limit, side):
    # 20000^2 trips Pillow's own bomb guard; 100^2 against a 4000-pixel limit trips the max_image_pixels setting.
    if limit:
        monkeypatch.setenv("HISTOSEARCH_MAX_IMAGE_PIXELS", limit)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(side, side))
    assert main(["embed", "--image", str(bomb), "-o", str(tmp_path / "x.npy"), *tiny_model_args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bomb}: " in err and "too many pixels" in err
    assert not (tmp_path / "x.npy").exists()


def test_embed_refuses_a_file_too_big_to_be_an_image_within_the_limit(tmp_path, capsys, monkeypatch):
    # max_image_pixels=1 allows files up to 4 bytes + 1 MiB of headers; no model is loaded to find that out.
    monkeypatch.setenv("HISTOSEARCH_MAX_IMAGE_PIXELS", "1")
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (2 << 20))
    assert main(["embed", "--image", str(big), "-o", str(tmp_path / "x.npy"), "--checkpoint", "/nonexistent.bin"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{big}: {2 << 20} bytes is larger than any image" in err
