"""The HTTP API fuzzed from its own OpenAPI schema (Schemathesis, property-based):
generated requests, valid and invalid, against the app in-process (ASGI) over a real
store, the real retriever and the real captioner (tiny models). No answer may be a
5xx, and every answer must match the schema (documented status, body schema, content
type)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from repic_ray.serving.api import ApiConfig, LocalBackend, build_app
from repic_ray.serving.captioner import CaptionerConfig, HFCaptioner
from repic_ray.serving.retriever import ConceptRetriever, RetrieverConfig
from repic_ray.serving.store import ConceptStore, StoreConfig
from repic_ray.serving.uploads import LimitsConfig
from tests.repic_ray.serving.test_api import png


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, tiny_retriever_models):
    retriever = ConceptRetriever(RetrieverConfig(box_threshold=0.0), *tiny_retriever_models)
    captioner = HFCaptioner(CaptionerConfig(max_new_tokens=2, model_version="tiny-fuzz"))
    store = ConceptStore(StoreConfig(root=str(tmp_path_factory.mktemp("fuzz-store"))))
    store.create_user("root", is_admin=True)
    store.create_user("alice")
    alice = store.add_concept(store.get_user("alice").id, "Bo", "dog", "", [png("red")])
    assert alice.name == "Bo"
    limits = LimitsConfig(max_upload_bytes=100_000, max_pixels=256 * 256, max_concepts_per_user=5)
    app = build_app(store, LocalBackend(retriever, captioner), ApiConfig(limits=limits))
    return app, {"X-API-Key": store.create_api_key("root")}


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def test_no_server_errors_and_answers_match_the_schema(fuzzed):
    app, admin = fuzzed
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.call_and_validate(headers=admin, checks=CHECKS)

        fuzz()
