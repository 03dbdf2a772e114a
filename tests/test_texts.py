import csv
from importlib import resources
from pathlib import Path

import pytest

from indexer.texts import TextItem, builtin_vocabulary, load_corpus
from search.core.errors import BadInput

ORGANS = {
    "breast", "prostate", "colorectum", "stomach", "oesophagus", "lung", "liver", "pancreas", "kidney",
    "bladder", "skin", "lymph_node", "brain", "thyroid", "ovary", "uterus", "cervix", "bone",
    "soft_tissue", "head_and_neck", "any",
}  # fmt: skip
KINDS = {"diagnosis", "morphology", "tissue", "stain", "artifact"}


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_builtin_vocabulary_is_large_unique_and_tagged():
    items = builtin_vocabulary()
    texts = [item.text for item in items]
    assert len(texts) >= 300
    assert all(texts)
    assert len({text.casefold() for text in texts}) == len(texts)
    assert all(item.tags["organ"] in ORGANS and item.tags["kind"] in KINDS for item in items)
    assert len({item.tags["organ"] for item in items} - {"any"}) >= 15
    assert {"diagnosis", "morphology"} <= {item.tags["kind"] for item in items}


def test_builtin_vocabulary_file_is_clean():
    # The loader would collapse stray whitespace and drop duplicates, hiding them: check the file itself.
    source = resources.files("indexer") / "data" / "vocabulary.csv"
    rows = list(csv.reader(source.read_text(encoding="utf-8").splitlines()))
    assert rows[0] == ["text", "organ", "kind"]
    # Lower case throughout; only an eponym or abbreviation may open a text.
    capitalised_openers = {"Ewing", "Kaposi", "Warthin", "Masson", "HPV-associated"}
    for text, *_ in rows[1:]:
        assert text == " ".join(text.split()) and text, text
        assert not text.endswith("."), text
        assert text[0].islower() or text.split()[0] in capitalised_openers, text
    assert len(rows) - 1 == len(builtin_vocabulary())


def test_txt_skips_blanks_and_comments(tmp_path):
    path = write(tmp_path, "terms.txt", "# my terms\n  tumour necrosis  \n\nfat\n   # indented comment\n")
    assert load_corpus(path) == [TextItem("tumour necrosis", {}), TextItem("fat", {})]


def test_csv_text_column_and_tags(tmp_path):
    path = write(
        tmp_path,
        "terms.csv",
        'organ,Text,kind\nbreast,"cribriform glands, with necrosis",morphology\nlung,,diagnosis\nany,fat,\n',
    )
    assert load_corpus(path) == [
        TextItem("cribriform glands, with necrosis", {"organ": "breast", "kind": "morphology"}),
        TextItem("fat", {"organ": "any"}),
    ]


@pytest.mark.parametrize(
    ("header", "expected_tag"),
    [("id,caption", {"id": "7"}), ("term,id", {"id": "7"}), ("label,id", {"id": "7"})],
)
def test_csv_falls_back_to_caption_term_then_first_column(tmp_path, header, expected_tag):
    first, second = header.split(",")
    row = "7,mitoses" if first == "id" else "mitoses,7"
    path = write(tmp_path, "terms.csv", f"{header}\n{row}\n")
    assert load_corpus(path) == [TextItem("mitoses", expected_tag)]


def test_csv_with_byte_order_mark(tmp_path):
    path = write(tmp_path, "terms.csv", "\ufefftext,organ\nfat,any\n".encode())
    assert load_corpus(path) == [TextItem("fat", {"organ": "any"})]


def test_jsonl_text_fields_and_scalar_tags(tmp_path):
    path = write(
        tmp_path,
        "terms.jsonl",
        '{"text": "glioblastoma", "organ": "brain", "grade": 4, "curated": true, "refs": [1], "note": null}\n'
        "\n"
        '{"caption": "normal liver", "source": "atlas"}\n'
        '{"term": "  ", "organ": "any"}\n',
    )
    assert load_corpus(path) == [
        TextItem("glioblastoma", {"organ": "brain", "grade": "4", "curated": "true"}),
        TextItem("normal liver", {"source": "atlas"}),
    ]


def test_dedupe_keeps_first_ignoring_case_and_spacing(tmp_path):
    path = write(tmp_path, "terms.csv", "text,n\nTumour  necrosis,1\nfat,2\ntumour necrosis,3\n")
    assert load_corpus(path) == [TextItem("Tumour necrosis", {"n": "1"}), TextItem("fat", {"n": "2"})]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("bad.jsonl", '{"text": "fat"}\n{"text": "mucin"\n', "line 2: bad JSON"),
        ("bad.jsonl", '{"text": "fat"}\n\n["mucin"]\n', "line 3: expected a JSON object"),
        ("bad.jsonl", '{"text": "fat"}\n{"label": "mucin"}\n', "line 2: missing text field"),
        ("bad.jsonl", '{"text": 5}\n', "line 1: field 'text' must be a string"),
        ("bad.csv", "text,organ\nfat,any\nmucin,any,extra\n", "line 3: 3 fields but the header has 2"),
        ("bad.csv", 'text\n"fat\n', "line 2: malformed CSV"),
        ("bad.csv", "", "line 1: no header row"),
        ("bad.txt", b"fat\nmucin\ncaf\xe9\n", "line 3: not valid UTF-8"),
    ],
)
def test_bad_input_names_file_line_and_reason(tmp_path, name, content, reason):
    path = write(tmp_path, name, content)
    with pytest.raises(BadInput) as caught:
        load_corpus(path)
    assert str(path) in caught.value.message
    assert reason in caught.value.message


def test_unsupported_extension_lists_accepted_ones(tmp_path):
    path = write(tmp_path, "terms.xlsx", "fat")
    with pytest.raises(BadInput, match=r"terms\.xlsx.*'\.xlsx'.*\.txt, \.csv, \.jsonl"):
        load_corpus(path)


def test_file_without_texts_and_missing_file(tmp_path):
    with pytest.raises(BadInput, match="no texts found"):
        load_corpus(write(tmp_path, "empty.txt", "# only a comment\n\n"))
    with pytest.raises(BadInput, match="absent.txt: cannot read"):
        load_corpus(tmp_path / "absent.txt")
