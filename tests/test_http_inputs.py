"""What a client can send never gives a 500 nor holds a connection, and every bound on a
request has one owner (issue 34, probes 7, 10 and 11, and the admin key with spaces)."""

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import small_version
from pydantic import ValidationError

from data.synthetic import SyntheticConfig
from recsys.processes import served
from serving.app import create_app
from serving.settings import ServiceSettings
from training.config import TrainConfig

pytestmark = pytest.mark.slow

KEY = "admin-key-for-tests"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return small_version(
        tmp_path_factory.mktemp("http_inputs"),
        SyntheticConfig(rows=5_000, users=120, items=80, clusters=4, seed=2),
        TrainConfig(max_epochs=1),
    )


@pytest.fixture(scope="module")
def client(artifacts) -> Iterator[TestClient]:
    settings = ServiceSettings(artifacts=artifacts, redis_url=None, admin_api_key=KEY)
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


JSON_ROUTES = [
    ("POST", "/v1/recommendations"),
    ("POST", "/v1/events"),
    ("PUT", "/admin/items/5"),
]


@pytest.mark.parametrize(("method", "path"), JSON_ROUTES)
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_a_body_that_is_not_json_is_a_415(client, method, path, content_type):
    headers = {"X-API-Key": KEY}
    if content_type:
        headers["content-type"] = content_type
    body = b'{"user_id": 1, "events": [{"user_id": 1, "item_id": 2}], "available": false}'
    answer = client.request(method, path, content=body, headers=headers)
    assert answer.status_code == 415, answer.text
    assert "JSON" in answer.json()["detail"]


MALFORMED = [
    b"\xff\xfe not utf-8",
    b'{"user_id": "\\ud800", "k": 5}',
    b'{"user_id": 1, "k": ' + b"9" * 401 + b"}",
    b'{"events": [{"user_id": 1, "item_id": 2, "weight": ' + b"9" * 401 + b"}]}",
    b'{"events": [{"user_id": 1, "item_id": 2, "timestamp": ' + b"9" * 401 + b"}]}",
    b'{"events": [{"user_id": "\\ud800", "item_id": 2, "event": "\\ud800"}]}',
    b'{"available": true, "features": {"genres": ["\\ud800"]}}',
    b'{"available": true, "features": {"\\ud800": 1}}',
    b"[" * 5000 + b"]" * 5000,
    b'{"history": [1e999], "user_id": 1}',
    b"",
]


@pytest.mark.parametrize(("method", "path"), JSON_ROUTES)
@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
def test_no_malformed_body_gives_a_500(client, method, path, body):
    headers = {"X-API-Key": KEY, "content-type": "application/json"}
    answer = client.request(method, path, content=body, headers=headers)
    assert answer.status_code < 500, (answer.status_code, answer.text[:300])
    json.loads(answer.content)  # an answer a client can read


def test_one_owner_for_max_k(artifacts):
    settings = ServiceSettings(artifacts=artifacts, redis_url=None, max_k=60)
    with TestClient(create_app(settings)) as bounded:
        assert bounded.get("/v1/users/1/recommendations?k=60").status_code == 200
        assert bounded.post("/v1/recommendations", json={"user_id": 1, "k": 60}).status_code == 200
        assert bounded.get("/v1/users/1/recommendations?k=61").status_code == 422
        assert bounded.post("/v1/recommendations", json={"user_id": 1, "k": 61}).status_code == 422
    wide = ServiceSettings(artifacts=artifacts, redis_url=None, max_k=2000)
    with TestClient(create_app(wide)) as client:  # probe: GET took 1,500, POST refused it
        get = client.get("/v1/users/1/recommendations?k=1500")
        post = client.post("/v1/recommendations", json={"user_id": 1, "k": 1500})
        assert get.status_code == post.status_code == 200
    with pytest.raises(ValidationError):
        ServiceSettings(artifacts=artifacts, max_k=10**6)


@pytest.mark.parametrize("key", [" key", "key ", "ke\ty", "k\u00e9y"])
def test_an_api_key_no_header_can_carry_is_refused_at_start(key, artifacts):
    """Probe: an admin key with surrounding spaces started, then every request was a 401."""
    with pytest.raises(ValidationError):
        ServiceSettings(artifacts=artifacts, admin_api_key=key)
    if key.strip() != key:  # client keys are a list: each is stripped, as documented
        assert (
            ServiceSettings(artifacts=artifacts, api_keys=f"good,{key}").client_keys()[1] == b"key"
        )
    else:
        with pytest.raises(ValidationError):
            ServiceSettings(artifacts=artifacts, api_keys=f"good,{key}")
    assert ServiceSettings(artifacts=artifacts, api_keys="one, two").client_keys() == [
        b"one",
        b"two",
    ]


def test_a_body_sent_slowly_is_cut_off(artifacts):
    """Probe: content-length 100 and 4 bytes sent: 50 of 50 connections still open after
    45 s. Each now closes once RECSYS_BODY_TIMEOUT_SECONDS pass; others keep answering."""
    env = {"RECSYS_BODY_TIMEOUT_SECONDS": "1", "RECSYS_HEADER_TIMEOUT_SECONDS": "30"}
    with served(artifacts, env=env) as base:
        port = int(base.rsplit(":", 1)[1])
        slow = []
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(
                b"POST /v1/events HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                b'content-length: 100\r\n\r\n{"ev'
            )
            slow.append(sock)
        with httpx.Client(base_url=base) as client:
            assert client.get("/v1/users/1/recommendations").status_code == 200
        deadline = time.monotonic() + 60  # generous: a loaded machine
        for sock in slow:
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            closed = False
            try:
                while data := sock.recv(4096):
                    assert b"202" not in data
                closed = True
            except TimeoutError:
                pass
            assert closed, "a connection that never sent its body was still open"
            sock.close()
        with httpx.Client(base_url=base) as client:
            posted = client.post("/v1/events", json={"events": [{"user_id": 1, "item_id": 2}]})
            assert posted.status_code == 202
