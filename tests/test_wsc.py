"""WSC weights: the safe reader on the real zip layout, refusal of code in pickles, licence and version gates.

No WSC weights and no mmm are needed: the fixture zip holds throwaway modules pickled under ``mmm.*`` names
(registered only while pickling). With the ``[wsc]`` extra installed and its licence accepted in the
environment, a small model of mmm's real classes round-trips bit-exactly through the safe path vs mmm's loader.
"""

from __future__ import annotations

import enum
import io
import json
import os
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import BaseModel
from torch import nn

from search.core.errors import CheckpointError, ConfigError, ModelUnavailable
from search.wsc import cache as wsc_cache
from search.wsc import model as wsc_model
from search.wsc.bag import BagParams, attention_per_tile, bag_from_tiles, crops_per_side, sample_crops
from search.wsc.pickles import read_archive
from tests.wsc_fixture import mmm_ready, real_tiny_zip


class Act(str, enum.Enum):
    gelu = "gelu"
    relu = "relu"


class ActCfg(BaseModel):
    fn: Act = Act.gelu


class FakeEncoder(nn.Module):
    class Config(BaseModel):
        width: int = 4
        act: ActCfg = ActCfg()
        strides: tuple[int, int] = (1, 2)
        channels: dict[int, int] = {}

    def __init__(self, args: Config) -> None:
        super().__init__()
        self.args = args
        self.conv = nn.Conv2d(3, args.width, 3)
        self.norm = nn.BatchNorm2d(args.width)
        self.register_buffer("scratch", torch.ones(2), persistent=False)


class FakeSqueezer(nn.Module):
    def __init__(self, args: ActCfg, enc_out_channels: list[int]) -> None:
        super().__init__()
        self.args = args
        self.enc_out_channels = enc_out_channels
        self.proj = nn.Linear(enc_out_channels[-1], 6)


class FakeGrouper(nn.Module):
    def __init__(self, args: ActCfg, embedding_dim: int) -> None:
        super().__init__()
        self.args = args
        self.embedding_dim = embedding_dim
        self.layers = nn.ModuleList([nn.LayerNorm(embedding_dim), nn.Linear(embedding_dim, embedding_dim)])


_FAKE_MODULE = "mmm.fake_blocks"


def _pickled(obj: object, classes: list[type]) -> bytes:
    """``torch.save`` bytes of obj, its classes registered as mmm.fake_blocks.* only while pickling."""
    fake = types.ModuleType(_FAKE_MODULE)
    saved = {name: sys.modules.get(name) for name in ("mmm", _FAKE_MODULE)}
    originals = {cls: cls.__module__ for cls in classes}
    sys.modules["mmm"] = sys.modules.get("mmm") or types.ModuleType("mmm")
    sys.modules[_FAKE_MODULE] = fake
    try:
        for cls in classes:
            cls.__module__ = _FAKE_MODULE
            if "." not in cls.__qualname__:
                setattr(fake, cls.__qualname__, cls)
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()
    finally:
        for cls, module in originals.items():
            cls.__module__ = module
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


_ALL = [FakeEncoder, FakeEncoder.Config, ActCfg, Act, FakeSqueezer, FakeGrouper]


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


@pytest.fixture(scope="module")
def fake_modules() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    encoder = FakeEncoder(FakeEncoder.Config(width=5, act=ActCfg(fn=Act.relu), channels={2: 7}))
    encoder.norm.running_mean.uniform_()
    return {"encoder": encoder, "squeezer": FakeSqueezer(ActCfg(), [3, 5]), "grouper": FakeGrouper(ActCfg(), 6)}


@pytest.fixture(scope="module")
def fake_zip(fake_modules) -> bytes:
    return _zip({f"{name}.pt": _pickled(module, _ALL) for name, module in fake_modules.items()})


