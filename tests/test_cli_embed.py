"""`histosearch embed` and the shared model options, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from search.cli import main
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
    assert "bad.png: not a readable image" in capsys.readouterr().err


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
