"""Posted events in one Redis stream that every serving host reads: the shared log of a
service with several hosts (`RECSYS_EVENT_LOG_URL`). A single host keeps its segments.

An entry holds the whole lines of one request's events, encoded as the segments encode
them, so every reader parses them with the same code and quarantines the same bad lines.
An append is acknowledged only once the Redis that holds the stream has made it durable:
with `replicas` > 0 it waits (`WAIT`) until that many replicas have it, and otherwise the
server must persist every write itself (`appendonly yes`, `appendfsync always`), which
`check_durable` verifies before a service starts (a Redis that keeps writes in memory only
would lose acknowledged events when it restarts).

Readers remember the ID of the last entry they took. A build reads the stream from the
start up to its last entry and records that ID; a host serving the version then counts
only later entries as new, so no event is counted twice.
"""

import logging
from typing import Any

import redis
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from features.event_log import Event, EventStoreError, encode_lines, parse_lines

log = logging.getLogger(__name__)

STREAM_MARK = "redis-stream"  # the key of a stream's position among `events_absorbed`
START = "0-0"
READ_BATCH = 1000  # entries per XRANGE


def _key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def later(a: str, b: str) -> bool:
    """Whether stream ID `a` comes after `b`."""
    return _key(a) > _key(b)


class EventLogSettings(BaseSettings):
    """`RECSYS_EVENT_LOG_*`: the shared event log, read by the service and by builds
    alike (unset URL: each host keeps its own segments)."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_EVENT_LOG_", frozen=True)

    url: str | None = Field(default=None, repr=False)  # redis://[:password@]host:port/db
    stream: str = Field(default="recsys:events", min_length=1)
    replicas: int = Field(default=0, ge=0, le=16)  # 0: the server persists every write
    wait_ms: int = Field(default=1000, ge=1, le=60_000)  # how long an append waits for them

    def open(self) -> "EventStream | None":
        return None if not self.url else EventStream(self)


class EventStream:
    def __init__(self, config: EventLogSettings) -> None:
        assert config.url
        self.config = config
        self.key = config.stream
        self.client = redis.Redis.from_url(config.url, socket_timeout=5, socket_connect_timeout=5)

    def check_durable(self) -> str:
        """How this stream's writes are made durable; EventStoreError if they are not."""
        if self.config.replicas > 0:
            return f"each append waits for {self.config.replicas} replica(s) (WAIT)"
        try:
            settings: dict[Any, Any] = {
                **self.client.config_get("appendonly"),
                **self.client.config_get("appendfsync"),
            }
        except redis.ResponseError:  # a managed Redis may refuse CONFIG: say so, go on
            log.warning(
                "%s: cannot read the server's persistence settings (CONFIG refused); events "
                "are acknowledged as durable only if it persists every write",
                self.key,
            )
            return "unverified: the server refuses CONFIG"
        except redis.RedisError as exc:
            raise EventStoreError(f"the event log's Redis does not answer ({exc})") from exc
        if settings.get("appendonly") == "yes" and settings.get("appendfsync") == "always":
            return "the server appends and fsyncs every write (appendfsync always)"
        raise EventStoreError(
            "the event log's Redis would lose acknowledged events on a restart: set "
            "`appendonly yes` and `appendfsync always` on it, or RECSYS_EVENT_LOG_REPLICAS=N "
            "to wait for N replicas"
        )

    def append(self, events: list[Event]) -> str:
        """Store `events` as one entry; returns its ID once it is durable."""
        try:
            entry = self.client.xadd(self.key, {"lines": encode_lines(events)})
            if self.config.replicas > 0:
                copies = int(self.client.wait(self.config.replicas, self.config.wait_ms))
                if copies < self.config.replicas:
                    raise EventStoreError(
                        f"only {copies} of {self.config.replicas} replica(s) took the events "
                        f"within {self.config.wait_ms} ms"
                    )
        except redis.RedisError as exc:
            raise EventStoreError(f"the event log's Redis failed ({type(exc).__name__})") from exc
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def read_after(self, position: str, upto: str = "+") -> tuple[list[Event], str]:
        """Events of the entries after `position` (up to `upto`), and the new position."""
        events: list[Event] = []
        while True:
            entries: list[Any] = list(
                self.client.xrange(self.key, min=f"({position}", max=upto, count=READ_BATCH) or []
            )
            for entry_id, fields in entries:
                position = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                lines = (fields or {}).get(b"lines", b"")
                events += parse_lines(bytes(lines), skip_header=False, source=self.key)
            if len(entries) < READ_BATCH:
                return events, position

    def last_id(self) -> str:
        """The ID of the newest entry (START when the stream is empty or missing)."""
        entries = self.client.xrevrange(self.key, count=1)
        if not entries:
            return START
        entry_id = entries[0][0]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
