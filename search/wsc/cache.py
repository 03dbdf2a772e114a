"""Loading WSC weights: the safe reader once, then a cache of safetensors + JSON config keyed by the zip's sha256.

``load_wsc`` reads a local ``WSC-MTL-tiny.pt.zip`` (never a URL: the file is fetched by the user, who accepts
its licence). Default path: :mod:`search.wsc.pickles` (nothing in the file runs) -> mmm classes rebuilt ->
cache under ``cache_dir/wsc/<sha256>/``. With ``trusted_sha256`` set and equal to the file's digest, mmm's own
loader unpickles it instead (it runs code from the file: only for a file the user vouches for).

The cache records the mmm version it was built with; a cache from another version is an error, never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from search.core.errors import CheckpointError, ConfigError, ModelUnavailable
from search.wsc.model import MMM_VERSION, WscModel, check_licence, check_mmm_version
from search.wsc.pickles import MODULE_NAMES, ModuleRecord, read_archive

CACHE_FORMAT = 1
WEIGHTS_HINT = (
    "download WSC-MTL-tiny.pt.zip from the Hugging Face repo FraunhoferMEVIS/WholeSlideConcepts (read its licence "
    "first) and set HISTOSEARCH_WSC_WEIGHTS to its local path"
)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_path(cache_dir: Path, digest: str) -> Path:
    return cache_dir / "wsc" / digest


def write_cache(records: dict[str, ModuleRecord], digest: str, source: str, cache_dir: Path) -> Path:
    """Atomically publish the recovered modules as ``<name>.safetensors`` + ``config.json``."""
    target = cache_path(cache_dir, digest)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=target.parent))
    try:
        config = {
            "format": CACHE_FORMAT,
            "zip_sha256": digest,
            "source": source,
            "mmm_version": MMM_VERSION,
            "modules": {n: {"class": r.class_path, "attributes": r.attributes} for n, r in records.items()},
        }
        for name, record in records.items():
            save_file({k: v.contiguous() for k, v in record.state_dict.items()}, str(staging / f"{name}.safetensors"))
        (staging / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_cache(path: Path) -> dict[str, ModuleRecord]:
    config = json.loads((path / "config.json").read_text())
    if config.get("format") != CACHE_FORMAT:
        raise ConfigError(f"{path}: WSC cache format {config.get('format')}, expected {CACHE_FORMAT}: delete it")
    if config.get("mmm_version") != MMM_VERSION:
        raise ConfigError(
            f"{path}: WSC cache built with mmm {config.get('mmm_version')}, this histosearch reads it with "
            f"{MMM_VERSION}: delete the folder to rebuild it from the zip"
        )
    return {
        name: ModuleRecord(name, m["class"], m["attributes"], load_file(str(path / f"{name}.safetensors")))
        for name, m in ((n, config["modules"][n]) for n in MODULE_NAMES)
    }


def _local(weights: str | Path) -> Path:
    if "://" in str(weights):
        raise ConfigError(f"wsc_weights={weights}: a local file path is required, not a URL")
    return Path(weights)


def load_records(weights: str | Path, cache_dir: Path) -> tuple[dict[str, ModuleRecord], str, bool]:
    """The modules' records (from the cache, else read safely), the zip's sha256, and whether they were cached."""
    weights = _local(weights)
    if not weights.is_file():
        raise ModelUnavailable(f"{weights}: no such WSC weights file: {WEIGHTS_HINT}")
    data = weights.read_bytes()
    digest = sha256_bytes(data)
    cached = cache_path(cache_dir, digest)
    if (cached / "config.json").is_file():
        return read_cache(cached), digest, True
    return read_archive(data, label=weights.name), digest, False


def load_wsc(weights: str | Path, cache_dir: Path, trusted_sha256: str | None = None, device: str = "cpu"
             ) -> tuple[WscModel, str]:  # fmt: skip
    """The WSC model and the sha256 of its weights file."""
    check_licence()
    check_mmm_version()
    weights = _local(weights)
    if trusted_sha256 is not None:
        if not weights.is_file():
            raise ConfigError(f"wsc_trusted_sha256 needs wsc_weights to be a local file; {weights} is not")
        digest = sha256_bytes(weights.read_bytes())
        if digest != trusted_sha256.lower():
            raise CheckpointError(
                f"{weights}: sha256 {digest} is not the trusted {trusted_sha256}: refusing to unpickle it with mmm's "
                f"loader (unset wsc_trusted_sha256 to use the safe reader)"
            )
        return WscModel.from_trusted_zip(weights, device), digest
    records, digest, was_cached = load_records(weights, cache_dir)
    model = WscModel.from_records(records, weights.name, device)
    if not was_cached:  # only what mmm rebuilt strictly is cached
        write_cache(records, digest, weights.name, cache_dir)
    return model, digest
