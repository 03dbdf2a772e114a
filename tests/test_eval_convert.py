"""scripts/eval_convert.py: downloaded sets to the CSV layouts `histosearch eval` reads, run as a user runs it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from search.evaluation.datasets import load_labelled, load_pairs

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval_convert.py"


def _convert(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def _image(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_table_arch_and_sha256(tmp_path):
    # CRC-VAL-HE-7K-like: class folders; the slide is read out of the file name.
    for label in ("ADI", "TUM"):
        for n in range(2):
            _image(tmp_path / "crc" / label / f"{label}-SLIDE{n}-{n}.tif", f"{label}{n}".encode())
    done = _convert("folder", tmp_path / "crc", "--out", tmp_path / "out" / "crc.csv",
                    r"--pattern=-(?P<slide_id>SLIDE\d)-")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote 4 rows to {tmp_path / 'out' / 'crc.csv'}"
    data = load_labelled(tmp_path / "out" / "crc.csv")
    assert data.classes == ["ADI", "TUM"] and data.items[0].slide == "SLIDE0" and data.items[0].case is None

    # UniToPatho-like: a metadata table naming the image and its slide.
    _image(tmp_path / "unito" / "HP" / "a.png", b"a")
    _image(tmp_path / "unito" / "NORM" / "b.png", b"b")
    meta = tmp_path / "unito" / "test.csv"
    meta.write_text("image_id,top_label_name,wsi\na.png,HP,149-B3\nb.png,NORM,150-A1\n")
    done = _convert("table", meta, "--root", tmp_path / "unito", "--path", "{top_label_name}/{image_id}",
                    "--label", "top_label_name", "--slide", "wsi", "--out", tmp_path / "unito.csv")  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = load_labelled(tmp_path / "unito.csv")
    assert [(i.label, i.slide) for i in data.items] == [("HP", "149-B3"), ("NORM", "150-A1")]
    bad = _convert("table", meta, "--root", tmp_path / "unito", "--path", "file", "--label", "top_label_name",
                   "--out", tmp_path / "x.csv")  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith(f"eval_convert: error: {meta}:2: no column 'file'")

    # ARCH-like: captions.json keyed by number, images named by uuid.
    _image(tmp_path / "arch" / "images" / "u1.png", b"1")
    _image(tmp_path / "arch" / "images" / "u2.jpg", b"2")
    captions = tmp_path / "arch" / "captions.json"
    captions.write_text(
        json.dumps({"0": {"uuid": "u1", "caption": "Glands\n in  stroma"}, "1": {"uuid": "u2", "caption": "Necrosis"}})
    )
    done = _convert("arch", captions, "--images", tmp_path / "arch" / "images", "--out", tmp_path / "pairs.csv")
    assert done.returncode == 0, done.stderr
    pairs = load_pairs(tmp_path / "pairs.csv")
    assert pairs.captions == ["Glands in stroma", "Necrosis"] and len(pairs.images) == 2

    done = _convert("sha256", captions)
    assert done.stdout.split() == [hashlib.sha256(captions.read_bytes()).hexdigest(), str(captions)]
    assert _convert("sha256", tmp_path / "nope.zip").returncode == 2
