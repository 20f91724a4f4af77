"""Validation of posted events, row by row, with the log format's rules: a bad row is
rejected with its index and a reason, and the good rows of the same request are kept.
IDs must have the served catalogue's type (integers when its IDs are integers), so that
the event files never mix types that a build would read differently."""

import math
import time
from datetime import UTC, datetime
from typing import Any

from features.event_log import COLUMNS, Event
from recsys.core import schema as s
from recsys.core.ids import (
    LATEST_SECONDS,
    MAX_EVENT_CHARS,
    IdError,
    checked_id,
    checked_text,
    checked_weight,
)


class RowError(ValueError):
    """Why one event row was refused."""


def _identifier(value: Any, column: str, integers: bool) -> int | str:
    try:
        return checked_id(value, column, integers)
    except IdError as exc:
        raise RowError(str(exc)) from None


def _timestamp(value: Any, now: float) -> int:
    """Integer seconds since the epoch from a number or ISO-8601 text (naive text: UTC);
    absent: the time of receipt."""
    if value is None:
        return int(now)
    if isinstance(value, bool):
        raise RowError("timestamp must be seconds since the epoch or ISO-8601 text")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond a double (10**400)
            raise RowError("timestamp out of range (0 to year 9999)") from None
    elif isinstance(value, str):
        try:
            text = checked_text(value, "timestamp", 64)
        except IdError as exc:
            raise RowError(str(exc)) from None
        try:
            seconds = float(text)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                raise RowError(f"unparsable timestamp {text[:40]!r}") from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            seconds = parsed.timestamp()
    else:
        raise RowError("timestamp must be seconds since the epoch or ISO-8601 text")
    if not math.isfinite(seconds) or not 0 <= seconds <= LATEST_SECONDS:
        raise RowError("timestamp out of range (0 to year 9999)")
    return math.floor(seconds)


def _weight(value: Any) -> float:
    if value is None:
        return 1.0
    try:
        return checked_weight(value)
    except IdError as exc:
        raise RowError(str(exc)) from None


def _event_type(value: Any) -> str | None:
    """The event's type: printable one-line text (a CR, NUL or lone surrogate stored in a
    segment would break every reader), or None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return checked_text(value, "event", MAX_EVENT_CHARS)
    except IdError as exc:
        raise RowError(str(exc)) from None


def _printable(name: object) -> str:
    """A column name fit to send back (a lone surrogate cannot be encoded as JSON)."""
    text = str(name)
    return text[:40] if text.isprintable() else ascii(text)[:40]


def parse_event(row: Any, integer_users: bool, integer_items: bool, now: float) -> Event:
    """One posted row as an `Event`, or RowError saying why not."""
    if not isinstance(row, dict):
        raise RowError("an event is an object with user_id and item_id")
    unknown = sorted(_printable(k) for k in row if k not in COLUMNS)
    if unknown:
        raise RowError(f"unknown column(s) {', '.join(unknown)}; allowed: {', '.join(COLUMNS)}")
    for column in s.REQUIRED_COLUMNS:
        if row.get(column) is None:
            raise RowError(f"null {column}")
    return Event(
        user_id=_identifier(row[s.USER_ID], s.USER_ID, integer_users),
        item_id=_identifier(row[s.ITEM_ID], s.ITEM_ID, integer_items),
        timestamp=_timestamp(row.get(s.TIMESTAMP), now),
        weight=_weight(row.get(s.WEIGHT)),
        event=_event_type(row.get(s.EVENT)),
    )


def parse_events(
    rows: list[Any], integer_users: bool, integer_items: bool
) -> tuple[list[Event], list[dict[str, object]]]:
    """(accepted events, rejected rows as {"index", "reason"})."""
    now = time.time()
    accepted, rejected = [], []
    for index, row in enumerate(rows):
        try:
            accepted.append(parse_event(row, integer_users, integer_items, now))
        except RowError as exc:
            rejected.append({"index": index, "reason": str(exc)})
    return accepted, rejected
