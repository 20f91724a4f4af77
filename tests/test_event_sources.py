"""Events from files and Redis streams (issue 15): the same row rules as POST /v1/events,
stored durably in the event segments, acknowledged only once stored, never stored twice."""

import time
from pathlib import Path

import polars as pl
import pytest
import redis
from helpers import recsys

from features.event_log import read_new, segments
from recsys.event_sources import StreamConsumer, push_file


def _stored(artifacts: Path) -> list:
    return [e for path in segments(artifacts / "events") for e in read_new(path, 0)[0]]


def test_push_stores_the_good_rows_and_names_the_bad(tmp_path):
    log = tmp_path / "new.csv"
    log.write_text(
        "customer,sku,timestamp,weight,event,colour\n"
        "1,10,2026-11-30T10:00:00Z,1.0,purchase,red\n"
        "2,11,,0.5,view,blue\n"
        "x,12,1700000000,1,view,red\n"
        "3,13,1700000000,-2,view,red\n"
    )
    artifacts = tmp_path / "artifacts"
    pushed = push_file(log, artifacts, {"user_id": "customer", "item_id": "sku"})
    assert pushed.accepted == 2
    assert [r["index"] for r in pushed.rejected] == [2, 3]
    assert "integer" in str(pushed.rejected[0]["reason"])
    stored = _stored(artifacts)
    assert [(e.user_id, e.item_id, e.event) for e in stored] == [
        ("1", "10", "purchase"),
        ("2", "11", "view"),
    ]
    assert stored[0].timestamp == 1_796_032_800
    result = recsys(
        "events", "push", log, "--artifacts", artifacts, "--columns", "user_id=customer,item_id=sku"
    )
    assert result.returncode == 1 and "accepted 2 event(s), rejected 2" in result.stdout
    assert len(_stored(artifacts)) == 4
    missing = recsys("events", "push", tmp_path / "nope.csv", "--artifacts", artifacts)
    assert missing.returncode == 2 and "no such file" in missing.stderr


@pytest.fixture
def stream(redis_url) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    client.delete("test:events")
    return client


def test_a_stream_consumer_stores_then_acknowledges(stream, tmp_path):
    artifacts = tmp_path / "artifacts"
    stream.xadd("test:events", {"user_id": "1", "item_id": "5", "weight": "0.5"})
    stream.xadd("test:events", {"events": '[{"user_id": 2, "item_id": 6}, {"user_id": 2}]'})
    stream.xadd("test:events", {"events": "not json"})
    consumer = StreamConsumer(stream, artifacts, "test:events", "g", "c1")
    pushed = consumer.step(block_ms=100)
    assert pushed.accepted == 2 and len(pushed.rejected) == 2
    assert [(e.user_id, e.item_id, e.weight) for e in _stored(artifacts)] == [
        ("1", "5", 0.5),
        ("2", "6", 1.0),
    ]
    assert stream.xpending("test:events", "g")["pending"] == 0


def test_a_crashed_consumer_loses_nothing_and_stores_nothing_twice(stream, tmp_path, monkeypatch):
    artifacts = tmp_path / "artifacts"
    for item in range(3):
        stream.xadd("test:events", {"user_id": "1", "item_id": str(item)})
    crashing = StreamConsumer(stream, artifacts, "test:events", "g", "c1")

    def crash(*args, **kwargs):  # stored and remembered, then the process dies: no XACK
        raise SystemExit("killed")

    monkeypatch.setattr(stream, "xack", crash)
    with pytest.raises(SystemExit):
        crashing.step(block_ms=100)
    monkeypatch.undo()
    assert stream.xpending("test:events", "g")["pending"] == 3
    stream.xadd("test:events", {"user_id": "1", "item_id": "3"})
    restarted = StreamConsumer(stream, artifacts, "test:events", "g", "c1")
    restarted.run(stop=_after(2), report=lambda pushed: None)
    assert sorted(e.item_id for e in _stored(artifacts)) == ["0", "1", "2", "3"]  # each once
    assert stream.xpending("test:events", "g")["pending"] == 0
    assert sorted(pl.read_csv(p).height for p in segments(artifacts / "events")) == [1, 3]


def _after(steps: int):
    calls = iter(range(steps + 1))
    return lambda: next(calls, steps) >= steps


