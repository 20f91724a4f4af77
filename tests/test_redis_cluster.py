"""The cache on a Redis Cluster (issue 35, item 4): `REDIS_URL=redis+cluster://host:port,...`
reaches every slot, flushing reaches every primary, and a killed master costs no failed
request (its keys become misses, answered from the model and counted)."""

from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from helpers import cluster_ports, private_copy, small_version, start_redis_cluster

from data.synthetic import SyntheticConfig
from recsys.processes import served
from serving.cache import RedisCache, cluster_nodes, make_cache
from serving.settings import ServiceSettings
from training.config import TrainConfig


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ports = cluster_ports(3)
    processes = start_redis_cluster(ports, str(tmp_path_factory.mktemp("cluster")))
    yield ports, processes
    for process in processes:
        process.kill()
        process.wait()


def _url(ports: list[int]) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)


def test_cluster_urls_are_parsed_and_bad_ones_refused():
    nodes, user, password = cluster_nodes("rediss+cluster://ann:s%40cret@a:7000,b:7001/0")
    assert nodes == [("a", 7000), ("b", 7001)] and (user, password) == ("ann", "s@cret")
    for bad in ("redis+cluster://", "redis+cluster://a,b:7001", "redis+cluster://a:x"):
        with pytest.raises(ValueError):
            ServiceSettings(artifacts=Path("."), redis_url=bad)
    assert ServiceSettings(artifacts=Path("."), redis_url="redis+cluster://a:1").redis_url


def test_every_slot_is_reached_and_a_flush_reaches_every_primary(cluster):
    ports, _ = cluster
    cache = make_cache(_url(ports[:1]), 500, 1.0, 0)  # one startup node finds the rest
    assert isinstance(cache, RedisCache) and cache.healthy()
    keys = [f"rec:v1:user:{i}" for i in range(300)]
    for key in keys:
        cache.set(key, key.encode(), 60)
    assert all(cache.get(key) == key.encode() for key in keys)
    holders = {cache.client.keyslot(key) for key in keys}  # type: ignore[union-attr]
    assert len(holders) > 100  # spread over the slots, so over all three masters
    cache.set("other:1", b"x", 60)
    assert cache.flush("rec:v1:") == 300
    assert cache.get(keys[0]) is None and cache.get("other:1") == b"x"


@pytest.mark.slow  # builds a model and runs the service
def test_a_killed_master_costs_no_failed_request(cluster, tmp_path):
    ports, processes = cluster
    artifacts = private_copy(
        small_version(
            tmp_path / "v",
            SyntheticConfig(rows=3_000, users=80, items=60, seed=4),
            TrainConfig(max_epochs=1),
        ),
        tmp_path,
    )
    env = {"REDIS_URL": _url(ports), "RECSYS_REDIS_TIMEOUT_MS": "200"}
    with (
        served(artifacts, env=env, workers=2) as base,
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        first = client.get("/v1/users/3/recommendations?k=5").json()
        again = client.get("/v1/users/3/recommendations?k=5").json()
        assert not first["cached"] and again["cached"]  # through the cluster
        processes[2].kill()
        processes[2].wait()
        statuses = [
            client.get(f"/v1/users/{u}/recommendations", params={"k": k}).status_code
            for u in range(80)
            for k in (5, 10)
        ]
        assert statuses == [200] * len(statuses)
        metrics = client.get("/metrics").text
        errors = [
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith('recsys_cache_events_total{event="error"')
        ]
        assert np.sum(errors) >= 1  # counted, not hidden


def test_a_cluster_with_a_password_is_reached_and_each_key_sits_on_its_slots_primary(
    tmp_path,
):
    ports = cluster_ports(3)
    processes = start_redis_cluster(ports, str(tmp_path), password="s3cret")
    try:
        url = "redis+cluster://:s3cret@" + ",".join(f"127.0.0.1:{p}" for p in ports[:1])
        cache = make_cache(url, 500, 1.0, 0)
        keys = [f"recsys:v1:user:{i}" for i in range(60)]
        for key in keys:
            cache.set(key, key.encode(), 60)
        assert all(cache.get(key) == key.encode() for key in keys)
        per_node = [
            redis.Redis(port=port, password="s3cret").dbsize() for port in ports
        ]  # written where the cluster keeps them: no MOVED, on every primary
        assert sum(per_node) == len(keys) and all(per_node)
        assert not any(cache.get(f"absent:{i}") for i in range(10))
        wrong = make_cache(url.replace("s3cret", "wrong"), 500, 1.0, 0)
        assert wrong.get(keys[0]) is None and not wrong.healthy()  # a counted miss
    finally:
        for process in processes:
            process.kill()
            process.wait()
