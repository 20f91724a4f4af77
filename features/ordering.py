"""Whether a log's row order means time: a sequence (history = the events before) or a set
(history = the user's other items).

Row order alone never means time: files arrive sorted by user, by item, by anything. Only
timestamps order events, and only when they separate a user's events; where most of a
user's events share one timestamp (a bulk import date), the log is treated as a set.
"""

import enum
from dataclasses import dataclass

import polars as pl

from recsys.core import schema as s

# A log is a set when, on average, an event shares its timestamp with at least this share
# of its user's other events (MovieLens-100K, rated in bursts of seconds: 0.02; a log
# stamped with its export date: 1.0).
MAX_SIMULTANEOUS_SHARE = 0.5


class Ordering(enum.Enum):
    SEQUENCE = "sequence"  # timestamps order each user's events; ties are unordered
    SET = "set"  # no usable time: each user's items are an unordered set


@dataclass(frozen=True)
class OrderingDecision:
    ordering: Ordering
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"ordering": self.ordering.value, "reason": self.reason}


def detect_ordering(interactions: pl.DataFrame | pl.LazyFrame) -> OrderingDecision:
    """Decide from the timestamps alone (never from row order)."""
    stats = (
        interactions.lazy()
        .select(
            pl.col(s.TIMESTAMP).null_count().alias("nulls"),
            pl.len().alias("rows"),
            # Of the user's *other* events, the share at this event's timestamp; users
            # with one event have no order to lose and do not count.
            ((pl.len().over(s.USER_IDX, s.TIMESTAMP) - 1) / (pl.len().over(s.USER_IDX) - 1))
            .filter(pl.len().over(s.USER_IDX) > 1)
            .mean()
            .alias("simultaneous"),
        )
        .collect()
    )
    rows, nulls = int(stats["rows"][0]), int(stats["nulls"][0])
    if rows == 0 or nulls == rows:
        return OrderingDecision(Ordering.SET, "the log has no timestamps")
    share = float(stats["simultaneous"][0] or 0.0)
    described = (
        f"an event shares its timestamp with {share:.1%} of its user's other events on average"
    )
    if share >= MAX_SIMULTANEOUS_SHARE:
        return OrderingDecision(
            Ordering.SET, f"{described} (>= {MAX_SIMULTANEOUS_SHARE:.0%}: time does not order)"
        )
    return OrderingDecision(Ordering.SEQUENCE, f"{described}; events with one timestamp are ties")


def row_key(seed: int = 0) -> pl.Expr:
    """A pseudo-random key of each (user, item) pair that does not depend on row order:
    it breaks ties between simultaneous events and draws set-mode holdouts."""
    return pl.struct(pl.col(s.USER_IDX), pl.col(s.ITEM_IDX)).hash(seed)
