"""One event log for every host (RECSYS_EVENT_LOG_URL, a Redis stream): an append is
acknowledged only once durable, an event posted to one host changes the answers of
another, survives the death of the host that took it, and the next build absorbs it once."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import polars as pl
import pytest
import redis
from helpers import private_copy, recsys, small_version, start_redis

from data.synthetic import SyntheticConfig
from features.event_log import Event, EventStoreError
from features.event_stream import START, STREAM_MARK, EventLogSettings, EventStream
from recsys.core.artifacts import read_manifest
from recsys.core.versions import VersionStore
from recsys.processes import free_port, wait_ready
from serving.fresh import FreshEvents
from training.config import TrainConfig


@pytest.fixture(scope="module")
def durable_redis(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A Redis that appends and fsyncs every write, as the shared log needs."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("aof")
    process = start_redis(port, str(workdir), "--appendonly", "yes", "--appendfsync", "always")
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait()


def stream_at(url: str, key: str, **extra: object) -> EventStream:
    stream = EventStream(EventLogSettings(url=url, **extra), key)  # type: ignore[arg-type]
    stream.client.delete(key)
    return stream


def test_a_redis_that_keeps_writes_in_memory_only_is_refused(redis_url: str) -> None:
    plain = redis.Redis.from_url(redis_url)
    if plain.config_get("appendfsync").get("appendfsync") == "always":
        pytest.skip("the test Redis persists every write already")
    with pytest.raises(EventStoreError, match="appendfsync always"):
        stream_at(redis_url, "t:events").check_durable()


def test_an_append_waits_for_the_replicas_it_was_told_to(durable_redis: str) -> None:
    stream = stream_at(durable_redis, "t:replicas", replicas=1, wait_ms=50)
    assert "replica" in stream.check_durable()
    with pytest.raises(EventStoreError, match="0 of 1 replica"):
        stream.append([Event(1, 2, 3)])  # this Redis has no replica: not acknowledged


def test_readers_take_each_entry_once_from_where_a_version_stopped(
    durable_redis: str, tmp_path: Path
) -> None:
    stream = stream_at(durable_redis, "t:read")
    assert "appendfsync always" in stream.check_durable()
    first = stream.append([Event(1, 10, 100), Event(1, 11, 101)])
    stream.append([Event(2, 12, 102, 0.5, "view")])
    events, position = stream.read_after(START)
    assert [(e.user_id, e.item_id, e.event) for e in events] == [
        ("1", "10", None),
        ("1", "11", None),
        ("2", "12", "view"),
    ]
    assert stream.read_after(position) == ([], position)
    # A version that absorbed the first entry: only the second is new to its hosts.
    fresh = FreshEvents(tmp_path, {STREAM_MARK: first}, {"view": 0.1}, stream=stream)
    assert fresh.poll() == 1
    held = fresh.of_user("2")
    assert held is not None and held.items == ["12"] and held.weights == [0.1]
    assert fresh.of_user("1") is None


def host(artifacts: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "recsys", "serve", "--artifacts", str(artifacts)]
    process = subprocess.Popen(
        [*command, "--port", str(port)],
        env={**os.environ, **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(f"{base}/readyz", process=process)
    return process, base


def top(base: str, user: int) -> list[int]:
    answer = httpx.get(f"{base}/v1/users/{user}/recommendations?k=10", timeout=30)
    assert answer.status_code == 200, answer.text
    return [item["item_id"] for item in answer.json()["items"]]


@pytest.mark.slow  # builds a model and runs two services
def test_an_event_posted_to_one_host_reaches_another_and_outlives_its_host(
    durable_redis: str, tmp_path: Path
) -> None:
    built = small_version(
        tmp_path / "v",
        SyntheticConfig(rows=3_000, users=80, items=60, seed=4),
        TrainConfig(max_epochs=1),
    )
    stream = stream_at(durable_redis, "t:hosts")
    stream_at(durable_redis, "t:hosts:catalogue")
    env = {
        "RECSYS_EVENT_LOG_URL": durable_redis,
        "RECSYS_EVENT_LOG_STREAM": "t:hosts",
        "RECSYS_EVENT_LOG_CATALOGUE_STREAM": "t:hosts:catalogue",
        "RECSYS_ADMIN_API_KEY": "admin-key",
    }
    copies = [private_copy(built, tmp_path / f"host-{n}") for n in range(2)]
    (process_a, host_a), (process_b, host_b) = (
        host(copy, env, tmp_path / f"host-{n}.log") for n, copy in enumerate(copies)
    )
    try:
        user = 3
        before = top(host_b, user)
        posted = before[:3]
        rows = [{"user_id": user, "item_id": i, "timestamp": 1_900_000_000} for i in posted]
        sent = time.monotonic()
        answer = httpx.post(f"{host_a}/v1/events", json={"events": rows}, timeout=30)
        assert answer.status_code == 202 and answer.json()["accepted"] == 3
        hidden = top(host_b, 5)[0]  # a catalogue change travels the same way
        change = httpx.put(
            f"{host_a}/admin/items/{hidden}",
            json={"available": False},
            headers={"X-API-Key": "admin-key"},
            timeout=30,
        )
        assert change.status_code == 200, change.text
        process_a.kill()  # the host that took the writes dies at once
        process_a.wait()
        deadline = sent + 60
        while set(posted) & set(top(host_b, user)):  # seen items leave the answer
            assert time.monotonic() < deadline, "host B never saw host A's events"
            time.sleep(0.05)
        while hidden in top(host_b, 5):
            assert time.monotonic() < deadline, "host B never hid the item host A hid"
            time.sleep(0.05)
    finally:
        for process in (process_a, process_b):
            process.kill()
            process.wait()
    # The next build of host B's artifacts absorbs them, and records where it stopped.
    rebuilt = recsys("build", "--artifacts", copies[1], "--data", tmp_path / "v" / "data",
                     "--no-gate", "--epochs", "1", "--no-progress", env_extra=env)  # fmt: skip
    assert rebuilt.returncode == 0, rebuilt.stderr
    manifest = read_manifest(VersionStore(copies[1]).current(), verify=False)
    assert manifest["posted_events"] == 3
    assert manifest["events_absorbed"][STREAM_MARK] == stream.last_id()


def test_a_build_takes_catalogue_changes_from_the_shared_log_after_the_file(
    durable_redis: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from features.catalogue_log import ItemChange, append_change, merged_item_table
    from recsys.pipeline import shared_changes

    table = tmp_path / "items.csv"
    table.write_text("item_id,category\n1,shoes\n2,hats\n")
    append_change(tmp_path / "changes.jsonl", ItemChange(3, True, {"category": ["bags"]}))
    monkeypatch.setenv("RECSYS_EVENT_LOG_URL", durable_redis)
    monkeypatch.setenv("RECSYS_EVENT_LOG_CATALOGUE_STREAM", "t:build-catalogue")
    shared = EventLogSettings().open()
    assert shared is not None
    shared.catalogue.client.delete("t:build-catalogue")
    shared.catalogue.append(ItemChange(3, True, {"category": ["coats"]}))  # later: wins
    shared.catalogue.append(ItemChange(4, True, {"category": ["socks"]}))
    out = merged_item_table(
        tmp_path / "changes.jsonl", table, tmp_path / "merged.parquet", shared=shared_changes()
    )
    assert out is not None
    merged = pl.read_parquet(out).sort("item_id")
    assert merged["category"].to_list() == ["shoes", "hats", "coats", "socks"]


def test_pushed_events_go_to_the_shared_log_and_prune_trims_what_a_version_absorbed(
    durable_redis: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recsys.event_sources import push_file, trim_absorbed

    monkeypatch.setenv("RECSYS_EVENT_LOG_URL", durable_redis)
    monkeypatch.setenv("RECSYS_EVENT_LOG_STREAM", "t:push")
    stream = stream_at(durable_redis, "t:push")
    log = tmp_path / "new.csv"
    log.write_text("user_id,item_id,timestamp\n1,10,100\n2,20,200\n,30,300\n")
    pushed = push_file(log, tmp_path / "artifacts")
    assert pushed.accepted == 2 and len(pushed.rejected) == 1
    assert not (tmp_path / "artifacts" / "events").exists()  # nothing went to local files
    mark = stream.last_id()
    later = stream.append([Event(3, 30, 300)])
    assert trim_absorbed(stream, mark, cutoff=0.0) == 0  # nothing is that old
    assert trim_absorbed(stream, mark, cutoff=time.time() + 60) == 1
    events, _ = stream.read_after(START)
    assert [e.user_id for e in events] == ["3"] and stream.last_id() == later


def test_a_poller_of_an_unreachable_log_gets_nothing_and_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stream = EventStream(EventLogSettings(url=f"redis://127.0.0.1:{free_port()}/0"), "t:down")
    fresh = FreshEvents(tmp_path, {}, stream=stream)
    assert fresh.poll() == 0 and fresh.poll() == 0  # no exception, the next poll retries
    assert stream.down
    assert sum("cannot read the shared log t:down" in r.message for r in caplog.records) == 1
