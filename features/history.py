"""Users' time-ordered item sequences in CSR form, and the "previous N items" of any event.

The cleaned interactions table is sorted by (user, time), so each user's events are one
contiguous slice. Storing offsets into it, rather than a list column of N items per event,
keeps the feature table at O(events) memory whatever N is; histories are cut out per
mini-batch with vectorised NumPy.
"""

from dataclasses import dataclass

import numpy as np
import polars as pl

from features.jagged import ranges
from recsys import schema as s


@dataclass(frozen=True)
class UserHistories:
    """`items[offsets[u]:offsets[u+1]]` are user u's items, oldest first."""

    offsets: np.ndarray  # (U + 1,) int64
    items: np.ndarray  # (E,) int64
    timestamps: np.ndarray  # (E,) int64; all zero when the log has no timestamps

    @classmethod
    def from_interactions(cls, frame: pl.DataFrame, num_users: int) -> "UserHistories":
        """Build from a table sorted by (user_idx, time), as ingest writes it."""
        users = frame[s.USER_IDX].to_numpy()
        if len(users) and np.any(np.diff(users.astype(np.int64)) < 0):
            raise ValueError("interactions must be sorted by user_idx (as ingest writes them)")
        counts = np.bincount(users, minlength=num_users)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        timestamps = frame[s.TIMESTAMP].fill_null(0).to_numpy().astype(np.int64)
        return cls(offsets, frame[s.ITEM_IDX].to_numpy().astype(np.int64), timestamps)

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    def user_of(self, events: np.ndarray) -> np.ndarray:
        """The user of each event row."""
        return np.searchsorted(self.offsets, events, side="right") - 1

    def previous_items(self, events: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Jagged (values, lengths): for each event row, up to `n` items the same user had
        before it, oldest first. The event itself and later events never appear."""
        events = np.asarray(events, dtype=np.int64)
        starts = np.maximum(self.offsets[self.user_of(events)], events - n)
        lengths = events - starts  # (B,)
        return self.items[ranges(starts, lengths)], lengths

    def latest_items(self, users: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Jagged (values, lengths): each user's last `n` items, for scoring after the log."""
        users = np.asarray(users, dtype=np.int64)
        ends = self.offsets[users + 1]
        starts = np.maximum(self.offsets[users], ends - n)
        lengths = ends - starts
        return self.items[ranges(starts, lengths)], lengths
