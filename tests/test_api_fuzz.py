"""The whole API fuzzed from its own OpenAPI schema (schemathesis): no 500s, every error in the documented shape.

Bounded for CI: a few dozen generated requests per operation against one small real index.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from search.core.settings import load_settings
from search.engine.engine import Engine
from tests.index_fixture import build_index
from webui.app import create_app

EXAMPLES_PER_OPERATION = 25


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory, tiny_encoder, tiny_checkpoint, tokenizer_path):
    root = tmp_path_factory.mktemp("fuzz")
    settings = load_settings(
        data_dir=root / "data", cache_dir=root / "cache", model="conch_tiny", checkpoint=tiny_checkpoint,
        tokenizer=tokenizer_path, device="cpu", workers=1, batch_size=8, tile_size=64,
        allowed_hosts=["localhost", "testserver"],
    )  # fmt: skip
    indexed = build_index(settings, tiny_encoder, root / "tiles")
    return create_app(settings, Engine(settings, store=indexed.store, encoder=tiny_encoder))


@pytest.fixture(scope="module")
def api_schema(fuzzed_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_answers_every_generated_request_in_its_documented_shape(case):
    # Every check but "schema-valid data is accepted": the schema cannot say that q and image exclude each
    # other or which tile ids exist, so a 400 or 404 to such a request is the right answer, in its shape.
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
