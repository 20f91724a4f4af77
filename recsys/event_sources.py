"""Events from producers that are not HTTP clients, into the same segments as
`POST /v1/events` (same rules, row by row): a file (`recsys events push`) and a Redis
stream read by a consumer group (`recsys events consume`).

The stream consumer acknowledges a message only after its events are on disk, so a crash
never loses one. It remembers the last message ID it wrote beside its segment (written
after the events), and on restart skips redelivered messages up to it, so a message is
not written twice either (barring a crash between the two fsyncs)."""

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import redis

from features.event_log import COLUMNS, Event, SegmentWriter, events_dir, segments
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
    writer = SegmentWriter(events_dir(artifacts))
    result = Pushed()
    for start in range(0, table.height, chunk):
        accepted, rejected = _validated(table.slice(start, chunk).to_dicts(), integers, first=start)
        if accepted:
            writer.append(accepted)
        result.accepted += len(accepted)
        result.rejected += rejected
    return result


def _message_rows(fields: dict[bytes, bytes]) -> list[dict[str, Any]]:
    """A stream message is one event (its fields are the columns) or a batch (one field
    `events` holding a JSON list)."""
    decoded = {k.decode(): v.decode() for k, v in fields.items()}
    if set(decoded) == {"events"}:
        rows = json.loads(decoded["events"])
        return rows if isinstance(rows, list) else [rows]
    parsed: dict[str, Any] = dict(decoded)
    if "weight" in parsed:
        with contextlib.suppress(ValueError):  # else refused with its reason by the row rules
            parsed["weight"] = float(parsed["weight"])
    return [parsed]


class StreamConsumer:
    """XREADGROUP from `stream` as `consumer` of `group`; events to this consumer's own
    segment, then XACK."""

    def __init__(
        self, client: redis.Redis, artifacts: Path, stream: str, group: str, consumer: str
    ) -> None:
        self.client, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.artifacts = artifacts
        self.writer = SegmentWriter(events_dir(artifacts))
        self.mark = events_dir(artifacts) / f".stream-{group}-{consumer}.last"
        self.integers = integer_ids(artifacts)
        try:
            client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _last_written(self) -> str:
        try:
            return self.mark.read_text().strip()
        except FileNotFoundError:
            return "0-0"

    def _remember(self, message_id: str) -> None:
        self.mark.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.mark.with_suffix(".tmp")
        with temporary.open("w") as handle:
            handle.write(message_id)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.mark)

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
        result = Pushed()
        replies: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] = answer or []  # type: ignore[assignment]
        messages = [m for _, batch in replies for m in batch]
        if not messages:
            return result
        done = _ordered(self._last_written())
        events: list[Event] = []
        for raw_id, fields in messages:
            message_id = raw_id.decode()
            if _ordered(message_id) <= done or not fields:
                continue  # written before a crash, or deleted from the stream
            try:
                rows = _message_rows(fields)
            except ValueError as exc:
                result.rejected.append({"message": message_id, "reason": f"not JSON ({exc})"})
                continue
            accepted, rejected = _validated(rows, self.integers)
            events += accepted
            result.rejected += [{"message": message_id, **r} for r in rejected]
        if events:
            self.writer.append(events)
        self._remember(messages[-1][0].decode())
        self.client.xack(self.stream, self.group, *[m[0] for m in messages])
        result.accepted = len(events)
        for problem in result.rejected:
            log.warning("rejected stream event: %s", problem)
        return result

    def run(self, stop: Callable[[], bool], report: Callable[[Pushed], None]) -> None:
        """Catch up on this consumer's pending messages, then follow the stream."""
        while not stop():
            pushed = self.step(pending=True)
            if not pushed.accepted and not pushed.rejected:
                break
            report(pushed)
        while not stop():
            pushed = self.step()
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
        return pruned
