"""Result and embedding cache: Redis when configured, an in-process LRU otherwise, with one
interface. Keys carry the model version, so a new version never reads an old one's
entries. Redis failures never fail a request: the call counts as a miss, the error is
counted, and Redis is left alone for a short back-off before it is tried again."""

import logging
import threading
import time
from collections import OrderedDict
from typing import Protocol
from urllib.parse import unquote

import numpy as np
import redis
from prometheus_client import Counter
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

log = logging.getLogger(__name__)

CACHE_EVENTS = Counter("recsys_cache_events_total", "Cache lookups and failures", ["event"])

# A Redis Cluster (or a managed one): redis+cluster://[user:password@]host:port,host:port,...
# (rediss+cluster:// for TLS). Each request reads or writes one key, so no command spans
# slots; flushing SCANs every primary and UNLINKs slot by slot (redis-py splits it).
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
# What a failed cache call may raise: a cluster client that cannot reach any node (or is
# refused by all of them) raises RedisClusterException, which is no RedisError.
REDIS_FAILURES = (redis.RedisError, RedisClusterException)
SLOTS = 16384


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """(host, port) of each startup node, user name and password of a cluster URL;
    ValueError for a node without a numeric port."""
    rest = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
    credentials, _, hosts = rest.rpartition("@")
    user, _, password = credentials.partition(":")
    nodes = []
    for node in filter(None, hosts.split(",")):
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("names a cluster node without host:port")
        nodes.append((host.strip("[]"), int(port)))
    if not nodes:
        raise ValueError("names no cluster node")
    return nodes, unquote(user) or None, unquote(password) or None


class Cache(Protocol):
    backend: str

    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes, ttl_seconds: int) -> None: ...

    def healthy(self) -> bool: ...

    def flush(self, prefix: str) -> int:
        """Delete every key starting with `prefix`; how many were deleted."""
        ...


class LruCache:
    """Bounded, thread-safe, with per-entry expiry."""

    backend = "memory"

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is None or hit[0] < time.monotonic():
                self._data.pop(key, None)
                return None
            self._data.move_to_end(key)
            return hit[1]

    def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        if self.entries == 0:
            return
        with self._lock:
            self._data[key] = (time.monotonic() + ttl_seconds, value)
            self._data.move_to_end(key)
            while len(self._data) > self.entries:
                self._data.popitem(last=False)

    def healthy(self) -> bool:
        return True

    def flush(self, prefix: str) -> int:
        with self._lock:
            doomed = [key for key in self._data if key.startswith(prefix)]
            for key in doomed:
                del self._data[key]
        return len(doomed)


