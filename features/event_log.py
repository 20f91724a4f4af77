"""Events posted between builds, stored as append-only CSV segments under
`ARTIFACTS/events/`: the log format `recsys build` reads (user_id, item_id, timestamp,
weight, event), one segment per writing process.

Why segments and whole lines: a writer appends complete lines and fsyncs them before the
service acknowledges, and every reader (the service's workers, a build) consumes only up to
the last newline. A crash mid-write leaves at most a partial last line, which no reader
ever takes, and nobody appends to it again (a process writes only its own, new segment).
A reader remembers a byte offset per segment, so it never takes an event twice; a build
records the offsets it absorbed, so the service knows which events its version holds.

Why a write is checked to the last byte: `os.write` may store only part of a payload (a
full disk, a file-size limit). The writer loops until every byte is written; if it cannot,
it truncates the segment back to where the append began, so no partial line stays for the
next append to glue onto, moves on to a new segment, and raises: nothing is acknowledged
that is not whole on disk. A line that a reader still cannot parse (written by an older
version, or damaged on disk) is quarantined: skipped, counted and logged once with its
segment and byte offset, never a crash of a reader.
"""

import csv
import errno
import io
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recsys.core import schema as s
from recsys.core.ids import LATEST_SECONDS, checked_weight

log = logging.getLogger(__name__)

EVENTS_DIR = "events"
SUFFIX = ".csv"
COLUMNS = (s.USER_ID, s.ITEM_ID, s.TIMESTAMP, s.WEIGHT, s.EVENT)
HEADER = (",".join(COLUMNS) + "\n").encode()


@dataclass(frozen=True)
class Event:
    """One event in the log's canonical form (timestamps in integer seconds)."""

    user_id: int | str
    item_id: int | str
    timestamp: int
    weight: float = 1.0
    event: str | None = None


def events_dir(artifacts: Path) -> Path:
    return artifacts / EVENTS_DIR


def segments(directory: Path) -> list[Path]:
    """Every segment, oldest name first (names start with their creation time)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix == SUFFIX and p.is_file())


class EventStoreError(OSError):
    """Events could not be stored whole; none of them was acknowledged."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_lines(events: list[Event]) -> bytes:
    """Events as whole CSV lines (no header), as every reader parses them."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    for e in events:
        writer.writerow([e.user_id, e.item_id, e.timestamp, repr(float(e.weight)), e.event or ""])
    return text.getvalue().encode()


class SegmentWriter:
    """Appends to this process's own segment, created on first use; `append` returns once
    the events are on disk (fsync'd, and the new file's directory entry too)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path: Path | None = None
        self._lock = threading.Lock()

    def _open(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{stamp}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        path = self.directory / name
        with path.open("xb") as handle:
            handle.write(HEADER)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(self.directory)
        return path

    def append(self, events: list[Event]) -> Path:
        """Write `events` durably; the segment they went to. EventStoreError, with the
        segment as it was before the call, if they could not all be written."""
        payload = encode_lines(events)
        with self._lock:
            if self.path is None:
                self.path = self._open()
            try:  # never O_CREAT: a segment pruned under us is not recreated headerless
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            except FileNotFoundError:
                self.path = self._open()
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                before = os.fstat(fd).st_size
                try:
                    _write_all(fd, payload)
                    os.fsync(fd)
                except OSError as exc:
                    name = self.path.name
                    self._undo(fd, before)
                    raise EventStoreError(
                        exc.errno, f"events not stored in {name}: {exc.strerror}"
                    ) from exc
            finally:
                os.close(fd)
            return self.path

    def _undo(self, fd: int, size: int) -> None:
        """Cut a failed append off the segment and write the next ones to a new segment
        (if the cut fails too, the partial line stays last in a segment nobody appends to,
        and readers never take a partial line)."""
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError:
            log.error("could not cut a failed append off %s", self.path)
        self.path = None


def _write_all(fd: int, payload: bytes) -> None:
    """Write every byte of `payload` (os.write may write only part of it)."""
    view = memoryview(payload)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "the disk took no bytes")
        view = view[written:]


def complete_bytes(path: Path, start: int) -> tuple[bytes, int]:
    """The whole lines of `path` from byte `start` on, and the offset after them (a
    partial last line is left for later, or for ever if its writer died)."""
    with path.open("rb") as handle:
        handle.seek(start)
        chunk = handle.read()
    end = chunk.rfind(b"\n") + 1
    return chunk[:end], start + end


QUARANTINED = {"lines": 0}  # lines no reader could parse, in this process


def _quarantine(source: str, offset: int, why: str) -> None:
    QUARANTINED["lines"] += 1
    log.warning("event segment %s, byte %d: line quarantined (%s)", source, offset, why)


