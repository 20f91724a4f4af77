"""Events from producers that are not HTTP clients, into the same segments as
`POST /v1/events` (same rules, row by row): a file (`recsys events push`) and a Redis
stream read by a consumer group (`recsys events consume`).

The stream consumer acknowledges a message only after its events are on disk, so a crash
never loses one. It remembers the IDs of the last batch it wrote beside its segment
(written after the events), and on restart skips redelivered messages among them, so a
message is not written twice either (barring a crash between the two fsyncs). The same
mark lets a live consumer claim a dead one's pending messages without storing twice what
the dead one had stored. Messages that are no events go to a dead-letter stream."""

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import redis

from features.event_log import COLUMNS, Event, SegmentWriter, events_dir, segments
from features.event_stream import STREAM_MARK, EventLogSettings, EventStream
from features.sources import CSV_SUFFIXES, scan_table
from recsys.core import schema as s
from recsys.core.layout import VersionLayout
from recsys.core.versions import VersionStore
from serving.event_rows import RowError, parse_event

log = logging.getLogger(__name__)


@dataclass
class Pushed:
    accepted: int = 0
    rejected: list[dict[str, object]] = field(default_factory=list)


def integer_ids(artifacts: Path) -> tuple[bool, bool]:
    """Whether the current version's user and item IDs are integers (no version: yes, and
    then text IDs are refused as they would be by the service)."""
    store = VersionStore(artifacts)
    if not store.current_name():
        return True, True
    layout = VersionLayout(store.current())
    return tuple(  # type: ignore[return-value]
        pl.read_parquet_schema(layout.vocabulary(c))["id"].is_integer()
        for c in (s.USER_ID, s.ITEM_ID)
    )


def _validated(
    rows: list[dict[str, Any]], integers: tuple[bool, bool], first: int = 0
) -> tuple[list[Event], list[dict[str, object]]]:
    now = time.time()
    accepted, rejected = [], []
    for number, row in enumerate(rows):
        given = {k: v for k, v in row.items() if v is not None}
        try:
            accepted.append(parse_event(given, *integers, now))
        except RowError as exc:
            rejected.append({"index": first + number, "reason": str(exc)})
    return accepted, rejected


def event_writer(artifacts: Path) -> SegmentWriter | EventStream:
    """Where stored events go: the hosts' shared log when RECSYS_EVENT_LOG_URL names one
    (every host reads it), else a segment of `artifacts`, as the service stores them."""
    shared = EventLogSettings().open()
    if shared is None:
        return SegmentWriter(events_dir(artifacts))
    shared.events.check_durable()
    return shared.events


def push_file(
    path: Path, artifacts: Path, columns: dict[str, str] | None = None, chunk: int = 100_000
) -> Pushed:
    """Validate a log file's rows and append the good ones durably (row numbers of the
    rejected ones start at 0, header excluded)."""
    text = (s.USER_ID, s.ITEM_ID) if path.suffix.lower() in CSV_SUFFIXES else ()
    frame = scan_table(path, string_columns=text, columns=columns)
    present = [c for c in COLUMNS if c in frame.collect_schema().names()]
    table = frame.select(present).collect()
    integers = integer_ids(artifacts)
    writer = event_writer(artifacts)
    result = Pushed()
    for start in range(0, table.height, chunk):
        accepted, rejected = _validated(table.slice(start, chunk).to_dicts(), integers, first=start)
        if accepted:
            writer.append(accepted)
        result.accepted += len(accepted)
        result.rejected += rejected
    return result


class PoisonMessage(ValueError):
    """A stream message that is no event and no batch of events."""


def _message_rows(fields: dict[bytes, bytes]) -> list[dict[str, Any]]:
    """A stream message is one event (its fields are the columns) or a batch (one field
    `events` holding a JSON list of objects); PoisonMessage saying why not."""
    try:
        decoded = {k.decode(): v.decode() for k, v in fields.items()}
    except UnicodeDecodeError:
        raise PoisonMessage("a field is not UTF-8") from None
    if set(decoded) == {"events"}:
        try:
            rows = json.loads(decoded["events"])
        except ValueError as exc:
            raise PoisonMessage(f"events is not JSON ({exc})") from None
        rows = rows if isinstance(rows, list) else [rows]
        if not all(isinstance(r, dict) for r in rows):
            raise PoisonMessage("events must hold a JSON object or a list of objects")
        return rows
    parsed: dict[str, Any] = dict(decoded)
    if "weight" in parsed:
        with contextlib.suppress(ValueError):  # else refused with its reason by the row rules
            parsed["weight"] = float(parsed["weight"])
    return [parsed]