def test_safe_reader_recovers_classes_configs_and_state_dicts(fake_zip, fake_modules):
    records = read_archive(fake_zip, "WSC-fixture.pt.zip")
    assert set(records) == {"encoder", "squeezer", "grouper"}
    assert records["encoder"].class_path == "mmm.fake_blocks.FakeEncoder"
    for name, module in fake_modules.items():
        expected = module.state_dict()
        got = records[name].state_dict
        assert list(got) == list(expected)
        assert all(torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype for k in expected)
    assert "scratch" not in records["encoder"].state_dict  # non-persistent buffers are not weights
    args = records["encoder"].attributes["args"]
    assert args["__model__"] == "mmm.fake_blocks" and args["qualname"] == "FakeEncoder.Config"
    fields = args["fields"]
    assert fields["width"] == 5
    assert fields["strides"] == {"__tuple__": [1, 2]}
    assert fields["channels"] == {"__mapping__": [[2, 7]]}
    assert fields["act"]["fields"]["fn"] == {"__call__": "mmm.fake_blocks", "qualname": "Act", "args": ["relu"]}
    assert records["squeezer"].attributes["enc_out_channels"] == [3, 5]
    assert records["grouper"].attributes["embedding_dim"] == 6
    json.dumps({n: r.attributes for n, r in records.items()})  # the config is plain JSON


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_os_system_payload_is_refused_and_never_runs(tmp_path, fake_modules):
    marker = tmp_path / "pwned"
    evil = FakeGrouper(ActCfg(), 6)
    evil.note = _Payload(marker)  # hidden in an attribute of an otherwise normal module
    data = _zip({"encoder.pt": _pickled(fake_modules["encoder"], _ALL), "squeezer.pt": _pickled(evil, _ALL),
                 "grouper.pt": _pickled(fake_modules["grouper"], _ALL)})  # fmt: skip
    with pytest.raises(CheckpointError, match=r"squeezer\.pt: refused: refused global posix\.system"):
        read_archive(data, "evil.pt.zip")
    assert not marker.exists()


def _raw_torch_zip(pickle_bytes: bytes) -> bytes:
    return _zip({"archive/data.pkl": pickle_bytes, "archive/byteorder": b"little"})


@pytest.mark.parametrize(
    "payload, message",
    [
        # builtins.eval through a plain GLOBAL
        (b"cbuiltins\neval\n(V__import__('os').system('touch MARKER')\ntR.", "refused global builtins.eval"),
        # getattr is only answered for accepted classes, so it cannot reach os through a real object
        (b"c__builtin__\ngetattr\n(ccollections\nOrderedDict\nV__init__\ntR.", "getattr on"),
        # a name under an accepted prefix is an inert stub: calling "os.system" there only records
        (b"ctorch.nn.modules.module\nos.system\n(Vtouch MARKER\ntR.", "does not hold a pickled module"),
    ],
)
def test_other_code_paths_are_refused(tmp_path, payload, message):
    marker = tmp_path / "pwned"
    payload = payload.replace(b"MARKER", str(marker).encode())
    data = _zip({"encoder.pt": _raw_torch_zip(payload)})
    with pytest.raises(CheckpointError, match=message):
        read_archive(data, "evil.pt.zip")
    assert not marker.exists()


def test_reader_names_a_missing_module_and_a_non_zip(fake_zip):
    with zipfile.ZipFile(io.BytesIO(fake_zip)) as z:
        partial = _zip({n: z.read(n) for n in ("encoder.pt", "squeezer.pt")})
    with pytest.raises(CheckpointError, match=r"WSC\.pt\.zip: no grouper\.pt in the archive"):
        read_archive(partial, "WSC.pt.zip")
    with pytest.raises(CheckpointError, match="not a zip file"):
        read_archive(b"not a zip", "x.pt.zip")
    with pytest.raises(CheckpointError, match=r"encoder\.pt: expected one data\.pkl"):
        read_archive(_zip({"encoder.pt": _zip({"a": b""})}), "y.pt.zip")


def test_cache_round_trips_records(tmp_path, fake_zip):
    records = read_archive(fake_zip)
    path = wsc_cache.write_cache(records, "ab" * 32, "fixture.pt.zip", tmp_path)
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "encoder.safetensors", "grouper.safetensors", "squeezer.safetensors"]  # fmt: skip
    back = wsc_cache.read_cache(path)
    for name, record in records.items():
        assert back[name].attributes == record.attributes
        assert all(torch.equal(back[name].state_dict[k], v) for k, v in record.state_dict.items())
    config = json.loads((path / "config.json").read_text())
    config["mmm_version"] = "1.5.0"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="built with mmm 1.5.0"):
        wsc_cache.read_cache(path)


def test_load_records_reads_the_zip_then_the_cache(tmp_path, fake_zip):
    weights = tmp_path / "WSC-MTL-tiny.pt.zip"
    weights.write_bytes(fake_zip)
    records, digest, cached = wsc_cache.load_records(weights, tmp_path / "cache")
    assert (digest, cached) == (wsc_cache.sha256_bytes(fake_zip), False)
    wsc_cache.write_cache(records, digest, weights.name, tmp_path / "cache")
    assert wsc_cache.load_records(weights, tmp_path / "cache")[2] is True
    with pytest.raises(ModelUnavailable, match="no such WSC weights file"):
        wsc_cache.load_records(tmp_path / "missing.pt.zip", tmp_path / "cache")
    with pytest.raises(ConfigError, match="local file path is required"):
        wsc_cache.load_records("https://huggingface.co/x.pt.zip", tmp_path / "cache")


