"""One typed settings object shared by the CLI, the indexer and the web UI.

Values come from, highest first: explicit keyword arguments (CLI options), ``HISTOSEARCH_*``
environment variables, a TOML file named by ``HISTOSEARCH_CONFIG_FILE``, then the defaults.
Bad values fail when the object is built, i.e. at start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from search.core.errors import ConfigError

DEFAULT_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "histosearch"
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "histosearch"

# The CONCH tokenizer is CC-BY-NC-ND material of its authors: it is fetched, never shipped.
CONCH_TOKENIZER_URL = (
    "https://raw.githubusercontent.com/mahmoodlab/CONCH/"
    "e9c9e5b7910d88adf14db77a2108286b7eacc652/"
    "conch/open_clip_custom/tokenizers/conch_byte_level_bpe_uncased.json"
)
CONCH_TOKENIZER_SHA256 = "a3861e67c64d32670eb6725a8e52d7dbdd2a06646a4a3c7463052ae7110760fb"

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
MIN_TOKEN_CHARS = 16


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HISTOSEARCH_", extra="forbid", validate_default=True)

    # Where the index lives: SQLite database, embeddings, FAISS indexes (docs/index-format.md).
    data_dir: Path = DEFAULT_DATA_DIR
    # Downloaded weights and tokenizer.
    cache_dir: Path = DEFAULT_CACHE_DIR
    # The database, as an SQLAlchemy URL: None is the embedded SQLite file in data_dir; a shared lab deployment
    # names a Postgres server (postgresql+psycopg://user@host/db, the `postgres` extra). The FAISS builds stay
    # in data_dir either way, so every machine that serves or indexes must see the same data_dir.
    database_url: str | None = None

    # Model: a config name (search/conch/model_configs) or a JSON file.
    model: str = "conch_ViT-B-16"
    checkpoint: Path | None = None
    tokenizer: Path | None = None
    device: str = "auto"
    # auto: bf16 autocast on a GPU, fp32 on a CPU.
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # auto: 256 images per batch on a GPU, 32 on a CPU.
    batch_size: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = "auto"
    # torch.compile the image tower (compiled at start, one graph: short batches are padded). Meant for GPUs.
    compile: bool = False
    # Send baseline RGB JPEG tiles undecoded to the encoder, which decodes them in batches on its device (nvJPEG
    # through torchvision on a GPU) and resizes the ones not at the model's size there too; a JPEG it refuses is
    # decoded with PIL. Meant for GPUs; on a CPU it decodes in the main process.
    gpu_decode: bool = False

    # Where weights come from.
    hf_repo: str = "MahmoodLab/CONCH"
    hf_endpoint: str = "https://huggingface.co"
    hf_token: str | None = Field(None, validation_alias=AliasChoices("hf_token", "HISTOSEARCH_HF_TOKEN", "HF_TOKEN"))
    tokenizer_url: str = CONCH_TOKENIZER_URL
    tokenizer_sha256: str = CONCH_TOKENIZER_SHA256

    # Indexing.
    # Decode worker processes; None: one per CPU this process may use, less one, when the model runs on a GPU;
    # none on a CPU, where encoding takes ~100x longer than decoding and workers would only take cores from it.
    workers: int | None = Field(None, ge=0, le=256)
    # Embed on a Ray cluster (the `ray` extra, indexer/ray_embed.py): its address ("auto": the cluster this machine
    # joined with `ray start`; "host:6379" or "ray://host:10001"), or None to embed in this process.
    ray_address: str | None = None
    # Embedding actors on the cluster, each loading the model once; None: one per GPU of the cluster, else one.
    ray_actors: int | None = Field(None, ge=1, le=4096)
    index_type: Literal["auto", "flat", "ivf", "ivfpq", "ivfsq8", "hnsw"] = "auto"
    # Exact search up to here: at 20k x 512 it takes ~2 ms a query on one core, and grows linearly
    # (55 ms at 100k on a busy 2-core machine), where IVF stays near 1 ms at recall@10 ~0.99.
    exact_max: int = Field(20_000, ge=1)
    # auto: IVF-SQ8 (re-ranked on the stored vectors) past this many vectors, where raw float32 IVF lists
    # would take more than ~2 GB of RAM.
    compress_above: int = Field(1_000_000, ge=1)
    # Publishes add to the trained quantiser until the collection is this many times the size it was trained on.
    retrain_growth: float = Field(2.0, gt=1)
    max_image_pixels: int = Field(100_000_000, ge=1)
    tile_size: int = Field(448, ge=16)
    target_mpp: float = Field(0.5, gt=0)
    tissue_min_fraction: float = Field(0.25, ge=0, le=1)
    path_pattern: str = r"(?:(?P<case_id>[^/]+)/)?(?P<slide_id>[^/]+)/[^/]+$"

    # Text queries in several phrasings, averaged (CONCH's zero-shot recipe): ~5x the text-tower cost per query.
    prompt_ensemble: bool = False

    # Whole Slide Concepts slide vectors (docs/slides.md): the [wsc] extra and a local WSC-MTL-tiny.pt.zip.
    wsc_weights: Path | None = None
    # The zip's sha256, to load it with mmm's own loader, which unpickles (runs) it. Off: the safe reader.
    wsc_trusted_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    wsc_mpp: float = Field(0.5, gt=0)
    wsc_max_tiles: int = Field(512, ge=1, le=100_000)
    wsc_seed: int = Field(0, ge=0)

    # Results (issue 10, docs/cli.md "Results").
    # A page says "no confident match" when its best hit's z-score against the build's calibration sample
    # (query vs a fixed random sample of the index) is below this.
    min_confidence: float = Field(3.0, ge=0)
    # Tiles drawn once per build to calibrate scores against.
    calibration_sample: int = Field(1000, ge=10, le=100_000)
    # At most this many results per slide on a page (0: off); adjacent tiles of a slide count once.
    max_per_slide: int = Field(3, ge=0, le=1000)
    # Approximate indexes return this many times the page's candidates, re-ranked by exact cosine.
    rerank_factor: int = Field(4, ge=1, le=100)
    # A build whose recall@10 against exact search is below this is not published.
    min_recall: float = Field(0.9, ge=0, le=1)
    # IVF builds probe the fewest lists whose recall@10 on the recall check reaches this (tuned at full and merge
    # builds, and at an incremental one that falls below it); 0: the index type's default nprobe.
    target_recall: float = Field(0.98, ge=0, le=1)
    # Queries (stored vectors and vocabulary texts) the recall check runs at each build.
    recall_queries: int = Field(200, ge=1, le=10_000)
    # Average an image query over its 8 rotations/flips; None: on when the encoder runs on a GPU.
    query_tta: bool | None = None
    # Uploaded query images kept on disk (by content hash) so permalinks survive a restart; oldest dropped first.
    upload_store_bytes: int = Field(512 * 1024 * 1024, ge=0)
    # Record each query (text or image hash, filters, model, build, time, result count; never image bytes).
    query_log: bool = True
    # A hit whose um/px differs from the query's by more than this factor is flagged as another scale.
    scale_tolerance: float = Field(2.0, gt=1)
    # A CSV (abbreviation,expansion) added to, and overriding, the built-in abbreviations table.
    abbreviations_file: Path | None = None

    # Web UI.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    auth_token: str | None = None
    # Host header values the server answers (DNS rebinding): loopback names, plus `host` when it is one address.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(LOOPBACK_HOSTS))
    # Lifetime of a login session; logging out ends it sooner.
    session_max_age_s: int = Field(7 * 24 * 3600, ge=60)
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1)
    # An upload is one query patch: its own pixel limit, far below max_image_pixels (4096 x 4096; a larger
    # JPEG is decoded at a reduced scale when that fits), and at most max_upload_decodes decoding at once.
    max_upload_pixels: int = Field(4096 * 4096, ge=1)
    max_upload_decodes: int = Field(2, ge=1, le=64)
    max_query_chars: int = Field(500, ge=1)
    max_k: int = Field(500, ge=1)
    # Metadata fields shown on result cards, in order (comma-separated); empty: each tile's first three.
    # The others are on the card's hover, in the quick view and on the tile page.
    card_fields: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("auth_token")
    @classmethod
    def _auth_token(cls, v: str | None) -> str | None:
        # An empty token used to switch authentication off while the page offered "Log out".
        if v is not None and len(v.strip()) < MIN_TOKEN_CHARS:
            raise ValueError(
                f"an access token needs at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 16`); "
                "leave the setting out to serve without one"
            )
        return v

    @field_validator("allowed_hosts", "card_fields", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        return [part.strip() for part in v.split(",") if part.strip()] if isinstance(v, str) else v

    @field_validator("allowed_hosts")
    @classmethod
    def _allowed_hosts(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one host name (the default is the loopback names)")
        for host in v:
            if "*" in host[1:] or (host.startswith("*") and host != "*" and not host.startswith("*.")):
                raise ValueError(f"{host!r}: a wildcard must be '*' or lead a domain, as in '*.example.org'")
            bracketed = host.startswith("[") and host.endswith("]")
            if "/" in host or (":" in host and not bracketed):
                raise ValueError(f"{host!r}: give a host name without scheme, port or path ([::1] for IPv6)")
        return [host.lower() for host in v]

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        # Only the scheme is read here (SQLAlchemy parses the rest when the store opens): settings load before it.
        scheme, sep, _ = v.partition("://")
        if not sep or not scheme:
            raise ValueError("not a database URL; e.g. postgresql+psycopg://user@host/histosearch")
        backend = scheme.split("+")[0]
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"database {backend!r} is not supported; use sqlite:///FILE or postgresql+psycopg://...")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "auto" and not (v == "cpu" or v == "cuda" or v.startswith("cuda:")):
            raise ValueError("device must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v

    @field_validator("wsc_weights", mode="before")
    @classmethod
    def _local_weights(cls, v: object) -> object:
        if isinstance(v, str) and "://" in v:
            raise ValueError("a local file path is required (download the zip yourself), not a URL")
        return v

    @field_validator("abbreviations_file")
    @classmethod
    def _abbreviations_file(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"{v}: no such file")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("HISTOSEARCH_CONFIG_FILE")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "histosearch.db"

    @property
    def db_url(self) -> str:
        """The database in use: ``database_url``, or the SQLite file in ``data_dir``."""
        return self.database_url or f"sqlite:///{self.db_path}"


def load_settings(**overrides: object) -> Settings:
    """Build the settings, turning validation errors into one ConfigError that names each field."""
    config_file = os.environ.get("HISTOSEARCH_CONFIG_FILE")
    if config_file and not Path(config_file).is_file():
        raise ConfigError(f"HISTOSEARCH_CONFIG_FILE={config_file}: no such file")
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"bad settings: {problems}") from None