def default_consumer_name(artifacts: Path) -> str:
    """The same name on every start of a consumer on this host for these artifacts, so a
    restarted consumer takes its own pending messages first."""
    where = hashlib.blake2b(str(artifacts.resolve()).encode(), digest_size=4).hexdigest()
    return f"{socket.gethostname()}-{where}"


Message = tuple[bytes, dict[bytes, bytes]]


class StreamConsumer:
    """XREADGROUP from `stream` as `consumer` of `group`; events to this consumer's own
    segment, then XACK. A message that is no event (or rows that break the event rules)
    goes to the dead-letter stream `<stream>:dead` with its reason, and is acknowledged:
    one poison message never stops the good ones nor a restart. Messages that another
    consumer of the group left pending for `claim_idle_ms` (it died) are claimed."""

    def __init__(
        self,
        client: redis.Redis,
        artifacts: Path,
        stream: str,
        group: str,
        consumer: str,
        claim_idle_ms: int = 60_000,
    ) -> None:
        self.client, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.dead_letters = f"{stream}:dead"
        self.claim_idle_ms = claim_idle_ms
        self.artifacts = artifacts
        self.writer = event_writer(artifacts)
        self.integers = integer_ids(artifacts)
        try:
            client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _mark(self, consumer: str) -> Path:
        return events_dir(self.artifacts) / f".stream-{self.group}-{consumer}.last"

    def _written(self, consumer: str) -> Callable[[str], bool]:
        """Whether `consumer` stored a message before it could acknowledge it: its mark
        lists the IDs of the last batch it stored (an older mark holds one ID, and every
        message up to it counts as stored)."""
        try:
            text = self._mark(consumer).read_text().strip()
        except FileNotFoundError:
            return lambda _: False
        if text.startswith("{"):
            ids = set(json.loads(text)["ids"])
            return lambda message_id: message_id in ids
        done = _ordered(text or "0-0")
        return lambda message_id: _ordered(message_id) <= done

    def _remember(self, ids: list[str]) -> None:
        mark = self._mark(self.consumer)
        mark.parent.mkdir(parents=True, exist_ok=True)
        temporary = mark.with_suffix(".tmp")
        with temporary.open("w") as handle:
            handle.write(json.dumps({"ids": ids}))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, mark)

    def _dead_letter(self, message_id: str, fields: dict[bytes, bytes], reason: str) -> None:
        entry: dict[Any, Any] = {**fields, b"_message": message_id, b"_reason": reason}
        self.client.xadd(self.dead_letters, entry)
        log.warning("stream message %s to %s: %s", message_id, self.dead_letters, reason)

    def _store(self, messages: list[Message], written: Callable[[str], bool]) -> Pushed:
        """Dead letters first, then the events durably, then the mark, then XACK: a crash
        anywhere loses no event and stores none twice (a dead letter may be sent twice)."""
        result = Pushed()
        events: list[Event] = []
        ids = [raw_id.decode() for raw_id, _ in messages]
        for message_id, (_, fields) in zip(ids, messages, strict=True):
            if written(message_id) or not fields:
                continue  # stored before a crash, or deleted from the stream
            try:
                rows = _message_rows(fields)
            except PoisonMessage as exc:
                self._dead_letter(message_id, fields, str(exc))
                result.rejected.append({"message": message_id, "reason": str(exc)})
                continue
            accepted, rejected = _validated(rows, self.integers)
            for problem in rejected:
                index = int(str(problem["index"]))
                row = json.dumps(rows[index], ensure_ascii=True, default=str)
                self._dead_letter(
                    message_id,
                    {b"row": row.encode(), b"_index": str(index).encode()},
                    str(problem["reason"]),
                )
            events += accepted
            result.rejected += [{"message": message_id, **r} for r in rejected]
        if events:
            self.writer.append(events)
        self._remember(ids)
        self.client.xack(self.stream, self.group, *[m[0] for m in messages])
        result.accepted = len(events)
        return result

    def step(self, block_ms: int = 1000, count: int = 1000, pending: bool = False) -> Pushed:
        """Read one batch (with `pending`: this consumer's unacknowledged messages, as after
        a crash), write it, acknowledge it."""
        answer = self.client.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: "0" if pending else ">"},
            count,
            None if pending else block_ms,  # pending entries come back at once
        )
        replies: list[tuple[bytes, list[Message]]] = answer or []  # type: ignore[assignment]
        messages = [m for _, batch in replies for m in batch]
        if not messages:
            return Pushed()
        return self._store(messages, self._written(self.consumer))

    def claim(self, count: int = 1000) -> Pushed:
        """Take over messages that other consumers of the group left unacknowledged for
        `claim_idle_ms` (they died: a restart under another name, a lost host), skipping
        those their owner had already stored (its mark)."""
        entries: list[dict[str, Any]] = self.client.xpending_range(
            self.stream, self.group, min="-", max="+", count=count, idle=self.claim_idle_ms
        )
        owners: dict[str, list[Any]] = {}
        for entry in entries:
            owner = entry["consumer"].decode()
            if owner != self.consumer:
                owners.setdefault(owner, []).append(entry["message_id"])
        result = Pushed()
        for owner, ids in owners.items():
            claimed: list[Message] = self.client.xclaim(  # type: ignore[assignment]
                self.stream, self.group, self.consumer, self.claim_idle_ms, ids
            )
            claimed = [m for m in claimed if m[1] is not None]
            if claimed:
                log.warning("claimed %d message(s) left pending by %s", len(claimed), owner)
                taken = self._store(claimed, self._written(owner))
                result.accepted += taken.accepted
                result.rejected += taken.rejected
        return result

    def run(self, stop: Callable[[], bool], report: Callable[[Pushed], None]) -> None:
        """Catch up on this consumer's pending messages, then follow the stream, claiming
        dead consumers' messages now and then."""
        while not stop():
            pushed = self.step(pending=True)
            if not pushed.accepted and not pushed.rejected:
                break
            report(pushed)
        last_claim = 0.0
        while not stop():
            if time.monotonic() - last_claim >= self.claim_idle_ms / 1000 / 2:
                last_claim = time.monotonic()
                claimed = self.claim()
                if claimed.accepted or claimed.rejected:
                    report(claimed)
            pushed = self.step(block_ms=min(1000, max(self.claim_idle_ms // 2, 1)))
            if pushed.accepted or pushed.rejected:
                report(pushed)


def _ordered(message_id: str) -> tuple[int, int]:
    millis, _, sequence = message_id.partition("-")
    return int(millis), int(sequence or 0)


def prune_segments(artifacts: Path, older_than_days: float) -> list[str]:
    """Delete the event segments that the current version absorbed whole and that have
    not been written to for `older_than_days`; their names. Every build reads every
    segment, so pruning drops those events from later builds: run it when your own log
    (`--data`) has them too, or when they are older than the window you train on. Under
    the build lock, so a build never loses a segment it is reading."""
    from recsys.core.artifacts import read_manifest
    from recsys.core.lock import build_lock

    store = VersionStore(artifacts)
    if not store.current_name():
        return []
    with build_lock(artifacts):
        absorbed = read_manifest(store.current(), verify=False).get("events_absorbed", {})
        cutoff = time.time() - older_than_days * 86_400
        pruned = []
        for path in segments(events_dir(artifacts)):
            stat = path.stat()
            if absorbed.get(path.name) == stat.st_size and stat.st_mtime <= cutoff:
                path.unlink()
                pruned.append(path.name)
        shared = EventLogSettings().open()
        mark = absorbed.get(STREAM_MARK)
        if shared is not None and isinstance(mark, str):
            trimmed = trim_absorbed(shared.events, mark, cutoff)
            if trimmed:
                pruned.append(f"{shared.events.key}: {trimmed} entries")
        return pruned


def trim_absorbed(stream: EventStream, mark: str, cutoff: float) -> int:
    """Delete the shared log's entries up to `mark` (what the current version absorbed)
    that are older than `cutoff` (seconds since the epoch; entry IDs carry their time)."""
    millis, sequence = _ordered(mark)
    oldest_kept = f"{millis}-{sequence + 1}"
    if millis > cutoff * 1000:
        oldest_kept = f"{int(cutoff * 1000)}-0"
    return int(stream.client.xtrim(stream.key, minid=oldest_kept, approximate=False))
