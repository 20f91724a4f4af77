"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis, a bounded number of
examples per route) against `recsys serve` over real HTTP with Redis: never a 5xx, every
error a 4xx with a message."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from data.synthetic import SyntheticConfig, generate
from features.sources import resolve_source
from recsys.pipeline import build
from recsys.processes import served
from training.config import TrainConfig

pytestmark = pytest.mark.slow  # builds models or runs the service: `make test` only


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, redis_server_url):
    root = tmp_path_factory.mktemp("fuzz")
    generate(root / "data", SyntheticConfig(rows=5_000, users=120, items=80, clusters=3, seed=6))
    build(resolve_source(root / "data"), root / "artifacts", config=TrainConfig(max_epochs=1))
    env = {"REDIS_URL": f"{redis_server_url}/14", "RECSYS_ADMIN_API_KEY": "fuzz-admin"}
    with served(root / "artifacts", env=env) as base:
        yield base


def test_no_input_makes_the_service_fail(base_url):
    """Each route with its own generated inputs (schemathesis' Hypothesis strategies; its
    pytest plugin does not load under pytest 9, the strategies need no plugin)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    routes = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        routes += 1

        @settings(
            max_examples=30,
            deadline=None,
            derandomize=True,  # the same examples on every run: CI cannot flicker
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(case=operation.as_strategy())
        def answers_without_failing(case) -> None:
            response = case.call(base_url=base_url, timeout=30)
            assert response.status_code < 500, (case.method, case.formatted_path, response.text)
            if response.status_code >= 400:
                assert response.json().get("detail"), response.text

        answers_without_failing()
    assert routes >= 8  # every route of the schema was exercised
