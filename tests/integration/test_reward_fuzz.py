"""Fuzz the reward server's HTTP API with schemathesis, from the app's own OpenAPI document, against the real
app under uvicorn: generated requests (valid and invalid bodies) must never get a 5xx, and every response
must match the status codes and schemas the document declares. The server is a real `orz reward-server` process.

Driven through schemathesis' Python API and hypothesis directly (its pytest plugin does not load under
this pytest version)."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from services.config import RewardConfig
from tests.integration.test_reward_server import running_server


def _fuzzer(operation, excluded: list, calls: dict):
    @given(case=operation.as_strategy())
    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case) -> None:
        calls["n"] += 1
        case.call_and_validate(excluded_checks=excluded)

    return fuzz


def test_api_conforms_and_never_5xx() -> None:
    cfg = RewardConfig(grader_procs=2, grade_timeout_s=1.0, max_items=16, max_response_chars=5_000,
                       max_reference_chars=200)
    with running_server(cfg) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {(op.method.upper(), op.path) for op in operations} >= {
            ("POST", "/v1/grade"), ("POST", "/v1/openrlhf"), ("GET", "/healthz"), ("GET", "/metrics")}
        calls = {"n": 0}
        for operation in operations:
            # /v1/openrlhf has two rules across fields that OpenAPI cannot state (query, prompts and labels of
            # one length; each query containing its prompt): a schema-valid body may rightly get 422 there.
            # Every other check (no 5xx, declared statuses and schemas) holds for it as for the rest.
            excluded = [positive_data_acceptance] if operation.path == "/v1/openrlhf" else []
            _fuzzer(operation, excluded, calls)()
        assert calls["n"] >= 140  # the two POSTs get the examples; the parameterless GETs one each
