"""Conformance with the reference CONCH outputs (../shared/conch_reference) for both configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from search.conch.config import get_model_cfg, list_models, parse_model_cfg
from search.conch.model import create_model
from search.conch.preprocess import Preprocess
from search.conch.tokenizer import ConchTokenizer
from search.core.errors import ConfigError

CASES = {
    "conch_tiny": ("config_tiny.json", "tiny.npz", "tiny_checkpoint"),
    "conch_ViT-B-16": ("config_full.json", "full.npz", "full_checkpoint"),
}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def assert_embeddings_match(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4
    assert _cosine(got, expected).min() >= 0.99999


@pytest.fixture(params=list(CASES), scope="module")
def reference_run(request, conch_reference):
    name = request.param
    _, expected_file, checkpoint_fixture = CASES[name]
    checkpoint = request.getfixturevalue(checkpoint_fixture)
    model = create_model(name, checkpoint=checkpoint)
    cfg = model.cfg
    expected = np.load(conch_reference / "expected" / expected_file)
    images = json.loads((conch_reference / "images.json").read_text())
    texts = json.loads((conch_reference / "texts.json").read_text())
    preprocess = Preprocess(cfg.vision_cfg.image_size, cfg.pretrained_cfg)
    tokenizer = ConchTokenizer(
        conch_reference / "tokenizer" / "conch_byte_level_bpe_uncased.json", cfg.text_cfg.context_length
    )
    pixels = torch.stack([preprocess(conch_reference / "images" / name) for name in images])
    tokens = tokenizer(texts)
    with torch.inference_mode():
        out = {
            "pixels": pixels.numpy(),
            "tokens": tokens.numpy(),
            "image_embedding": model.encode_image(pixels).numpy(),
            "image_embedding_unprojected": model.encode_image(pixels, normalize=False, project=False).numpy(),
            "text_embedding": model.encode_text(tokens).numpy(),
            "text_embedding_unnormalized": model.encode_text(tokens, normalize=False).numpy(),
        }
    if name == "conch_ViT-B-16":
        expected = dict(expected)
        expected["pixels"] = np.load(conch_reference / "expected" / "pixels_448.npy")
    return name, model, out, expected


def test_tokens_identical(reference_run):
    _, _, out, expected = reference_run
    np.testing.assert_array_equal(out["tokens"], expected["tokens"])


def test_pixels_match(reference_run):
    _, _, out, expected = reference_run
    assert np.abs(out["pixels"] - expected["pixels"]).max() <= 1e-5


@pytest.mark.parametrize(
    "key", ["image_embedding", "image_embedding_unprojected", "text_embedding", "text_embedding_unnormalized"]
)
def test_embeddings_match(reference_run, key):
    _, _, out, expected = reference_run
    assert_embeddings_match(out[key], expected[key])


def test_logit_scale_loaded(reference_run):
    _, model, _, expected = reference_run
    assert float(model.logit_scale.detach()) == pytest.approx(float(expected["logit_scale"]))


def test_trimmed_text_pass_equals_padded_pass(reference_run, conch_reference):
    """Only real tokens + first pad + CLS are computed; the output equals the full padded pass."""
    name, model, _, _ = reference_run
    texts = [
        "gland",
        "",
        "invasive ductal carcinoma with cribriform glands",
        "Tumor-infiltrating lymphocytes surrounding nests of squamous cells",
    ]
    tokenizer = ConchTokenizer(
        conch_reference / "tokenizer" / "conch_byte_level_bpe_uncased.json", model.cfg.text_cfg.context_length
    )
    tokens = tokenizer(texts)
    with torch.inference_mode():
        trimmed = model.encode_text(tokens, normalize=False, trim=True).numpy()
        padded = model.encode_text(tokens, normalize=False, trim=False).numpy()
        # Each text alone (its own trim length) must agree too.
        alone = np.concatenate([model.encode_text(tokens[i : i + 1], normalize=False).numpy() for i in range(4)])
    assert (tokens == 0).sum(1).min() > 1, "the texts must be shorter than the context for trimming to matter"
    assert np.abs(trimmed - padded).max() <= 1e-5
    assert np.abs(alone - padded).max() <= 1e-5


def test_trimmed_pass_differs_without_the_cls_mask_quirk(reference_run, conch_reference):
    """Guard that the equality test above has teeth: a CLS that ignores the first pad gives other numbers."""
    _, model, _, _ = reference_run
    text = model.text
    tokenizer = ConchTokenizer(
        conch_reference / "tokenizer" / "conch_byte_level_bpe_uncased.json", model.cfg.text_cfg.context_length
    )
    tokens = tokenizer(["cribriform glands"])
    allowed = text._allowed(tokens[:, :-1])
    real = int((tokens != 0).sum())
    # The CLS row sees the real tokens and the first pad, not later pads and not itself.
    assert allowed[0, 0, -1, : real + 1].all()
    assert not allowed[0, 0, -1, real + 1 :].any()


def test_registry_and_reference_configs_agree(conch_reference):
    assert {"conch_ViT-B-16", "conch_tiny"} <= set(list_models())
    for name, (config_file, _, _) in CASES.items():
        ours = get_model_cfg(name)
        theirs = parse_model_cfg(json.loads((conch_reference / config_file).read_text()), name)
        assert ours.vision_cfg == theirs.vision_cfg
        assert ours.text_cfg == theirs.text_cfg
        assert ours.embed_dim == theirs.embed_dim
    full = get_model_cfg("conch_ViT-B-16")
    assert (full.vision_cfg.image_size, full.embed_dim, full.text_cfg.context_length) == (448, 512, 128)
    assert full.text_cfg.vocab_size == 32007


def test_model_tensor_names_are_the_checkpoints(conch_reference):
    for name, spec_file in [("conch_tiny", "spec_tiny.json"), ("conch_ViT-B-16", "spec_full.json")]:
        spec = json.loads((conch_reference / spec_file).read_text())
        state = create_model(name).state_dict()
        assert {k: list(v.shape) for k, v in state.items()} == spec


def test_unknown_config_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="conch_ViT-B-16"):
        get_model_cfg("conch_nope")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 8, "embed_dim_caption": 8, "vision_cfg": {"depth": 3}}))
    with pytest.raises(ConfigError, match="unknown keys"):
        get_model_cfg(bad)
