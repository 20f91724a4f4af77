"""The test Redis is a real server, and each test's database starts empty."""

import redis


def test_real_redis_answers_and_starts_empty(redis_url):
    client = redis.Redis.from_url(redis_url)
    assert client.ping()
    assert client.dbsize() == 0
    client.set("recsys:test", b"\x00\xff", px=5_000)
    assert client.get("recsys:test") == b"\x00\xff"
    assert 0 < client.pttl("recsys:test") <= 5_000