def test_licence_gate_names_the_licence_and_sets_nothing(monkeypatch):
    monkeypatch.delenv(wsc_model.LICENCE_ENV, raising=False)
    with pytest.raises(ModelUnavailable, match="non-commercial research only.*never sets it"):
        wsc_model.check_licence()
    assert wsc_model.LICENCE_ENV not in os.environ
    monkeypatch.setenv(wsc_model.LICENCE_ENV, "I Accept")
    wsc_model.check_licence()


def test_version_mismatch_and_missing_extra_fail_loudly(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.6.2")
    with pytest.raises(ConfigError, match=r"medicalmultitaskmodeling 1\.6\.2 is installed.*1\.6\.3"):
        wsc_model.check_mmm_version()

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(ModelUnavailable, match=r"histosearch\[wsc\]"):
        wsc_model.check_mmm_version()


def test_trusted_loader_requires_the_matching_sha256(tmp_path, fake_zip, monkeypatch):
    monkeypatch.setenv(wsc_model.LICENCE_ENV, "i accept")
    monkeypatch.setattr(wsc_cache, "check_mmm_version", lambda: wsc_model.MMM_VERSION)
    weights = tmp_path / "w.pt.zip"
    weights.write_bytes(fake_zip)
    with pytest.raises(CheckpointError, match="is not the trusted"):
        wsc_cache.load_wsc(weights, tmp_path, trusted_sha256="0" * 64)


def test_bag_is_224_crops_in_unit_range_at_the_set_scale():
    rng = np.random.default_rng(1)
    tiles = [Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)) for _ in range(3)]
    assert crops_per_side(448, 0.5, 0.5) == 2 and crops_per_side(448, 0.25, 0.5) == 1
    assert crops_per_side(100, None, 0.5) == 1
    bag, source = bag_from_tiles(tiles, [0.5] * 3, BagParams(mpp=0.5, max_tiles=100))
    assert bag.shape == (12, 3, 224, 224) and bag.dtype == torch.float32
    assert float(bag.min()) >= 0 and float(bag.max()) <= 1
    assert source.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # crop 3 of tile 1 is its bottom-right quarter, unscaled
    expected = np.asarray(tiles[1])[224:, 224:].transpose(2, 0, 1) / 255.0
    assert np.allclose(bag[7].numpy(), expected, atol=1e-6)


def test_bag_cap_is_a_seeded_reproducible_sample():
    params = BagParams(max_tiles=5, seed=3)
    first = sample_crops([2, 2, 2], params)
    assert len(first) == 5 and first == sorted(first) and first == sample_crops([2, 2, 2], params)
    assert sample_crops([2, 2, 2], BagParams(max_tiles=5, seed=4)) != first
    assert len(sample_crops([1, 1], params)) == 2


def test_attention_maps_back_to_tiles():
    per_tile = attention_per_tile(torch.tensor([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 2, 2]), 3)
    assert per_tile.tolist() == pytest.approx([0.3, 0.0, 0.7])


def test_tile_attention_reduces_query_key_attention_per_tile():
    attn = torch.rand(1, 4, 5, 5)
    got = wsc_model.tile_attention(attn, 5)
    manual = attn[0].sum(dim=1).mean(dim=0)
    assert torch.allclose(got, manual / manual.sum())
    assert torch.allclose(wsc_model.tile_attention(torch.ones(5, 3), 5), torch.full((5,), 0.2))
    with pytest.raises(ValueError, match="unexpected attention shape"):
        wsc_model.tile_attention(torch.ones(4, 3), 5)


