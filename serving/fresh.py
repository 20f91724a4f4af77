"""Events newer than the served version, per user, as every worker sees them.

The event segments (`features.event_log`) are the source of truth: each worker reads them
from the offsets its version absorbed at build time, so what a version already holds is
never counted again, and a restarted worker or a flushed Redis loses nothing. A worker
reads its own writes at once and the other workers' segments every poll
(`RECSYS_EVENTS_POLL_SECONDS`), so an event reaches every worker's answers within a poll.
A user's sequence number (how many of their events this worker has taken) goes into the
cache key, so an answer cached before an event is never served after it.

Why a cap per user: the user tower reads a user's most recent events only (at most
`RECSYS_FRESH_EVENTS_PER_USER`, 1,000 by default, the longest history a request may give),
so older ones are dropped from memory as new ones come; the sequence number still counts
every event. 100,000 events posted for one user cost that user's answers as much as 1,000.
"""

import threading
from dataclasses import dataclass, field
from pathlib import Path

from features.event_log import Event, read_new, segments
from features.event_stream import START, STREAM_MARK, EventStream

DEFAULT_PER_USER = 1000


@dataclass
class UserEvents:
    items: list[str] = field(default_factory=list)  # raw item IDs as text, oldest first
    weights: list[float] = field(default_factory=list)
    sequence: int = 0  # every event taken for the user, also those no longer held


class FreshEvents:
    """The events of `directory` after the offsets in `absorbed` (segment name -> bytes),
    and of the shared stream, when there is one, after the entry the version absorbed."""

    def __init__(
        self,
        directory: Path,
        absorbed: dict[str, int | str] | None = None,
        event_weights: dict[str, float] | None = None,
        per_user: int = DEFAULT_PER_USER,
        stream: EventStream | None = None,
    ) -> None:
        self.directory = directory
        self.per_user = per_user
        self.event_weights = dict(event_weights or {})  # the version's --event-weights
        absorbed = dict(absorbed or {})
        self.stream = stream
        self.position = str(absorbed.pop(STREAM_MARK, START))  # the stream's last entry taken
        self.offsets: dict[str, int] = {k: int(v) for k, v in absorbed.items()}
        self.users: dict[str, UserEvents] = {}
        self.count = 0
        self._lock = threading.Lock()

    def _take(self, events: list[Event]) -> None:
        for e in events:
            held = self.users.setdefault(str(e.user_id), UserEvents())
            held.items.append(str(e.item_id))
            held.weights.append(self.event_weights.get(e.event or "", e.weight))
            held.sequence += 1
            if len(held.items) >= 2 * self.per_user:  # trimmed in bulk: amortised O(1)
                del held.items[: -self.per_user], held.weights[: -self.per_user]
        self.count += len(events)

    def read(self, path: Path) -> int:
        """Take the new whole lines of one segment; how many events they held."""
        with self._lock:
            start = self.offsets.get(path.name, 0)
            try:
                if path.stat().st_size <= start:
                    return 0
                events, end = read_new(path, start)
            except FileNotFoundError:  # pruned after a build absorbed it
                return 0
            self.offsets[path.name] = end
            self._take(events)
            return len(events)

    def read_stream(self) -> int:
        """Take the stream's entries after the last one taken; how many events they held.
        An unreachable stream is logged once per outage and read again on the next poll."""
        if self.stream is None:
            return 0
        stream = self.stream
        with self._lock:
            read = stream.polled(lambda: stream.read_after(self.position))
            if read is None:
                return 0
            events, self.position = read
            self._take(events)
            return len(events)

    def poll(self) -> int:
        """Take what every segment, and the shared stream, gained since the last poll."""
        return sum(self.read(path) for path in segments(self.directory)) + self.read_stream()

    def sequence_of(self, user: str) -> int:
        """How many events this worker has taken for the user (0 for none), without the
        lock: one read of an int."""
        held = self.users.get(user)
        return 0 if held is None else held.sequence

    def of_user(self, user: str) -> UserEvents | None:
        """A copy of the user's events (None, without taking the lock, for a user who has
        none: the common case, on every request)."""
        if user not in self.users:
            return None
        with self._lock:
            held = self.users[user]
            last = self.per_user
            return UserEvents(held.items[-last:], held.weights[-last:], held.sequence)