def test_poison_messages_go_to_the_dead_letter_stream_and_the_good_ones_are_kept(stream, tmp_path):
    """Probe: `events='5'` crashed the consumer and the good messages of its batch stayed
    unstored, on every restart."""
    artifacts = tmp_path / "artifacts"
    stream.delete("test:events:dead")
    poison = [
        {"events": "5"},
        {"events": "[1,2"},
        {"events": '"text"'},
        {"events": "[1, 2]"},
        {"user_id": b"\xff\xfe", "item_id": "3"},
    ]
    stream.xadd("test:events", {"user_id": "1", "item_id": "5"})
    for fields in poison:
        stream.xadd("test:events", fields)
    stream.xadd("test:events", {"events": '[{"user_id": 2, "item_id": 6}, {"user_id": "1_0"}]'})
    consumer = StreamConsumer(stream, artifacts, "test:events", "g", "c1")
    pushed = consumer.step(block_ms=100)
    assert pushed.accepted == 2 and len(pushed.rejected) == len(poison) + 1
    assert sorted((e.user_id, e.item_id) for e in _stored(artifacts)) == [("1", "5"), ("2", "6")]
    assert stream.xpending("test:events", "g")["pending"] == 0
    dead = stream.xrange("test:events:dead")
    assert len(dead) == len(poison) + 1
    assert all(b"_reason" in fields and b"_message" in fields for _, fields in dead)
    assert dead[-1][1][b"row"] == b'{"user_id": "1_0"}'


def test_a_poison_message_pending_after_a_crash_does_not_crash_the_restart(
    stream, tmp_path, monkeypatch
):
    artifacts = tmp_path / "artifacts"
    stream.xadd("test:events", {"events": "5"})
    stream.xadd("test:events", {"user_id": "1", "item_id": "2"})
    stream.xgroup_create("test:events", "g", id="0")
    stream.xreadgroup("g", "c1", {"test:events": ">"})  # to c1, which died before storing
    restarted = StreamConsumer(stream, artifacts, "test:events", "g", "c1")
    restarted.run(stop=_after(2), report=lambda pushed: None)
    assert [(e.user_id, e.item_id) for e in _stored(artifacts)] == [("1", "2")]
    assert stream.xpending("test:events", "g")["pending"] == 0


def test_the_default_consumer_name_is_stable_across_restarts(tmp_path):
    from recsys.event_sources import default_consumer_name

    name = default_consumer_name(tmp_path / "artifacts")
    assert name == default_consumer_name(tmp_path / "artifacts")
    assert name != default_consumer_name(tmp_path / "other")


def test_a_live_consumer_claims_what_a_dead_one_left_pending(stream, tmp_path, monkeypatch):
    """Probe: after kill -9, a restarted consumer under a new name never took the 300
    pending messages of the dead one. Half the dead one's batch was stored before it died
    (its mark says so): those are not stored twice."""
    artifacts = tmp_path / "artifacts"
    for item in range(10):
        stream.xadd("test:events", {"user_id": "1", "item_id": str(item)})
    dying = StreamConsumer(stream, artifacts, "test:events", "g", "dead-1")
    monkeypatch.setattr(stream, "xack", lambda *a, **k: (_ for _ in ()).throw(SystemExit("-9")))
    with pytest.raises(SystemExit):
        dying.step(block_ms=100, count=4)  # stored and marked 4, never acknowledged
    monkeypatch.undo()
    for item in range(10, 300):
        stream.xadd("test:events", {"user_id": "1", "item_id": str(item)})
    stream.xreadgroup("g", "dead-2", {"test:events": ">"})  # read the rest, then died
    assert stream.xpending("test:events", "g")["pending"] == 300
    alive = StreamConsumer(stream, artifacts, "test:events", "g", "alive", claim_idle_ms=1)
    deadline = time.monotonic() + 120
    alive.run(
        stop=lambda: (
            stream.xpending("test:events", "g")["pending"] == 0 or time.monotonic() > deadline
        ),
        report=lambda pushed: None,
    )
    stored = sorted(int(e.item_id) for e in _stored(artifacts))
    assert stored == list(range(300))  # every one, once
    assert stream.xpending("test:events", "g")["pending"] == 0
