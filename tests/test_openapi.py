"""The router's OpenAPI document describes what it takes and answers (issue 11): request bodies
from the pydantic models, every status a route gives, in the OpenAI error shape. schemathesis
generates requests from the served /openapi.json (valid and invalid bodies, bounded examples)
against a real colocated cluster and checks each answer: no 5xx, a documented status and content
type, a body that matches the documented schema."""
from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from cluster import Cluster
from engine.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=12)
    # a short context keeps every generated completion short on the CPU
    with Cluster(model_dir, colocated=True, num_pages=256, page_size=4, router_args=("--max-model-len", "48"),
                 log_dir=tmp_path_factory.mktemp("logs")) as c:
        yield c


SEEN: Counter = Counter()      # status classes the generated requests got


@pytest.fixture(scope="module")
def api_schema(cluster):
    config = SchemathesisConfig.from_str('[generation]\nmode = "all"\n')   # valid and invalid bodies
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{cluster.http_port}/openapi.json", config=config)


def test_bodies_and_statuses_are_documented(cluster):
    doc = httpx.get(f"http://127.0.0.1:{cluster.http_port}/openapi.json", timeout=30).json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        op = doc["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        body = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert {"model", "max_tokens", "stream", "temperature"} <= set(body["properties"])
        assert body["additionalProperties"] is True           # unknown fields: ignored with a warning
        assert {"200", "400", "404", "413", "503"} <= set(op["responses"])
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_answer_matches_the_schema(case):
    r = case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                       response_schema_conformance], timeout=60)
    SEEN[(case.operation.label, r.status_code // 100)] += 1


def test_the_generated_requests_were_both_accepted_and_rejected():
    for op in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert SEEN[(op, 2)] >= 1 and SEEN[(op, 4)] >= 1, SEEN
    assert not any(cls == 5 for _, cls in SEEN), SEEN
