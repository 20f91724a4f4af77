"""Regression tests for a probe of a running `recsys serve`: booleans read as IDs, counts
or flags, a single worker that announced a port it could not bind, 422s that echoed the
whole body, filter values stripped on one route only, and refit epochs logged with the
epoch number as their recall."""

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import private_copy, small_version

from data.synthetic import SyntheticConfig, generate
from features.feature_set import FeatureSet
from features.ingest import ingest
from features.sources import resolve_source
from features.splits import leave_last_out
from recsys.processes import free_port, served
from serving.app import create_app
from serving.settings import ServiceSettings
from training.config import TowerConfig, TrainConfig
from training.trainer import train

pytestmark = pytest.mark.slow  # builds a model or runs the service: `make test` only

KEY = "strict-inputs-admin-key"
SHORT = 250  # characters: an excerpt of a refused input is at most about this long


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return small_version(
        tmp_path_factory.mktemp("strict_inputs"),
        SyntheticConfig(rows=4_000, users=100, items=60, clusters=3, seed=7),
        TrainConfig(max_epochs=1, refit=False),
    )


def _client(artifacts: Path, redis_url: str) -> TestClient:
    settings = ServiceSettings(
        artifacts=artifacts, redis_url=redis_url, admin_api_key=KEY, reload_poll_seconds=0
    )
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.fixture
def client(artifacts, redis_url) -> Iterator[TestClient]:
    with _client(artifacts, redis_url) as test_client:
        yield test_client


@pytest.fixture
def own_client(artifacts, redis_url, tmp_path) -> Iterator[TestClient]:
    """A client of a private copy, for requests that change the catalogue."""
    with _client(private_copy(artifacts, tmp_path), redis_url) as test_client:
        yield test_client


def _messages(answer: httpx.Response) -> str:
    return " ".join(str(e["msg"]) for e in answer.json()["detail"])


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": True, "k": 3},
        {"user_id": False},
        {"history": [True, 2]},
        {"user_id": 1, "exclude": [False]},
        {"user_id": 1, "k": True},
    ],
)
def test_a_boolean_is_no_id_and_no_count(client, body):
    answer = client.post("/v1/recommendations", json=body)
    assert answer.status_code == 422, answer.text
    assert "not a boolean" in _messages(answer)


def test_a_boolean_is_no_category_value(client):
    body = {"user_id": 1, "categories": {"genres": [True]}}
    answer = client.post("/v1/recommendations", json=body)
    assert answer.status_code == 422, answer.text
    assert "not a boolean" in _messages(answer)


@pytest.mark.parametrize("available", ["yes", "true", 1, 0, None])
def test_only_true_or_false_is_a_boolean_in_a_body(client, available):
    answer = client.put("/admin/items/5", json={"available": available}, headers={"X-API-Key": KEY})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == ["body", "available"]


@pytest.mark.parametrize("flag", ["yes", "on", "1", "0", "maybe"])
def test_only_true_or_false_is_a_boolean_in_a_query(client, flag):
    answer = client.get(f"/v1/users/1/recommendations?k=3&exclude_seen={flag}")
    assert answer.status_code == 422, answer.text
    assert "true or false" in _messages(answer)


@pytest.mark.parametrize("path", ["/v1/users/1/recommendations", "/v1/items/1/similar"])
def test_a_boolean_is_no_count_in_a_query(client, path):
    assert client.get(f"{path}?k=true").status_code == 422