def _event(line: bytes) -> Event:
    """One CSV line as SegmentWriter writes it; ValueError (or csv.Error) if it is not. The
    weight and timestamp are held to the rules a posted event meets (`recsys.core.ids`):
    a line written by another tool, or damaged, with a NaN, infinite or negative weight or
    a timestamp out of range would otherwise be served and trained on."""
    row = next(csv.reader([line.decode("utf-8")]))
    if len(row) != len(COLUMNS):
        raise ValueError(f"{len(row)} fields, expected {len(COLUMNS)}")
    user, item, timestamp, weight, event = row
    if not user.strip() or not item.strip():
        raise ValueError("empty ID")
    seconds = int(timestamp)
    if not 0 <= seconds <= LATEST_SECONDS:
        raise ValueError("timestamp out of range (0 to year 9999)")
    return Event(user, item, seconds, checked_weight(float(weight)), event or None)


def parse_lines(
    data: bytes, skip_header: bool, source: str = "events", start: int = 0
) -> list[Event]:
    """Events from whole CSV lines as `SegmentWriter` writes them (IDs as text); a line
    that is not one (`source` and the byte offset `start` of `data` name it in the log) is
    quarantined, never raised."""
    events = []
    offset = start
    for number, line in enumerate(data.split(b"\n")[:-1] if data else []):
        at, offset = offset, offset + len(line) + 1
        if (skip_header and number == 0) or not line:
            continue
        try:
            events.append(_event(line))
        except (ValueError, csv.Error, StopIteration) as exc:
            _quarantine(source, at, str(exc)[:80])
    return events


def read_new(path: Path, start: int) -> tuple[list[Event], int]:
    """Events of `path` after byte `start` (0: from the top, header skipped), and the
    offset to continue from."""
    data, end = complete_bytes(path, start)
    return parse_lines(data, skip_header=start == 0, source=path.name, start=start), end


@dataclass(frozen=True)
class EventSnapshot:
    """What a build took from the segments: a Parquet copy of their whole lines, and each
    segment's offset after them (the version records these, so the service counts only
    later events as new)."""

    path: Path | None  # None: no events
    absorbed: dict[str, int | str]  # segment -> byte offset; the stream's mark -> its ID
    rows: int


def _frame(events: list[Event]) -> pl.DataFrame:
    """Parsed events as text columns, as a CSV reader without type inference gives them."""
    return pl.DataFrame(
        {
            s.USER_ID: [str(e.user_id) for e in events],
            s.ITEM_ID: [str(e.item_id) for e in events],
            s.TIMESTAMP: [str(e.timestamp) for e in events],
            s.WEIGHT: [repr(e.weight) for e in events],
            s.EVENT: [e.event or "" for e in events],
        },
        schema=dict.fromkeys(COLUMNS, pl.String),
    )


def _typed(frame: pl.DataFrame) -> pl.DataFrame:
    """IDs as integers when every one of them is an integer (the service accepted only
    integers for a catalogue of integers; text IDs stay text), the rest in log types."""
    typed = []
    for column in (s.USER_ID, s.ITEM_ID):
        as_int = frame[column].str.to_integer(strict=False)
        typed.append(as_int if as_int.null_count() == frame[column].null_count() else frame[column])
    return frame.with_columns(
        *typed,
        pl.col(s.TIMESTAMP).str.to_integer(strict=False),
        pl.col(s.WEIGHT).cast(pl.Float64, strict=False),
        pl.when(pl.col(s.EVENT) == "").then(None).otherwise(pl.col(s.EVENT)).alias(s.EVENT),
    )


def snapshot(
    directory: Path,
    out: Path,
    columns: dict[str, str] | None = None,
    shared: tuple[str, list[Event], str] | None = None,
) -> EventSnapshot:
    """Copy the whole lines of every segment to `out` (Parquet, columns named as the log's
    files name them: `columns` maps ours -> theirs) for a build to read beside its log,
    with the events of the shared log when there is one (`shared`: its mark, its events,
    the position after them). Segments are parsed as the service parses them, so a line
    either reader cannot take is quarantined by both, never a failed build."""
    frames, absorbed = [], {}
    for path in segments(directory):
        data, end = complete_bytes(path, 0)
        absorbed[path.name] = end
        events = parse_lines(data, skip_header=True, source=path.name)
        if events:
            frames.append(_frame(events))
    absorbed_any: dict[str, int | str] = dict(absorbed)
    if shared is not None:
        mark, events, position = shared
        absorbed_any[mark] = position
        if events:
            frames.append(_frame(events))
    if not frames:
        return EventSnapshot(None, absorbed_any, 0)
    frame = _typed(pl.concat(frames, how="vertical"))
    mapping = columns or {}
    frame = frame.rename({c: mapping.get(c, c) for c in COLUMNS})
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(out)
    return EventSnapshot(out, absorbed_any, frame.height)
