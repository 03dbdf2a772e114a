"""The encoder's public behaviour: batching, inputs, normalisation, ensembling, devices."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from search.conch.encoder import DEFAULT_TEMPLATES, Encoder
from search.core.errors import ConfigError, ModelUnavailable
from search.core.settings import load_settings
from tests.test_model import assert_embeddings_match


def test_images_from_paths_pil_and_arrays_match_reference(tiny_encoder, conch_reference):
    names = json.loads((conch_reference / "images.json").read_text())
    paths = [conch_reference / "images" / n for n in names]
    expected = np.load(conch_reference / "expected" / "tiny.npz")
    tiny_encoder.batch_size = 2  # several batches, one ragged
    from_paths = tiny_encoder.encode_images(paths)
    pil = [Image.open(p) for p in paths]
    from_pil = tiny_encoder.encode_images(pil)
    from_arrays = tiny_encoder.encode_images([np.asarray(Image.open(paths[0]))])
    assert from_paths.dtype == np.float32 and from_paths.shape == (5, 32)
    assert_embeddings_match(from_paths, expected["image_embedding"])
    np.testing.assert_allclose(from_pil, from_paths, atol=1e-6)
    np.testing.assert_allclose(from_arrays[0], from_paths[0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(from_paths, axis=1), 1, atol=1e-6)
    unprojected = tiny_encoder.encode_images(paths, project=False, normalize=False)
    assert_embeddings_match(unprojected, expected["image_embedding_unprojected"])


def test_texts_in_any_order_and_batch_match_reference(tiny_encoder, conch_reference):
    texts = json.loads((conch_reference / "texts.json").read_text())
    expected = np.load(conch_reference / "expected" / "tiny.npz")["text_embedding"]
    assert_embeddings_match(tiny_encoder.encode_texts(texts), expected)
    order = [5, 0, 7, 2]
    assert_embeddings_match(tiny_encoder.encode_texts([texts[i] for i in order]), expected[order])
    assert tiny_encoder.encode_texts([]).shape == (0, 32)


def test_prompt_ensemble_is_the_renormalised_mean(tiny_encoder):
    got = tiny_encoder.encode_texts(["necrosis", "mitotic figures"], templates=DEFAULT_TEMPLATES)
    each = tiny_encoder.encode_texts([t.format("necrosis") for t in DEFAULT_TEMPLATES])
    mean = each.mean(0)
    np.testing.assert_allclose(got[0], mean / np.linalg.norm(mean), atol=1e-6)
    assert not np.allclose(got[0], tiny_encoder.encode_texts(["necrosis"])[0], atol=1e-3)


def test_half_precision_needs_a_gpu(tiny_encoder):
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        Encoder(tiny_encoder.model, tiny_encoder.tokenizer, fingerprint="x", device="cpu", dtype="bf16")


def test_cuda_asked_without_gpu_is_a_clear_error(tiny_encoder):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        Encoder(tiny_encoder.model, tiny_encoder.tokenizer, fingerprint="x", device="cuda")


def test_fingerprint_follows_the_weights(tiny_encoder, tiny_state_dict, tokenizer_path, tmp_path):
    import torch

    other = tmp_path / "other.bin"
    torch.save({**tiny_state_dict, "logit_scale": torch.tensor(0.5)}, other)
    settings = load_settings(
        model="conch_tiny", checkpoint=other, tokenizer=tokenizer_path, device="cpu", cache_dir=tmp_path
    )
    assert Encoder.from_settings(settings).fingerprint != tiny_encoder.fingerprint
    assert tiny_encoder.fingerprint.startswith("conch_tiny-")


def test_no_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    settings = load_settings(model="conch_tiny", cache_dir=tmp_path, device="cpu")
    with pytest.raises(ModelUnavailable, match="histosearch model fetch"):
        Encoder.from_settings(settings)


def test_auto_dtype_and_batch_size_follow_the_device(tiny_encoder):
    import torch

    from search.conch.encoder import resolve_batch_size, resolve_dtype

    encoder = Encoder(
        tiny_encoder.model, tiny_encoder.tokenizer, fingerprint="x", device="cpu", dtype="auto", batch_size="auto"
    )
    assert (encoder.dtype, encoder.batch_size) == ("fp32", 32)
    cuda = torch.device("cuda", 1)
    assert (resolve_dtype("auto", cuda), resolve_batch_size("auto", cuda)) == ("bf16", 256)
    assert (resolve_dtype("fp16", cuda), resolve_batch_size(8, cuda)) == ("fp16", 8)
    assert load_settings(batch_size="64").batch_size == 64 and load_settings().batch_size == "auto"


def test_compiled_tower_sees_one_batch_shape_from_the_start(
    tiny_encoder, tiny_checkpoint, conch_reference, monkeypatch
):
    """torch.compile(dynamic=False) compiles one graph per input shape: batches are padded to 1 or batch_size, and
    both graphs are compiled when the encoder is built (a stand-in for torch.compile records what it sees)."""
    import torch

    from search.conch.model import create_model

    calls: list[dict] = []
    shapes: list[tuple[int, ...]] = []

    class Recorded(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            shapes.append(tuple(pixels.shape))
            return self.inner(pixels)

    def compile(module, **kwargs):
        calls.append(kwargs)
        return Recorded(module)

    monkeypatch.setattr(torch, "compile", compile)
    model = create_model("conch_tiny", checkpoint=tiny_checkpoint)
    encoder = Encoder(model, tiny_encoder.tokenizer, fingerprint="x", device="cpu", batch_size=4, compile=True)
    # Both graphs, a query's and a full batch's, compiled at start.
    assert calls == [{"dynamic": False}] and shapes == [(1, 3, 64, 64), (4, 3, 64, 64)]
    paths = [conch_reference / "images" / n for n in json.loads((conch_reference / "images.json").read_text())]
    got = encoder.encode_images(paths + paths[:1])  # 6 images: a batch of 4 and one of 2, padded
    assert shapes[2:] == [(4, 3, 64, 64)] * 2
    np.testing.assert_allclose(got, tiny_encoder.encode_images(paths + paths[:1]), atol=1e-5)
    one = encoder.encode_images(paths[:1])  # a query: the batch-of-one graph, no padding to 4
    assert shapes[4:] == [(1, 3, 64, 64)]
    np.testing.assert_allclose(one, got[:1], atol=1e-5)


def test_text_trim_length_comes_from_the_host_tokens(tiny_encoder, monkeypatch):
    import torch

    texts = ["necrosis", "normal colonic mucosa"]
    tokens = tiny_encoder.tokenizer(texts)
    with torch.inference_mode():
        want = tiny_encoder.model.encode_text(tokens, trim=False).numpy()
    lengths = []
    real = tiny_encoder.model.encode_text

    def encode_text(tokens, normalize=True, trim=True, length=None):
        lengths.append(length)
        return real(tokens, normalize=normalize, trim=trim, length=length)

    monkeypatch.setattr(tiny_encoder.model, "encode_text", encode_text)
    np.testing.assert_allclose(tiny_encoder.encode_texts(texts), want, atol=1e-5)
    assert lengths == [tiny_encoder.model.text.trimmed_length(tokens)]
    assert 1 < lengths[0] < tokens.shape[1] - 1


def test_device_resize_matches_pil_on_the_conformance_images(tiny_encoder, conch_reference):
    """The resize done on the device after nvJPEG (torch, antialiased bicubic) against PIL, the reference."""
    import torch

    names = json.loads((conch_reference / "images.json").read_text())
    images = [Image.open(conch_reference / "images" / n).convert("RGB") for n in names]
    pil = np.stack([tiny_encoder.preprocess.resize_crop(im) for im in images])
    device = np.stack(
        [tiny_encoder.preprocess.resize_crop_tensor(torch.from_numpy(np.array(im))).numpy() for im in images]
    )
    diff = np.abs(pil.astype(int) - device.astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 12
    cosine = (tiny_encoder.encode_uint8(pil) * tiny_encoder.encode_uint8(device)).sum(1)
    assert cosine.min() >= 0.9999


def test_a_numbered_gpu_is_made_current(monkeypatch):
    import torch

    from search.conch.encoder import make_current

    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    for device in ("cpu", "cuda", "cuda:1"):
        make_current(torch.device(device))
    assert current == [torch.device("cuda", 1)]
