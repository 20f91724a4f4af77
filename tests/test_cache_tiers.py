"""The per-worker tier in front of Redis: a hit it holds skips the round trip, and what a
key cannot say (an admin flush, an entry Redis dropped) reaches every worker within the
tier's seconds. Two caches on one real Redis stand for two workers."""

import time

import redis

from serving.cache import RedisCache, TieredCache, make_cache


def _until(predicate, seconds: float = 30.0) -> bool:
    """Poll until `predicate()` holds or a deadline generous for a busy machine passes."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_a_worker_answers_from_its_own_tier_without_asking_redis(redis_url):
    cache = make_cache(redis_url, 50, 1.0, 0, local_entries=100, local_seconds=60.0)
    assert isinstance(cache, TieredCache) and cache.backend == "redis"
    cache.set("recsys:v1:user:1", b"answer", 600)
    redis.Redis.from_url(redis_url).delete("recsys:v1:user:1")  # Redis no longer has it
    assert cache.get("recsys:v1:user:1") == b"answer"


def test_a_hit_from_redis_is_kept_by_the_worker_that_read_it(redis_url):
    writer = make_cache(redis_url, 50, 1.0, 0, local_entries=100, local_seconds=60.0)
    reader = make_cache(redis_url, 50, 1.0, 0, local_entries=100, local_seconds=60.0)
    writer.set("recsys:v1:user:2", b"answer", 600)
    assert reader.get("recsys:v1:user:2") == b"answer"
    redis.Redis.from_url(redis_url).delete("recsys:v1:user:2")
    assert reader.get("recsys:v1:user:2") == b"answer"


def test_a_flush_on_one_worker_reaches_the_others_within_the_tiers_seconds(redis_url):
    one = make_cache(redis_url, 50, 1.0, 0, local_entries=100, local_seconds=0.2)
    other = make_cache(redis_url, 50, 1.0, 0, local_entries=100, local_seconds=0.2)
    one.set("recsys:v1:user:3", b"answer", 600)
    assert other.get("recsys:v1:user:3") == b"answer"  # now in the other worker's tier
    assert one.flush("recsys:") == 1
    assert one.get("recsys:v1:user:3") is None  # the flushing worker at once
    assert _until(lambda: other.get("recsys:v1:user:3") is None)  # the others after 0.2 s


def test_an_answer_redis_dropped_leaves_every_worker_within_the_tiers_seconds(redis_url):
    """Redis's expiry or eviction is a key's end the key cannot say: a worker's copy,
    written or read, lives no longer than the tier's seconds (nor than the TTL)."""
    writer = make_cache(redis_url, 50, 1.0, 0, local_entries=100, local_seconds=0.2)
    reader = make_cache(redis_url, 50, 1.0, 0, local_entries=100, local_seconds=0.2)
    writer.set("recsys:v1:user:4", b"answer", 600)
    assert reader.get("recsys:v1:user:4") == b"answer"
    redis.Redis.from_url(redis_url).delete("recsys:v1:user:4")
    assert _until(lambda: writer.get("recsys:v1:user:4") is None)
    assert _until(lambda: reader.get("recsys:v1:user:4") is None)


def test_no_tier_when_it_is_switched_off(redis_url):
    assert isinstance(make_cache(redis_url, 50, 1.0, 0, local_entries=0), RedisCache)
    assert isinstance(make_cache(redis_url, 50, 1.0, 0, 100, local_seconds=0.0), RedisCache)
