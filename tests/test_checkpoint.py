"""Checkpoint loading is strict and loud."""

from __future__ import annotations

import collections

import pytest
import torch
from safetensors.torch import save_file

from search.conch.checkpoint import checkpoint_digest, read_state_dict
from search.conch.model import create_model
from search.core.errors import CheckpointError


def _save(tmp_path, state, name="pytorch_model.bin"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def _encode(model):
    torch.manual_seed(0)
    with torch.inference_mode():
        return model.encode_image(torch.randn(1, 3, 64, 64))


def test_loads_bin_and_safetensors_identically(tmp_path, tiny_state_dict):
    bin_model = create_model("conch_tiny", _save(tmp_path, tiny_state_dict))
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state_dict.items()}, str(st))
    st_model = create_model("conch_tiny", st)
    assert torch.equal(_encode(bin_model), _encode(st_model))


def test_state_dict_wrapper_module_prefix_and_decoder_are_accepted(tmp_path, tiny_state_dict):
    wrapped = {"state_dict": {f"module.{k}": v for k, v in tiny_state_dict.items()}}
    wrapped["state_dict"]["module.text_decoder.ln_final.weight"] = torch.ones(64)
    model = create_model("conch_tiny", _save(tmp_path, wrapped))
    assert torch.equal(_encode(model), _encode(create_model("conch_tiny", _save(tmp_path, tiny_state_dict, "b.bin"))))


def test_missing_tensor_is_named(tmp_path, tiny_state_dict):
    state = dict(tiny_state_dict)
    del state["visual.proj_contrast"]
    with pytest.raises(CheckpointError, match=r"missing tensors: visual\.proj_contrast"):
        create_model("conch_tiny", _save(tmp_path, state))


def test_unexpected_tensor_is_named(tmp_path, tiny_state_dict):
    state = dict(tiny_state_dict, **{"visual.extra_head.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors: visual\.extra_head\.weight"):
        create_model("conch_tiny", _save(tmp_path, state))


def test_wrong_shape_is_named(tmp_path, tiny_state_dict):
    state = dict(tiny_state_dict, **{"text.text_projection": torch.zeros(64, 16)})
    with pytest.raises(CheckpointError, match=r"text\.text_projection \(checkpoint \(64, 16\), model \(64, 32\)\)"):
        create_model("conch_tiny", _save(tmp_path, state))


def test_wrong_config_for_checkpoint_fails_loudly(tmp_path, tiny_state_dict):
    with pytest.raises(CheckpointError, match="shape mismatches"):
        create_model("conch_ViT-B-16", _save(tmp_path, tiny_state_dict))


class Payload:
    """Any pickled Python object: weights_only loading must refuse it."""


def test_pickled_object_checkpoint_is_refused(tmp_path, tiny_state_dict):
    state = collections.OrderedDict(tiny_state_dict)
    path = tmp_path / "evil.bin"
    torch.save({"state_dict": state, "trainer": Payload()}, path)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        read_state_dict(path)


def test_garbage_and_absent_files(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.bin"):
        read_state_dict(junk)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_state_dict(tmp_path / "absent.bin")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(bad_st)


@pytest.mark.parametrize(
    "data",
    [b"hello world", bytes(range(256)) * 4, b"", b"\x80\x02garbage", b"PK\x03\x04junk"],
    ids=["text", "bytes", "empty", "pickle-header", "zip-header"],
)
def test_a_garbage_checkpoint_is_one_clear_error(tmp_path, data):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=f"^{path}: not a readable PyTorch checkpoint"):
        read_state_dict(path)


def test_other_input_size_resizes_position_embedding(tmp_path, tiny_state_dict):
    from dataclasses import replace

    from search.conch.config import get_model_cfg

    cfg = get_model_cfg("conch_tiny")
    cfg = replace(cfg, vision_cfg=replace(cfg.vision_cfg, image_size=96))
    model = create_model(cfg, _save(tmp_path, tiny_state_dict))
    assert model.visual.trunk.pos_embed.shape == (1, 1 + 6 * 6, 64)
    # The class-token slot is kept as is.
    assert torch.equal(model.visual.trunk.pos_embed[0, 0], tiny_state_dict["visual.trunk.pos_embed"][0, 0])


def test_digest_is_cached(tmp_path, tiny_state_dict):
    path = _save(tmp_path, tiny_state_dict)
    first = checkpoint_digest(path, tmp_path / "cache")
    assert (tmp_path / "cache" / "checkpoint_digests.json").is_file()
    assert checkpoint_digest(path, tmp_path / "cache") == first
    torch.save({**tiny_state_dict, "logit_scale": torch.tensor(1.0)}, path)
    assert checkpoint_digest(path, tmp_path / "cache") != first
