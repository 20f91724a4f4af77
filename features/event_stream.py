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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from features.catalogue_log import ItemChange, encode_change, parse_changes
from features.event_log import Event, EventStoreError, encode_lines, parse_lines

log = logging.getLogger(__name__)

T = TypeVar("T")

STREAM_MARK = "redis-stream"  # the key of a stream's position among `events_absorbed`
START = "0-0"
READ_BATCH = 1000  # entries per XRANGE


def _text(entry_id: Any) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


class EventLogSettings(BaseSettings):
    """`RECSYS_EVENT_LOG_*`: the shared log of posted events and catalogue changes, read by
    the service and by builds alike (unset URL: each host keeps its own files)."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_EVENT_LOG_", frozen=True)

    url: str | None = Field(default=None, repr=False)  # redis://[:password@]host:port/db
    stream: str = Field(default="recsys:events", min_length=1)
    catalogue_stream: str = Field(default="recsys:catalogue", min_length=1)
    replicas: int = Field(default=0, ge=0, le=16)  # 0: the server persists every write
    wait_ms: int = Field(default=1000, ge=1, le=60_000)  # how long an append waits for them

    def open(self) -> "SharedLog | None":
        """The two streams (None: no shared log is set)."""
        if not self.url:
            return None
        return SharedLog(
            EventStream(self, self.stream), CatalogueStream(self, self.catalogue_stream)
        )


class LineStream:
    """Entries of whole lines in one stream; appends acknowledged once durable."""

    def __init__(self, config: EventLogSettings, key: str) -> None:
        assert config.url
        self.config = config
        self.key = key
        self.client = redis.Redis.from_url(config.url, socket_timeout=5, socket_connect_timeout=5)
        self.down = False  # its Redis did not answer the last poll

    def polled(self, read: Callable[[], T]) -> T | None:
        """`read()` for a poller: None while this stream's Redis does not answer, logged
        once per outage (and again when it answers), never raised; the next poll retries."""
        try:
            value = read()
        except redis.RedisError as exc:
            if not self.down:
                log.error("cannot read the shared log %s (%s); retrying", self.key, exc)
            self.down = True
            return None
        if self.down:
            log.warning("the shared log %s answers again", self.key)
        self.down = False
        return value

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
                "%s: cannot read the server's persistence settings (CONFIG refused); writes "
                "are acknowledged as durable only if it persists every write",
                self.key,
            )
            return "unverified: the server refuses CONFIG"
        except redis.RedisError as exc:
            raise EventStoreError(f"the event log's Redis does not answer ({exc})") from exc
        if settings.get("appendonly") == "yes" and settings.get("appendfsync") == "always":
            return "the server appends and fsyncs every write (appendfsync always)"
        raise EventStoreError(
            "the event log's Redis would lose acknowledged writes on a restart: set "
            "`appendonly yes` and `appendfsync always` on it, or RECSYS_EVENT_LOG_REPLICAS=N "
            "to wait for N replicas"
        )

    def append_lines(self, lines: bytes) -> str:
        """Store `lines` as one entry; returns its ID once it is durable."""
        try:
            entry = self.client.xadd(self.key, {"lines": lines})
            if self.config.replicas > 0:
                copies = int(self.client.wait(self.config.replicas, self.config.wait_ms))
                if copies < self.config.replicas:
                    raise EventStoreError(
                        f"only {copies} of {self.config.replicas} replica(s) took the write "
                        f"within {self.config.wait_ms} ms"
                    )
        except redis.RedisError as exc:
            raise EventStoreError(f"the event log's Redis failed ({type(exc).__name__})") from exc
        return _text(entry)

    def lines_after(self, position: str, upto: str = "+") -> tuple[list[bytes], str]:
        """The entries after `position` (up to `upto`), and the position after them."""
        found: list[bytes] = []
        while True:
            entries: list[Any] = list(
                self.client.xrange(self.key, min=f"({position}", max=upto, count=READ_BATCH) or []
            )
            for entry_id, fields in entries:
                position = _text(entry_id)
                found.append(bytes((fields or {}).get(b"lines", b"")))
            if len(entries) < READ_BATCH:
                return found, position

    def last_id(self) -> str:
        """The ID of the newest entry (START when the stream is empty or missing)."""
        entries = self.client.xrevrange(self.key, count=1)
        return _text(entries[0][0]) if entries else START


class EventStream(LineStream):
    """Posted events, one entry per request."""

    def append(self, events: list[Event]) -> str:
        return self.append_lines(encode_lines(events))

    def read_after(self, position: str, upto: str = "+") -> tuple[list[Event], str]:
        """Events of the entries after `position` (up to `upto`), and the new position."""
        entries, position = self.lines_after(position, upto)
        events: list[Event] = []
        for lines in entries:
            events += parse_lines(lines, skip_header=False, source=self.key)
        return events, position


@dataclass(frozen=True)
class SharedLog:
    events: "EventStream"
    catalogue: "CatalogueStream"

    def check_durable(self) -> str:
        self.catalogue.check_durable()
        return self.events.check_durable()


class CatalogueStream(LineStream):
    """Catalogue changes (`PUT /admin/items`), one entry per change, replayed whole by
    every reader as the changes file is (the last change of an item wins)."""

    def append(self, change: ItemChange) -> str:
        return self.append_lines(encode_change(change))

    def read_after(self, position: str) -> tuple[list[ItemChange], str]:
        entries, position = self.lines_after(position)
        return parse_changes(b"".join(entries), self.key), position
