"""`histosearch eval` end to end on the tiny model: labelled sets scored, stored, compared, cached."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search.cli import main
from search.conch.encoder import Encoder
from search.storage.store import Store

COLOURS = {"adipose": (235, 225, 230), "lympho": (60, 40, 150), "stroma": (215, 90, 120)}
CASES_PER_CLASS, TILES_PER_CASE = 4, 4


def _tile(colour: tuple[int, int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.array(colour) + rng.integers(-20, 20, (64, 64, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    """48 tiles of 3 colour classes, 4 cases of 4 tiles per class, listed in a CSV with case and slide."""
    root = tmp_path / "set"
    rows = ["path,label,case_id,slide_id"]
    seed = 0
    for label, colour in COLOURS.items():
        for case in range(CASES_PER_CLASS):
            for n in range(TILES_PER_CASE):
                rel = f"{label}/{label}-c{case}/t{n}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                _tile(colour, seed).save(root / rel)
                rows.append(f"{rel},{label},{label}-case{case},{label}-case{case}-s{n % 2}")
                seed += 1
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


@pytest.fixture
def cli(tiny_settings, tiny_model_args, monkeypatch, capsys):
    monkeypatch.setenv("HISTOSEARCH_DATA_DIR", str(tiny_settings.data_dir))
    monkeypatch.setenv("HISTOSEARCH_CACHE_DIR", str(tiny_settings.cache_dir))
    monkeypatch.setenv("HISTOSEARCH_TILE_SIZE", "64")

    def run(*args: str, json_out: bool = True):
        code = main([*args, *tiny_model_args])
        out = capsys.readouterr()
        if code != 0:
            return code, out.err
        return code, (json.loads(out.out) if json_out else out.out)

    return run


def _chance(csv: Path) -> float:
    """Expected Acc@1 when labels carry no information: per query, same-label share of the other cases."""
    lines = [line.split(",") for line in csv.read_text().splitlines()[1:]]
    labels, cases = np.array([r[1] for r in lines]), np.array([r[2] for r in lines])
    shares = [
        ((labels == labels[i]) & (cases != cases[i])).sum() / (cases != cases[i]).sum() for i in range(len(lines))
    ]
    return float(np.mean(shares))


def test_separable_set_scores_near_one_and_shuffled_labels_near_chance(cli, labelled):
    code, run = cli("eval", "tiles", str(labelled), "--quiet", "--json")
    assert code == 0, run
    figures = run["report"]["metrics"]
    assert set(figures) == {"Acc@1", "Acc@3", "Acc@5", "mMV@5", "mAP@10"}
    assert figures["Acc@1"]["value"] >= 0.95 and figures["mMV@5"]["value"] >= 0.95
    # The truth is 1.0: the interval reaches it.
    assert figures["Acc@1"]["high"] == 1.0
    assert run["report"]["n_queries"] == 48 and run["dataset"]["size"] == 48
    assert [c["n"] for c in run["report"]["per_class"]] == [16, 16, 16]
    assert sum(map(sum, run["report"]["confusion"]["matrix"])) == 48
    assert run["settings"]["mode"] == "exact" and run["id"] == 1

    rows = labelled.read_text().splitlines()
    labels = [r.split(",")[1] for r in rows[1:]]
    shuffled_labels = np.random.default_rng(7).permutation(labels)
    shuffled = labelled.with_name("shuffled.csv")
    shuffled.write_text(
        "\n".join(
            [rows[0]]
            + [
                ",".join([r.split(",")[0], lab, *r.split(",")[2:]])
                for r, lab in zip(rows[1:], shuffled_labels, strict=True)
            ]
        )
    )
    # Cases stay whole so leave-one-case-out still applies; the labels now say nothing about the pixels.
    code, noise = cli("eval", "tiles", str(shuffled), "--quiet", "--json")
    assert code == 0, noise
    acc = noise["report"]["metrics"]["Acc@1"]
    chance = _chance(shuffled)
    assert acc["low"] <= chance <= acc["high"]
    assert abs(acc["value"] - chance) < 0.2
    assert noise["dataset"]["hash"] != run["dataset"]["hash"]


def test_runs_are_stored_listed_and_compared(cli, labelled, tiny_settings):
    assert cli("eval", json_out=False) == (0, "no evaluation runs yet: `histosearch eval tiles FOLDER` runs one\n")
    assert cli("eval", "tiles", str(labelled), "--quiet", "--json")[0] == 0
    assert cli("eval", "tiles", str(labelled), "--quiet", "--json", "--tta", "--bootstrap", "200")[0] == 0
    code, listing = cli("eval", "--json")
    assert code == 0 and [r["id"] for r in listing] == [2, 1]
    assert listing[0]["settings"]["tta"] is True and "per_class" not in listing[0]["report"]

    code, text = cli("status", json_out=False)
    assert "last eval: run 2 tiles on labels (exact), Acc@1 " in text
    code, text = cli("eval", json_out=False)
    lines = text.splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "2" and "tiles    labels  Acc@1 " in lines[0]
    code, text = cli("eval", "--compare", "1", "2", json_out=False)
    assert code == 0, text
    assert "changed: bootstrap, tta" in text and "warning" not in text
    assert "Acc@1" in text and ("overlap" in text or "apart" in text)
    code, comparison = cli("eval", "--compare", "1", "2", "--json")
    assert [r["metric"] for r in comparison["metrics"]][:1] == ["Acc@1"]
    assert all(isinstance(r["overlap"], bool) for r in comparison["metrics"])

    code, err = cli("eval", "--compare", "1", "9")
    assert code == 2 and "no evaluation run with id 9" in err
    store = Store(tiny_settings.db_url)
    assert store.get_eval_run(1)["report"]["per_class"][0]["label"] == "adipose"
    store.close()


def test_a_second_run_reuses_the_cached_embeddings(cli, labelled, monkeypatch, tiny_model_args, capsys):
    # Without --quiet a progress bar counts the images on stderr while they are embedded.
    assert main(["eval", "tiles", str(labelled), "--no-save", *tiny_model_args]) == 0
    out = capsys.readouterr()
    # The bar refreshes at most every 0.1 s and is cleared at the end, so under load its last count may be any n/48.
    assert "embedding" in out.err and re.search(r"\b\d+/48\b", out.err) and "Acc@1" in out.out

    def refuse(*args, **kwargs):
        raise AssertionError("embedded again")

    monkeypatch.setattr(Encoder, "encode_images", refuse)
    code, run = cli("eval", "tiles", str(labelled), "--quiet", "--no-save", "--json")
    assert code == 0 and "id" not in run
    # TTA embeds other views: a different cache entry.
    with pytest.raises(AssertionError, match="embedded again"):
        cli("eval", "tiles", str(labelled), "--quiet", "--no-save", "--tta")


def test_index_mode_uses_the_live_index_and_agrees_with_exact(cli, labelled, tiny_model_args, capsys):
    code, err = cli("eval", "tiles", str(labelled), "--index", "--quiet", "--json")
    assert code == 2 and "no index has been built yet" in err
    index = ["index", str(labelled.parent), "--quiet", "--workers", "0", "--index-type", "flat"]
    assert main([*index, *tiny_model_args]) == 0
    assert "index: build 1, flat, 48 vectors" in capsys.readouterr().out
    code, indexed = cli("eval", "tiles", str(labelled), "--index", "--quiet", "--json")
    assert code == 0, indexed
    code, exact = cli("eval", "tiles", str(labelled), "--exact", "--quiet", "--json")
    assert indexed["settings"]["index_type"] == "flat" and indexed["build_id"] == 1
    assert indexed["model_fingerprint"] == exact["model_fingerprint"]
    for name in ("Acc@1", "mMV@5", "mAP@10"):
        assert indexed["report"]["metrics"][name]["value"] == pytest.approx(exact["report"]["metrics"][name]["value"])
    # A filter restricts what can be found. The indexer took the case from the folder (the class name here):
    # with only adipose tiles searchable, the adipose queries still hit and every other query misses.
    code, filtered = cli("eval", "tiles", str(labelled), "--index", "--case", "adipose", "--quiet", "--json")
    assert code == 0, filtered
    assert filtered["report"]["metrics"]["Acc@1"]["value"] == pytest.approx(16 / 48)
    assert filtered["settings"]["filters"] == {"case": "adipose"}
    assert filtered["report"]["no_match"] == 32
    code, err = cli("eval", "tiles", str(labelled), "--index", "--meta", "nothing=here", "--quiet", "--json")
    assert code == 2 and "admit none" in err

    code, zeroshot = cli("eval", "zeroshot", str(labelled), "--index", "--k", "4", "--quiet", "--json")
    assert code == 0, zeroshot
    assert zeroshot["settings"]["ranking"] == "index" and sum(map(sum, zeroshot["report"]["confusion"]["matrix"])) == 48
    pairs = labelled.with_name("pairs.csv")
    pairs.write_text("image,caption\n" + "".join(f"{label}/{label}-c1/t0.png,{label}\n" for label in COLOURS))
    code, indexed_pairs = cli("eval", "pairs", str(pairs), "--index", "--quiet", "--json")
    code, exact_pairs = cli("eval", "pairs", str(pairs), "--quiet", "--json")
    assert code == 0 and indexed_pairs["build_id"] == 1
    # Three images and three captions: Recall@5 is 1 both ways, through the index (restricted to the set) too.
    assert indexed_pairs["report"]["metrics"]["text->image R@5"]["value"] == 1.0
    for name in ("text->image R@1", "image->text R@1"):
        assert indexed_pairs["report"]["metrics"][name]["value"] == exact_pairs["report"]["metrics"][name]["value"]
    missing = labelled.with_name("missing.csv")
    (labelled.parent / "extra.png").write_bytes(
        (labelled.parent / "adipose/adipose-c0/t0.png").read_bytes()[:-8] + b"12345678"
    )
    missing.write_text("path,label\nextra.png,adipose\nadipose/adipose-c0/t0.png,adipose\n")
    code, err = cli("eval", "tiles", str(missing), "--index", "--quiet")
    assert code == 2 and "1 of 2 images are not in the live index" in err
    code, err = cli("eval", "tiles", str(labelled), "--case", "x", "--quiet")
    assert code == 2 and "add --index" in err


def test_zeroshot_pairs_and_slides(cli, labelled):
    classes = labelled.with_name("classes.csv")
    classes.write_text("label,names\nadipose,adipose tissue|fat\nlympho,lymphocytes\nstroma,stroma|connective tissue\n")
    code, run = cli("eval", "zeroshot", str(labelled), "--classes", str(classes), "--k", "5", "--quiet", "--json")
    assert code == 0, run
    report = run["report"]
    assert set(report["metrics"]) == {"accuracy", "balanced_accuracy", "mean_precision@5"}
    assert report["prompts"]["adipose"] == ["adipose tissue", "fat"]
    assert sum(map(sum, report["confusion"]["matrix"])) == 48
    assert run["settings"]["prompt_ensemble"] is True
    code, bare = cli("eval", "zeroshot", str(labelled), "--no-ensemble", "--quiet", "--json")
    assert bare["settings"]["prompt_ensemble"] is False and bare["dataset"]["hash"] != run["dataset"]["hash"]
    classes.write_text("label,names\nadipose,fat\n")
    code, err = cli("eval", "zeroshot", str(labelled), "--classes", str(classes), "--quiet")
    assert code == 2 and "no names for the label(s) lympho, stroma" in err

    pairs = labelled.with_name("pairs.jsonl")
    records = [
        {"image": f"{label}/{label}-c0/t{n}.png", "caption": f"{label} number {n}"}
        for label in COLOURS
        for n in range(3)
    ]
    records.append({"image": "adipose/adipose-c0/t0.png", "caption": "a second caption for the same tile"})
    pairs.write_text("\n".join(json.dumps(r) for r in records))
    code, run = cli("eval", "pairs", str(pairs), "--quiet", "--json")
    assert code == 0, run
    figures = run["report"]["metrics"]
    assert run["report"]["n_images"] == 9 and run["report"]["n_captions"] == 10
    # Nine images and ten captions: everything is within the top 10.
    assert figures["text->image R@10"]["value"] == 1.0 and figures["image->text R@10"]["value"] == 1.0
    assert 0.0 <= figures["mean_recall"]["low"] <= figures["mean_recall"]["value"] <= figures["mean_recall"]["high"]

    code, run = cli("eval", "slides", str(labelled), "--quiet", "--json")
    assert code == 0, run
    assert run["report"]["n_queries"] == 24 and set(run["report"]["metrics"]) == {"Acc@1", "Acc@3", "Acc@5", "MVAcc@3"}
    assert run["report"]["metrics"]["Acc@1"]["value"] == 1.0
    assert run["settings"]["pooling"] == "mean" and run["report"]["pooling"].startswith("mean: mean of the slide's")
    code, medoid = cli("eval", "slides", str(labelled), "--pooling", "medoid", "--quiet", "--json")
    assert code == 0 and medoid["report"]["pooling"].startswith("medoid: mean of the 50% of CONCH tiles")
    assert medoid["settings"]["pooling"] == "medoid" and medoid["report"]["metrics"]["Acc@1"]["value"] == 1.0


def test_bad_sets_fail_with_one_line(cli, tmp_path, labelled):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.png,x\n")
    code, err = cli("eval", "tiles", str(bad))
    header = "the header must name the columns path,label; missing path, label (found file,class)"
    assert code == 2 and err.strip() == f"histosearch: error: {bad}: {header}"
    bad.write_text("path,label\nmissing.png,x\n")
    code, err = cli("eval", "tiles", str(bad))
    assert code == 2 and f"{bad}:2: no such image" in err and "Traceback" not in err
    code, err = cli("eval", "pairs", str(labelled))
    assert code == 2 and "header must name the columns image,caption" in err
    code, err = cli("eval", "slides", str(labelled.parent / "adipose"))
    assert code == 2 and "slide evaluation needs a slide_id on every row" in err
    mixed = labelled.with_name("mixed.csv")
    mixed.write_text(
        "path,label,case_id,slide_id\nadipose/adipose-c0/t0.png,adipose,P,S\nstroma/stroma-c0/t0.png,stroma,P,S\n"
    )
    code, err = cli("eval", "slides", str(mixed))
    assert code == 2 and "slide S has tiles of several labels (adipose, stroma)" in err
    for option, message in (("--k=0", "--k must be between 1 and 1000"), ("--bootstrap=0", "at least one resample")):
        code, err = cli("eval", "tiles", str(labelled), option)
        assert code == 2 and message in err
    (tmp_path / "empty" / "a").mkdir(parents=True)
    code, err = cli("eval", "tiles", str(tmp_path / "empty"))
    assert code == 2 and "no images in class sub-folders" in err
