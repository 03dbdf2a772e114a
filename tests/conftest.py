"""Shared fixtures: the CONCH reference folder, synthetic checkpoints, tiny-model settings, and (from
store_fixture.py) a fresh store."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

pytest_plugins = ["tests.store_fixture"]

REFERENCE = Path(
    os.environ.get("HISTOSEARCH_CONCH_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "conch_reference")
)


def _reference() -> Path:
    if (REFERENCE / "README.md").is_file():
        return REFERENCE
    if os.environ.get("CI"):
        pytest.fail(f"CI must have the CONCH reference folder at {REFERENCE} (../shared/conch_reference)")
    pytest.skip(f"no CONCH reference folder at {REFERENCE}: set HISTOSEARCH_CONCH_REFERENCE to run model tests")


@pytest.fixture(scope="session")
def conch_reference() -> Path:
    return _reference()


def _synthetic_state_dict(reference: Path, spec: str) -> dict[str, torch.Tensor]:
    spec_obj = importlib.util.spec_from_file_location("conch_synthetic", reference / "synthetic.py")
    module = importlib.util.module_from_spec(spec_obj)
    spec_obj.loader.exec_module(module)
    return module.synthetic_state_dict(json.loads((reference / spec).read_text()))


@pytest.fixture(scope="session")
def tiny_state_dict(conch_reference: Path) -> dict[str, torch.Tensor]:
    return _synthetic_state_dict(conch_reference, "spec_tiny.json")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_state_dict) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "pytorch_model.bin"
    torch.save(tiny_state_dict, path)
    return path


@pytest.fixture(scope="session")
def full_checkpoint(tmp_path_factory, conch_reference: Path) -> Path:
    path = tmp_path_factory.mktemp("ckpt_full") / "pytorch_model.bin"
    torch.save(_synthetic_state_dict(conch_reference, "spec_full.json"), path)
    return path


@pytest.fixture(scope="session")
def tokenizer_path(conch_reference: Path) -> Path:
    return conch_reference / "tokenizer" / "conch_byte_level_bpe_uncased.json"


@pytest.fixture(scope="session")
def tiny_model_args(tiny_checkpoint: Path, tokenizer_path: Path) -> list[str]:
    """The shared model options of a CLI command, for the tiny config with synthetic weights on the CPU."""
    return ["--model-config", "conch_tiny", "--checkpoint", str(tiny_checkpoint), "--tokenizer", str(tokenizer_path),
            "--device", "cpu"]  # fmt: skip


@pytest.fixture
def tiny_settings(tmp_path: Path, tiny_checkpoint: Path, tokenizer_path: Path, monkeypatch):
    """Settings for the tiny CONCH config with synthetic weights, everything under tmp_path."""
    from search.core.settings import load_settings

    for key in list(os.environ):
        if key.startswith("HISTOSEARCH_") and key != "HISTOSEARCH_CONCH_REFERENCE":
            monkeypatch.delenv(key)
    return load_settings(
        data_dir=tmp_path / "data",
        cache_dir=tmp_path / "cache",
        model="conch_tiny",
        checkpoint=tiny_checkpoint,
        tokenizer=tokenizer_path,
        device="cpu",
        workers=1,
        batch_size=8,
        tile_size=64,
        # FastAPI's TestClient sends "Host: testserver"; the default is the loopback names only.
        allowed_hosts=["localhost", "127.0.0.1", "[::1]", "testserver"],
    )


@pytest.fixture(scope="session")
def tiny_encoder(tiny_checkpoint: Path, tokenizer_path: Path, tmp_path_factory):
    from search.conch.encoder import Encoder
    from search.core.settings import load_settings

    settings = load_settings(
        model="conch_tiny",
        checkpoint=tiny_checkpoint,
        tokenizer=tokenizer_path,
        device="cpu",
        cache_dir=tmp_path_factory.mktemp("cache"),
        batch_size=8,
    )
    return Encoder.from_settings(settings)