@pytest.mark.skipif(mmm_ready() is not None, reason=str(mmm_ready()))
def test_real_classes_round_trip_bit_exactly_vs_mmm_loader(tmp_path):
    weights = tmp_path / "tiny.pt.zip"
    real_tiny_zip(weights)
    safe, digest = wsc_cache.load_wsc(weights, tmp_path / "cache")
    assert (tmp_path / "cache" / "wsc" / digest / "config.json").is_file()
    cached, _ = wsc_cache.load_wsc(weights, tmp_path / "cache")
    trusted, _ = wsc_cache.load_wsc(weights, tmp_path / "cache", trusted_sha256=digest)
    for name in ("encoder", "squeezer", "grouper"):
        a, b = safe.modules[name].state_dict(), trusted.modules[name].state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert type(safe.modules[name]) is type(trusted.modules[name])
    bag = torch.rand(7, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    outs = [m.embed_bag(bag) for m in (safe, cached, trusted)]
    assert outs[0].vector.shape == (48,) and outs[0].attention.shape == (7,)
    for other in outs[1:]:
        assert torch.equal(outs[0].vector, other.vector) and torch.equal(outs[0].attention, other.attention)
    assert float(outs[0].attention.sum()) == pytest.approx(1.0)


@pytest.mark.skipif(mmm_ready() is not None, reason=str(mmm_ready()))
def test_rebuild_refuses_tensors_that_do_not_fit(tmp_path):
    weights = tmp_path / "tiny.pt.zip"
    real_tiny_zip(weights)
    records, _, _ = wsc_cache.load_records(weights, tmp_path)
    records["squeezer"].state_dict.pop("conv.bias")
    with pytest.raises(CheckpointError, match=r"squeezer\.pt: the tensors do not fit mmm 1\.6\.3's Squeezer.*conv\.bi"):
        wsc_model.WscModel.from_records(records, "tiny.pt.zip")
    records["squeezer"].attributes["args"]["fields"]["bogus"] = 1
    with pytest.raises(ConfigError, match="does not fit mmm 1.6.3"):
        wsc_model.WscModel.from_records(records, "tiny.pt.zip")


@pytest.fixture
def fake_mmm(monkeypatch):
    """The throwaway classes importable as mmm.fake_blocks, standing in for mmm's own modules."""
    module = types.ModuleType(_FAKE_MODULE)
    for cls in (FakeEncoder, ActCfg, Act, FakeSqueezer, FakeGrouper):
        setattr(module, cls.__qualname__, cls)
    monkeypatch.setitem(sys.modules, _FAKE_MODULE, module)
    return module


def test_rebuild_from_recovered_records_is_exact(fake_zip, fake_modules, fake_mmm):
    records = read_archive(fake_zip)
    for name, original in fake_modules.items():
        record = records[name]
        rebuilt = wsc_model.build_module(record.class_path, record.attributes, record.state_dict, f"{name}.pt")
        assert type(rebuilt) is type(original) and not rebuilt.training
        assert rebuilt.args == original.args  # nested configs, enums, tuples, int-keyed dicts come back equal
        a, b = rebuilt.state_dict(), original.state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert records["encoder"].attributes["args"]["fields"]["act"]["fields"]["fn"]["args"] == ["relu"]


def test_rebuild_names_what_does_not_fit(fake_zip, fake_mmm):
    record = read_archive(fake_zip)["squeezer"]
    with pytest.raises(ConfigError, match="needs 'enc_out_channels'"):
        wsc_model.build_module(record.class_path, {"args": record.attributes["args"]}, record.state_dict, "sq.pt")
    with pytest.raises(CheckpointError, match=r"sq\.pt: the tensors do not fit.*proj\.bias"):
        wsc_model.build_module(record.class_path, record.attributes, {"proj.weight": record.state_dict["proj.weight"]},
                               "sq.pt")  # fmt: skip
    with pytest.raises(ConfigError, match=r"mmm\.fake_blocks\.Gone does not exist in mmm 1\.6\.3"):
        wsc_model.build_module("mmm.fake_blocks.Gone", {}, {}, "x.pt")
    with pytest.raises(CheckpointError, match="only mmm classes are rebuilt"):
        wsc_model.build_module("torch.nn.modules.linear.Linear", {}, {}, "x.pt")
    with pytest.raises(CheckpointError, match="is not a torch module"):
        wsc_model.build_module("mmm.fake_blocks.ActCfg", {}, {}, "x.pt")
    bad = json.loads(json.dumps(record.attributes))
    bad["args"]["fields"]["fn"] = "swish"
    with pytest.raises(ConfigError, match="the saved ActCfg does not fit mmm 1.6.3"):
        wsc_model.build_module(record.class_path, bad, record.state_dict, "sq.pt")
    with pytest.raises(CheckpointError, match="is not an enum"):
        wsc_model.from_json({"__call__": _FAKE_MODULE, "qualname": "ActCfg", "args": []}, "x")


@pytest.mark.skipif(mmm_ready() is not None, reason=str(mmm_ready()))
def test_trusted_loader_refuses_what_mmm_would_skip(tmp_path):
    weights = tmp_path / "tiny.pt.zip"
    real_tiny_zip(weights)
    with zipfile.ZipFile(weights) as z:
        partial = _zip({n: z.read(n) for n in ("encoder.pt", "squeezer.pt")})
    (tmp_path / "partial.pt.zip").write_bytes(partial)
    digest = wsc_cache.sha256_bytes(partial)
    with pytest.raises(CheckpointError, match="did not load grouper"):
        wsc_cache.load_wsc(tmp_path / "partial.pt.zip", tmp_path, trusted_sha256=digest)
    (tmp_path / "renamed.zip").write_bytes(partial)
    with pytest.raises(ConfigError, match=r"only files named \*\.pt\.zip"):
        wsc_cache.load_wsc(tmp_path / "renamed.zip", tmp_path, trusted_sha256=digest)