class RedisCache:
    """Redis with millisecond timeouts and a back-off after failures. One connection per
    worker (the client's lock serialises the few thread-pool callers): checking a
    connection out of a pool and back costs a fifth of a cache hit. That client connects
    when it is made, so it is made on first use, inside the error handling: a worker starts
    whether or not Redis is up."""

    backend = "redis"

    def __init__(self, url: str, timeout_ms: int, retry_seconds: float) -> None:
        timeout = timeout_ms / 1000
        self.url, self.timeout = url, timeout
        self.cluster = url.startswith(CLUSTER_SCHEMES)
        self._pool = (
            None
            if self.cluster
            else redis.ConnectionPool.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
            )
        )
        self._client: redis.Redis | RedisCluster | None = None
        self._nodes: dict[str, redis.Redis] = {}  # cluster: a connection to each primary
        self._slots: list[redis.Redis | None] = [None] * SLOTS  # cluster: slot -> its primary
        self.retry_seconds = retry_seconds
        self._down_until = 0.0

    @property
    def client(self) -> redis.Redis | RedisCluster:
        """Raises redis.RedisError when Redis cannot be reached (a cluster client asks a
        startup node for the slot map when it is made)."""
        if self._client is None:
            if self.cluster:
                nodes, user, password = cluster_nodes(self.url)
                self._client = RedisCluster(
                    startup_nodes=[ClusterNode(host, port) for host, port in nodes],
                    username=user,
                    password=password,
                    ssl=self.url.startswith("rediss+"),
                    socket_timeout=self.timeout,
                    socket_connect_timeout=self.timeout,
                    # A failed node is a miss now, not a retry loop inside a request: the
                    # back-off below keeps the service off the cache; the next call after
                    # it reads the new slot map.
                    cluster_error_retry_attempts=1,
                )
            else:
                self._client = redis.Redis(
                    connection_pool=self._pool, single_connection_client=True
                )
        return self._client

    def _for_key(self, key: str) -> redis.Redis | RedisCluster:
        """The client that holds `key`. On a cluster: a single connection to the primary
        that the slot map names for its slot, found once per slot, so a hit costs one
        round trip and no pool checkout (RedisCluster's own command path took 50 us per
        GET here, against 26 us on one node); a MOVED answer or a failed node is a
        failure like any other, and the slot map is read again after the back-off."""
        if not self.cluster:
            return self.client
        slot = key_slot(key.encode())
        client = self._slots[slot]
        if client is None:
            client = self._slots[slot] = self._primary_of(slot)
        return client

    def _primary_of(self, slot: int) -> redis.Redis:
        cluster = self.client
        assert isinstance(cluster, RedisCluster)
        node = cluster.nodes_manager.get_node_from_slot(slot)
        client = self._nodes.get(node.name)
        if client is None:
            _, user, password = cluster_nodes(self.url)
            client = redis.Redis(
                host=node.host,
                port=node.port,
                username=user,
                password=password,
                ssl=self.url.startswith("rediss+"),
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                single_connection_client=True,
            )
            self._nodes[node.name] = client
        return client

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        CACHE_EVENTS.labels("error").inc()
        if self.cluster:  # a node failed over or left: ask for the slot map again
            self._client = None
            for client in self._nodes.values():
                client.close()
            self._nodes = {}
            self._slots = [None] * SLOTS
        self._down_until = time.monotonic() + self.retry_seconds
        log.warning("redis unavailable (%s); serving uncached for %.1fs", exc, self.retry_seconds)

    def get(self, key: str) -> bytes | None:
        if not self._available():
            CACHE_EVENTS.labels("skipped").inc()
            return None
        try:
            value = self._for_key(key).get(key)
        except REDIS_FAILURES as exc:
            self._failed(exc)
            return None
        return value if isinstance(value, bytes) else None

    def set(self, key: str, value: bytes, ttl_seconds: int) -> None:
        if not self._available():
            return
        try:
            self._for_key(key).set(key, value, ex=ttl_seconds)
        except REDIS_FAILURES as exc:
            self._failed(exc)

    def healthy(self) -> bool:
        try:
            return bool(self.client.ping())
        except REDIS_FAILURES:
            return False

    def flush(self, prefix: str) -> int:
        """SCAN + UNLINK in batches (never KEYS, which blocks the server); raises
        redis.RedisError when Redis is unavailable."""
        try:
            return self._flush(prefix)
        except RedisClusterException as exc:
            raise redis.ConnectionError(f"no node of the cluster answers ({exc})") from exc

    def _flush(self, prefix: str) -> int:
        deleted, batch = 0, []
        for key in self.client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) == 1000:
                deleted += int(self.client.unlink(*batch))
                batch = []
        if batch:
            deleted += int(self.client.unlink(*batch))
        return deleted


class TieredCache:
    """A small per-worker tier in front of Redis. A hit there skips the Redis round trip,
    which the event loop waits out (redis-py is synchronous: ~150 us of a ~300 us hit).

    Keys name the version, its catalogue generation and a user's posted-event sequence,
    so a switch, a catalogue change or a user's new event makes new keys: nothing goes
    stale from those. What a key cannot say is an admin flush (or an entry Redis evicted
    or let expire): a worker's copy lives at most `seconds`, so a flush reaches every
    worker within that."""

    def __init__(self, shared: Cache, entries: int, seconds: float) -> None:
        self.shared, self.seconds = shared, seconds
        self.local = LruCache(entries)
        self.backend = shared.backend

    def get(self, key: str) -> bytes | None:
        value = self.local.get(key)
        if value is None:
            value = self.shared.get(key)
            if value is not None:
                self.local.set(key, value, self.seconds)
        return value

    def set(self, key: str, value: bytes, ttl_seconds: int) -> None:
        self.shared.set(key, value, ttl_seconds)
        self.local.set(key, value, min(self.seconds, ttl_seconds))

    def healthy(self) -> bool:
        return self.shared.healthy()

    def flush(self, prefix: str) -> int:
        self.local.flush(prefix)
        return self.shared.flush(prefix)


def make_cache(
    redis_url: str | None,
    timeout_ms: int,
    retry_seconds: float,
    lru_entries: int,
    local_entries: int = 0,
    local_seconds: float = 1.0,
) -> Cache:
    """Redis (behind a per-worker tier of `local_entries`, if any), or without a Redis URL
    an in-process LRU."""
    if not redis_url:
        return LruCache(lru_entries)
    shared = RedisCache(redis_url, timeout_ms, retry_seconds)
    if local_entries and local_seconds > 0:
        return TieredCache(shared, local_entries, local_seconds)
    return shared


def pack_results(items: np.ndarray, scores: np.ndarray) -> bytes:
    """Compact binary value: uint32 item indices followed by float32 scores."""
    return items.astype("<u4").tobytes() + scores.astype("<f4").tobytes()


def unpack_results(value: bytes) -> tuple[np.ndarray, np.ndarray]:
    n = len(value) // 8
    return (
        np.frombuffer(value[: 4 * n], dtype="<u4").astype(np.int64),
        np.frombuffer(value[4 * n :], dtype="<f4").copy(),
    )