def test_what_was_valid_is_still_read(client, own_client):
    """Whole numbers written as floats are still the integer: "k": 2.0 is k 2."""
    answer = client.post("/v1/recommendations", json={"user_id": 1, "k": 2.0, "history": [3]})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["items"]) == 2
    for flag in ["true", "false", "True", "FALSE"]:
        answer = client.get(f"/v1/users/1/recommendations?k=3&exclude_seen={flag}")
        assert answer.status_code == 200, (flag, answer.text)
    seen = client.get("/v1/users/1/recommendations?k=3").json()
    assert client.get("/v1/users/1/recommendations?k=3&exclude_seen=true").json() == seen
    for available in [False, True]:
        body = {"available": available}
        answer = own_client.put("/admin/items/5", json=body, headers={"X-API-Key": KEY})
        assert answer.status_code == 200, answer.text
        assert answer.json()["available"] is available


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/events", {"events": [{"user_id": 1, "item_id": 2}] * 20_000}),
        ("/v1/recommendations", {"user_id": 1, "history": list(range(20_000))}),
        ("/v1/recommendations", {"user_id": 1, "exclude": list(range(20_000))}),
        ("/v1/recommendations", {"user_id": 1, "history": [0.5] * 1_000}),
        ("/v1/recommendations", {"user_id": 1, "categories": {"x" * 50_000: ["a"]}}),
    ],
)
def test_a_refused_body_is_not_echoed_back(client, path, body):
    answer = client.post(path, json=body)
    assert answer.status_code == 422, answer.text[:500]
    assert len(answer.content) < 20 * SHORT, answer.text[:500]
    for error in answer.json()["detail"]:
        echoed = error.get("input")
        text = echoed if isinstance(echoed, str) else json.dumps(echoed)
        assert len(text) < SHORT


def test_a_short_input_is_echoed_as_it_was(client):
    answer = client.post("/v1/recommendations", json={"user_id": 1, "k": "many"})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["input"] == "many"


def test_filter_values_are_stripped_on_every_route(client):
    plain = client.post(
        "/v1/recommendations", json={"user_id": 1, "k": 5, "categories": {"genres": ["genre-01"]}}
    )
    assert plain.status_code == 200, plain.text
    assert plain.json()["items"]
    spaced = {"user_id": 1, "k": 5, "categories": {" genres ": [" genre-01 "]}}
    posted = client.post("/v1/recommendations", json=spaced)
    assert posted.status_code == 200, posted.text
    asked = client.get("/v1/users/1/recommendations?k=5&category=%20genres%20:%20genre-01%20")
    assert asked.status_code == 200, asked.text
    assert posted.json()["items"] == plain.json()["items"] == asked.json()["items"]


def _serve_on(artifacts: Path, port: int, workers: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "recsys", "serve", "--artifacts", str(artifacts)]
    return subprocess.run(
        [*command, "--port", str(port), "--workers", str(workers)],
        env={**os.environ, "RECSYS_ADMIN_API_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_busy_port_is_refused_before_anything_is_announced(artifacts, workers):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = _serve_on(artifacts, port, workers)
    assert result.returncode == 1, result.stderr
    assert "listening" not in result.stderr
    assert result.stderr.strip() == f"cannot bind 127.0.0.1:{port}: Address already in use"


def test_a_single_worker_announces_the_port_it_holds(artifacts, tmp_path):
    log = tmp_path / "serve.log"
    with served(artifacts, env={"RECSYS_ADMIN_API_KEY": KEY}, log=log) as base:
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    assert f"listening on {base}: version" in log.read_text()


def test_refit_epochs_are_logged_as_such_without_a_metric(tmp_path, caplog):
    generate(tmp_path / "data", SyntheticConfig(rows=2_000, users=60, items=40, seed=4))
    ingest(resolve_source(tmp_path / "data"), tmp_path / "ingest")
    features = FeatureSet.load(tmp_path / "ingest")
    split = leave_last_out(features.interactions, n_test=0, n_valid=1)
    tower = TowerConfig(embedding_dim=8, id_dim=8, hidden_dim=16, history_length=5, members=1)
    config = TrainConfig(max_epochs=2, patience=2, batch_size=256, seed=1)
    with caplog.at_level(logging.INFO, logger="training.trainer"):
        result = train(features, split, tower, config, progress=False)
    assert result.refit_epochs >= 1
    lines = [r.getMessage() for r in caplog.records if r.name == "training.trainer"]
    refit = [line for line in lines if line.startswith("refit epoch")]
    assert len(refit) == result.refit_epochs, lines
    assert not any("recall" in line for line in refit), refit
    validated = [line for line in lines if line.startswith("epoch")]
    assert validated and all("valid recall@" in line for line in validated), lines
