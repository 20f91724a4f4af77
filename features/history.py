"""Users' item histories in CSR form: the "previous N items" of an event when time orders
the log, "N of the user's other items" when it does not (`features.ordering`).

The interactions table is sorted by (user, time, a pseudo-random key of the pair), so each
user's events are one contiguous slice. Storing offsets into it, rather than a list column
of N items per event, keeps the feature table at O(events) memory whatever N is; histories
are cut out per mini-batch with vectorised NumPy.
"""

from dataclasses import dataclass

import numpy as np
import polars as pl

from features.jagged import ranges
from features.ordering import Ordering
from recsys.core import schema as s


@dataclass(frozen=True)
class UserHistories:
    """`items[offsets[u]:offsets[u+1]]` are user u's items, oldest first in a sequence, in a
    fixed pseudo-random order in a set."""

    offsets: np.ndarray  # (U + 1,) int64
    items: np.ndarray  # (E,) int64
    timestamps: np.ndarray  # (E,) int64; all zero when the log has no timestamps
    ordering: Ordering = Ordering.SEQUENCE
    weights: np.ndarray | None = None  # (E,) float32, each event's weight (None: all 1)

    @classmethod
    def from_interactions(
        cls, frame: pl.DataFrame, num_users: int, ordering: Ordering = Ordering.SEQUENCE
    ) -> "UserHistories":
        """Build from a table sorted by (user_idx, time), as ingest writes it."""
        users = frame[s.USER_IDX].to_numpy()
        if len(users) and np.any(np.diff(users.astype(np.int64)) < 0):
            raise ValueError("interactions must be sorted by user_idx (as ingest writes them)")
        counts = np.bincount(users, minlength=num_users)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        timestamps = frame[s.TIMESTAMP].fill_null(0).to_numpy().astype(np.int64)
        items = frame[s.ITEM_IDX].to_numpy().astype(np.int64)
        weights = None
        if s.WEIGHT in frame.columns:
            weights = frame[s.WEIGHT].fill_null(1.0).to_numpy().astype(np.float32)
        return cls(offsets, items, timestamps, ordering, weights)

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    def user_of(self, events: np.ndarray) -> np.ndarray:
        """The user of each event row."""
        return np.searchsorted(self.offsets, events, side="right") - 1

    def _tie_starts(self, events: np.ndarray) -> np.ndarray:
        """The first row of each event's (user, timestamp) group: simultaneous events are
        unordered, so none of them is "before" another."""
        keys = self.timestamps[events]
        # Vectorised bisection over each user's slice (timestamps are non-decreasing in it).
        lo, hi = self.offsets[self.user_of(events)], events.copy()
        while np.any(lo < hi):
            mid = (lo + hi) // 2
            before = self.timestamps[mid] < keys
            lo = np.where(before, mid + 1, lo)
            hi = np.where(before, hi, mid)
        return lo

    def weights_of(self, rows: np.ndarray) -> np.ndarray:
        """The weights of these event rows (1 where the log has none)."""
        if self.weights is None:
            return np.ones(len(rows), dtype=np.float32)
        return self.weights[rows]

    def previous_items(self, events: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        rows, lengths = self.previous_rows(events, n)
        return self.items[rows], lengths

    def other_items(
        self, events: np.ndarray, n: int, position: np.ndarray, order: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        rows, lengths = self.other_rows(events, n, position, order)
        return self.items[rows], lengths

    def latest_items(self, users: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        rows, lengths = self.latest_rows(users, n)
        return self.items[rows], lengths

    def previous_rows(self, events: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Jagged (event rows, lengths): for each event row, up to `n` events the same user
        had strictly before it, oldest first. The event itself, events with the same
        timestamp and later events never appear."""
        if self.ordering is not Ordering.SEQUENCE:
            raise ValueError("previous items need time order; this log is a set")
        events = np.asarray(events, dtype=np.int64)
        ends = self._tie_starts(events)
        starts = np.maximum(self.offsets[self.user_of(events)], ends - n)
        lengths = ends - starts  # (B,)
        return ranges(starts, lengths), lengths

    def other_rows(
        self, events: np.ndarray, n: int, position: np.ndarray, order: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Jagged (event rows, lengths): up to `n` of the user's other events for each
        event row, never the event itself. `order` shuffles rows within each user (see `shuffled`),
        `position` is its inverse; an event takes the `n` rows after it in that order,
        wrapping around, so each item of a user is drawn without replacement."""
        events = np.asarray(events, dtype=np.int64)
        users = self.user_of(events)
        starts = self.offsets[users]
        sizes = self.offsets[users + 1] - starts
        lengths = np.minimum(n, sizes - 1)  # (B,)
        steps = ranges(np.ones(len(events), dtype=np.int64), lengths)  # 1..L per event
        within = np.repeat(position[events] - starts, lengths) + steps
        picked = np.repeat(starts, lengths) + within % np.repeat(sizes, lengths)
        return order[picked], lengths

    def shuffled(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(order, position): rows shuffled within each user's slice, and the inverse."""
        users = np.repeat(np.arange(self.num_users), np.diff(self.offsets))
        order = np.lexsort((rng.random(len(users)), users))
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        return order, position

    def latest_rows(self, users: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Jagged (event rows, lengths): each user's last `n` events, for scoring after the
        log (in a set: a fixed pseudo-random `n` of them, as ingest orders a set)."""
        users = np.asarray(users, dtype=np.int64)
        ends = self.offsets[users + 1]
        starts = np.maximum(self.offsets[users], ends - n)
        lengths = ends - starts
        return ranges(starts, lengths), lengths
