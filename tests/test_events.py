"""Events posted between builds (issue 15): stored durably in the event segments, read by
every worker, and in the user's very next answer; bad rows refused one by one."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import polars as pl
import pytest
import redis
from fastapi.testclient import TestClient
from helpers import private_copy, small_version

from data.synthetic import SyntheticConfig
from features.event_log import Event, SegmentWriter, read_new, segments
from recsys.processes import free_port, wait_listening, wait_ready
from serving.app import create_app
from serving.settings import ServiceSettings
from training.config import TrainConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return small_version(
        tmp_path_factory.mktemp("events"),
        SyntheticConfig(rows=8_000, users=200, items=120, clusters=4, seed=5),
        TrainConfig(max_epochs=1),
    )


@pytest.fixture
def artifacts(built, tmp_path) -> Path:
    return private_copy(built, tmp_path)


@pytest.fixture
def client(artifacts, redis_url) -> Iterator[TestClient]:
    app = create_app(ServiceSettings(artifacts=artifacts, redis_url=redis_url))
    with TestClient(app) as test_client:
        yield test_client


def _items(answer: dict) -> list[int]:
    return [i["item_id"] for i in answer["items"]]


def _catalogue(artifacts: Path) -> list[int]:
    version = artifacts / "versions" / (artifacts / "current").readlink().name
    return pl.read_parquet(version / "data" / "vocab" / "item_id.parquet")["id"].to_list()


def test_posted_events_change_the_next_answer_and_count_as_seen(client, artifacts):
    before = client.get("/v1/users/3/recommendations?k=10").json()
    again = client.get("/v1/users/3/recommendations?k=10").json()
    assert again["cached"] and _items(again) == _items(before)
    liked = _items(before)[:3]
    other = _items(before)[5]
    posted_before = client.post("/v1/recommendations", json={"user_id": 3, "exclude": [other]})
    answer = client.post(
        "/v1/events", json={"events": [{"user_id": 3, "item_id": i} for i in liked]}
    )
    assert answer.status_code == 202
    assert answer.json() == {"accepted": 3, "rejected": []}
    after = client.get("/v1/users/3/recommendations?k=10").json()
    assert not after["cached"], "an answer cached before the events was served after them"
    assert not set(liked) & set(_items(after)), "the new items were not excluded as seen"
    assert len(after["items"]) == 10 and not after["fallback"]
    # the POST form with a user counts the events too
    posted = client.post("/v1/recommendations", json={"user_id": 3, "exclude": [other]}).json()
    assert not (set(liked) | {other}) & set(_items(posted))
    assert _items(posted) != _items(posted_before.json())
    # The stored events are the log format a build reads.
    files = segments(artifacts / "events")
    assert len(files) == 1
    stored = pl.read_csv(files[0])
    assert stored.columns == ["user_id", "item_id", "timestamp", "weight", "event"]
    assert stored["item_id"].to_list() == liked


def test_an_unknown_user_with_events_gets_answers_from_them(client, artifacts):
    fallback = client.get("/v1/users/new-user-1/recommendations?k=5").json()
    assert fallback["fallback"]
    # user IDs of this catalogue are integers: a new user is a new integer
    items = _catalogue(artifacts)[:2]
    posted = client.post(
        "/v1/events", json={"events": [{"user_id": 99_999, "item_id": i} for i in items]}
    )
    assert posted.json()["accepted"] == 2
    answer = client.get("/v1/users/99999/recommendations?k=5").json()
    assert not answer["fallback"]
    assert not set(items) & set(_items(answer))
    assert _items(answer) != _items(client.get("/v1/users/99998/recommendations?k=5").json())


def _counted(client, outcome: str) -> float:
    line = f'recsys_events_total{{outcome="{outcome}"}} '
    text = client.get("/metrics").text
    return sum(float(row[len(line) :]) for row in text.splitlines() if row.startswith(line))


def test_bad_rows_are_rejected_one_by_one_and_never_stored(client, artifacts):
    item = _catalogue(artifacts)[0]
    before = _counted(client, "accepted"), _counted(client, "rejected")
    rows = [
        {"user_id": 1, "item_id": item, "weight": 2.0, "event": "purchase"},
        {"user_id": 1, "item_id": item, "colour": "red"},
        {"user_id": "abc", "item_id": item},
        {"user_id": 1},
        {"user_id": 1, "item_id": item, "weight": -1},
        {"user_id": 1, "item_id": item, "timestamp": "yesterday"},
        {"user_id": 1, "item_id": item, "timestamp": 1e19},
        {"user_id": True, "item_id": item},
        "not an object",
        {"user_id": 1, "item_id": item, "timestamp": "2026-11-30T10:00:00+01:00"},
    ]
    answer = client.post("/v1/events", json={"events": rows})
    assert answer.status_code == 202
    body = answer.json()
    assert body["accepted"] == 2
    reasons = {r["index"]: r["reason"] for r in body["rejected"]}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert "unknown column(s) colour" in reasons[1]
    assert "integer" in reasons[2]
    assert "null item_id" in reasons[3]
    assert "weight" in reasons[4]
    assert "timestamp" in reasons[5] and "timestamp" in reasons[6]
    assert (_counted(client, "accepted"), _counted(client, "rejected")) == (
        before[0] + 2,
        before[1] + 8,
    )
    # NaN (JSON's extension) in a weight: that row only
    nan = client.post(
        "/v1/events",
        content=b'{"events": [{"user_id": 1, "item_id": %d, "weight": NaN}]}' % item,
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 202 and nan.json()["accepted"] == 0
    flood = client.post("/v1/events", json={"events": [{"user_id": 1, "item_id": item}] * 1001})
    assert flood.status_code == 422
    stored = pl.read_csv(segments(artifacts / "events")[0])
    assert stored.height == 2
    assert stored["event"].to_list() == ["purchase", None]
    assert stored["timestamp"][1] == 1_796_029_200  # 09:00 UTC


def test_events_survive_a_restart_and_a_redis_flush(artifacts, redis_url):
    settings = ServiceSettings(artifacts=artifacts, redis_url=redis_url)
    items = _catalogue(artifacts)[:4]
    with TestClient(create_app(settings)) as client:
        client.post("/v1/events", json={"events": [{"user_id": 5, "item_id": i} for i in items]})
        first = client.get("/v1/users/5/recommendations?k=10").json()
    redis.Redis.from_url(redis_url).flushdb()
    with TestClient(create_app(settings)) as client:
        second = client.get("/v1/users/5/recommendations?k=10").json()
    assert _items(second) == _items(first)
    assert not set(items) & set(_items(second))


def test_a_reader_takes_whole_lines_once(tmp_path):
    writer = SegmentWriter(tmp_path)
    path = writer.append([Event(1, 2, 10), Event("a,b", 'x"y', 11, 0.5, "view")])
    events, offset = read_new(path, 0)
    assert events == [Event("1", "2", 10), Event("a,b", 'x"y', 11, 0.5, "view")]
    with path.open("ab") as handle:  # a writer that died mid-line
        handle.write(b"3,4,1")
    assert read_new(path, offset) == ([], offset)
    assert read_new(path, 0)[0] == events
    path.unlink()  # pruned while its writer lives: the next append starts a new segment
    again = writer.append([Event(5, 6, 12)])
    assert again != path and read_new(again, 0)[0] == [Event("5", "6", 12)]


@pytest.fixture
def service(artifacts, redis_url) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    command = [sys.executable, "-m", "recsys", "serve", "--artifacts", str(artifacts)]
    command += ["--port", str(port), "--workers", "2"]
    env = {**os.environ, "REDIS_URL": redis_url}
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/readyz", process=process)
        wait_listening(port, 2)
        yield base, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_every_worker_answers_with_the_events_and_a_kill_loses_none(service, artifacts, redis_url):
    base, process = service
    items = _catalogue(artifacts)[:5]
    posted = httpx.post(
        f"{base}/v1/events", json={"events": [{"user_id": 7, "item_id": i} for i in items]}
    )
    assert posted.status_code == 202 and posted.json()["accepted"] == 5
    time.sleep(1.0)
    answers = set()
    for _ in range(20):  # a new connection each time: the kernel spreads them over workers
        answer = httpx.get(f"{base}/v1/users/7/recommendations?k=10").json()
        assert not set(items) & set(_items(answer))
        answers.add(tuple(_items(answer)))
    assert len(answers) == 1
    os.killpg(process.pid, signal.SIGKILL)  # right after the 202s: nothing is lost
    process.wait()
    redis.Redis.from_url(redis_url).flushdb()
    settings = ServiceSettings(artifacts=artifacts, redis_url=redis_url)
    with TestClient(create_app(settings)) as client:
        again = client.get("/v1/users/7/recommendations?k=10").json()
    assert tuple(_items(again)) in answers


def _rebuild(artifacts: Path, data: Path, **inputs: bool):
    from features.sources import resolve_source
    from recsys.build_config import Inputs, RebuildPolicy
    from recsys.pipeline import build
    from training.config import TowerConfig

    return build(
        resolve_source(data),
        artifacts,
        TowerConfig(members=1),
        TrainConfig(max_epochs=1),
        progress=False,
        policy=RebuildPolicy(gate=False),
        inputs=Inputs(**inputs),
    )


def test_the_next_build_reads_the_events_exactly_once(artifacts, built, redis_url):
    data = built.parent / "data"
    settings = ServiceSettings(artifacts=artifacts, redis_url=redis_url)
    items = _catalogue(artifacts)[:3]
    with TestClient(create_app(settings)) as client:
        rows = [{"user_id": 11, "item_id": i, "event": "view"} for i in items]
        client.post("/v1/events", json={"events": [*rows, {"user_id": 123_456, "item_id": 1}]})
    first = _rebuild(artifacts, data)
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert manifest["posted_events"] == 4
    [segment] = segments(artifacts / "events")
    assert manifest["events_absorbed"] == {segment.name: segment.stat().st_size}
    absorbed = pl.read_parquet(first.path / "posted_events.parquet")
    assert absorbed["user_id"].dtype == pl.Int64  # as the log's IDs, not text
    assert first.ingest.read == built_rows(built) + 4
    with TestClient(create_app(settings)) as client:
        # what the version absorbed is not new to it: the user's answer is the version's
        answer = client.get("/v1/users/11/recommendations?k=5").json()
        assert answer["cached"] is False and answer["model_version"] == first.version
        assert client.get("/v1/users/11/recommendations?k=5").json()["cached"]
        client.post("/v1/events", json={"events": [{"user_id": 11, "item_id": items[0]}]})
        assert not client.get("/v1/users/11/recommendations?k=5").json()["cached"]
    second = _rebuild(artifacts, data)
    assert json.loads((second.path / "manifest.json").read_text())["posted_events"] == 5
    assert second.ingest.read == built_rows(built) + 5
    skipped = _rebuild(artifacts, data, posted_events=False)
    assert skipped.ingest.read == built_rows(built)


def test_pruning_deletes_only_segments_absorbed_whole(artifacts, built, redis_url):
    from recsys.event_sources import prune_segments

    settings = ServiceSettings(artifacts=artifacts, redis_url=redis_url)
    with TestClient(create_app(settings)) as client:
        client.post("/v1/events", json={"events": [{"user_id": 1, "item_id": 2}]})
    _rebuild(artifacts, built.parent / "data")
    [absorbed] = segments(artifacts / "events")
    with TestClient(create_app(settings)) as client:
        client.post("/v1/events", json={"events": [{"user_id": 1, "item_id": 3}]})
    assert prune_segments(artifacts, older_than_days=1) == []  # written just now
    assert prune_segments(artifacts, older_than_days=0) == [absorbed.name]
    [kept] = segments(artifacts / "events")
    assert read_new(kept, 0)[0][0].item_id == "3"


def built_rows(built: Path) -> int:
    version = built / "versions" / (built / "current").readlink().name
    return int(json.loads((version / "manifest.json").read_text())["data"]["read"])


def test_fresh_events_weigh_by_the_versions_event_rule(tmp_path):
    """A version built with --event-weights view=0.1 weighs a posted view as its build
    weighed the log's views, whatever weight the row carries."""
    from serving.fresh import FreshEvents

    SegmentWriter(tmp_path).append(
        [Event(1, 10, 5, 1.0, "view"), Event(1, 11, 6, 0.7, "purchase"), Event(1, 12, 7, 0.3)]
    )
    fresh = FreshEvents(tmp_path, {}, {"view": 0.1})
    assert fresh.poll() == 3
    held = fresh.of_user("1")
    assert held is not None and held.items == ["10", "11", "12"]
    assert held.weights == [0.1, 0.7, 0.3] and held.sequence == 3
