"""Rendered cache hits (serving.rendered): a request identical to one just answered from the
cache gets that answer's bytes without routing; every change an answer depends on (a
posted event, a catalogue change, a flush, the entry's age, a missing API key) sends the
request through the full route again."""

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import small_version

from data.synthetic import SyntheticConfig
from serving.app import create_app
from serving.rendered import RenderedAnswers
from serving.settings import ServiceSettings
from training.config import TrainConfig

pytestmark = pytest.mark.slow  # builds a model: `make test` only

ADMIN = "admin-key-for-tests"
ROUTE = "/v1/users/{user}/recommendations"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return small_version(
        tmp_path_factory.mktemp("rendered"),
        SyntheticConfig(rows=6_000, users=150, items=100, clusters=4, seed=5),
        TrainConfig(max_epochs=1),
    )


def _client(artifacts: Path, redis_url: str, **settings: object) -> TestClient:
    options = {"artifacts": artifacts, "redis_url": redis_url, "admin_api_key": ADMIN}
    return TestClient(create_app(ServiceSettings(**{**options, **settings})))


@pytest.fixture
def client(artifacts, redis_url) -> Iterator[TestClient]:
    with _client(artifacts, redis_url, local_cache_seconds=60.0) as test_client:
        yield test_client


class RouteCalls:
    """Counts the requests that reached the route's answer logic."""

    def __init__(self, client: TestClient) -> None:
        self.answers = client.app.state.resources.answers  # type: ignore[attr-defined]
        self.count = 0
        inner = self.answers.user_body

        async def counted(*args, **kwargs):
            self.count += 1
            return await inner(*args, **kwargs)

        self.answers.user_body = counted


def _warm(client: TestClient, url: str) -> bytes:
    """A miss, then a hit (whose bytes are kept): the body the next identical request gets."""
    assert client.get(url).json()["cached"] is False
    second = client.get(url)
    assert second.status_code == 200 and second.json()["cached"] is True
    return second.content


def test_an_identical_request_gets_the_hits_bytes_without_the_route(client):
    url = ROUTE.format(user=3) + "?k=7"
    kept = _warm(client, url)
    calls = RouteCalls(client)
    again = client.get(url)
    assert calls.count == 0 and again.content == kept
    assert again.headers["content-type"] == "application/json"
    assert again.headers["x-model-version"] == again.json()["model_version"]
    client.get(ROUTE.format(user=3) + "?k=8")  # another k is another request
    assert calls.count == 1


def test_rendered_hits_are_counted_under_the_user_route(client):
    url = ROUTE.format(user=4)
    _warm(client, url)

    def served() -> float:
        text = client.get("/metrics").text
        pattern = (
            r'recsys_http_requests_total\{method="GET",'
            r'route="/v1/users/\{user_id\}/recommendations",status="200"\} ([\d.e+]+)'
        )
        match = re.search(pattern, text)
        return float(match.group(1)) if match else 0.0

    before = served()
    for _ in range(3):
        client.get(url)
    assert served() == before + 3


def test_a_posted_event_sends_the_users_next_request_through_the_route(client, artifacts):
    url = ROUTE.format(user=5) + "?k=10"
    kept = _warm(client, url)
    item = client.get(url).json()["items"][0]["item_id"]
    posted = client.post("/v1/events", json={"events": [{"user_id": 5, "item_id": item}]})
    assert posted.status_code == 202 and posted.json()["accepted"] == 1
    after = client.get(url)
    assert after.content != kept and after.json()["cached"] is False
    assert item not in [i["item_id"] for i in after.json()["items"]]  # seen now


def test_a_hidden_item_leaves_the_next_answer_at_once(client):
    url = ROUTE.format(user=6) + "?k=10"
    kept = _warm(client, url)
    top = client.get(url).json()["items"][0]["item_id"]
    hidden = client.put(
        f"/admin/items/{top}", json={"available": False}, headers={"X-API-Key": ADMIN}
    )
    assert hidden.status_code == 200
    after = client.get(url)
    assert after.content != kept
    assert top not in [i["item_id"] for i in after.json()["items"]]


def test_a_flush_sends_the_next_request_through_the_route(client):
    url = ROUTE.format(user=7)
    _warm(client, url)
    flushed = client.post("/admin/cache/flush", headers={"X-API-Key": ADMIN})
    assert flushed.status_code == 200
    assert client.get(url).json()["cached"] is False


def test_an_entry_lives_no_longer_than_the_local_tiers_seconds(artifacts, redis_url):
    with _client(artifacts, redis_url, local_cache_seconds=0.05) as client:
        url = ROUTE.format(user=8)
        _warm(client, url)
        calls = RouteCalls(client)
        deadline = time.monotonic() + 30
        while calls.count == 0 and time.monotonic() < deadline:
            client.get(url)
        assert calls.count >= 1


def test_no_rendered_hits_when_the_local_tier_is_off(artifacts, redis_url):
    with _client(artifacts, redis_url, local_cache_entries=0) as client:
        url = ROUTE.format(user=9)
        _warm(client, url)
        calls = RouteCalls(client)
        client.get(url)
        assert calls.count == 1


def test_an_api_key_is_checked_on_every_rendered_hit(artifacts, redis_url):
    with _client(artifacts, redis_url, api_keys="client-one,client-two") as client:
        url = ROUTE.format(user=10)
        one, two = {"X-API-Key": "client-one"}, {"X-API-Key": "client-two"}
        assert client.get(url, headers=one).json()["cached"] is False
        kept = client.get(url, headers=one).content
        assert client.get(url).status_code == 401
        assert client.get(url, headers={"X-API-Key": "client-three"}).status_code == 401
        assert client.get(url, headers=two).content == kept


def test_the_store_is_bounded_by_entries_and_bytes_oldest_out_first():
    store = RenderedAnswers(entries=3, seconds=60.0, max_bytes=100)
    for n in range(4):
        store.keep((f"/u/{n}", b""), "v", str(n), 0, b"x" * 10)
    assert store.find(("/u/0", b"")) is None  # the fourth pushed the first out
    assert all(store.find((f"/u/{n}", b"")) is not None for n in (1, 2, 3))
    store.keep(("/big", b""), "v", "b", 0, b"x" * 85)  # 30 + 85 bytes: two must go
    assert store.find(("/u/1", b"")) is None and store.find(("/u/2", b"")) is None
    assert store.find(("/big", b"")) is not None
    store.keep(("/huge", b""), "v", "h", 0, b"x" * 101)  # over the whole budget: not kept
    assert store.find(("/huge", b"")) is None and store.find(("/big", b"")) is not None
