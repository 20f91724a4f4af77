"""Previous-N-items histories against a plain loop, and the no-leakage guarantee."""

import numpy as np
import polars as pl
from hypothesis import given
from hypothesis import strategies as st

from features.history import UserHistories


def sorted_log(users: list[int], items: list[int]) -> pl.DataFrame:
    frame = pl.DataFrame(
        {"user_idx": users, "item_idx": items, "timestamp": list(range(len(users)))},
        schema={"user_idx": pl.UInt32, "item_idx": pl.UInt32, "timestamp": pl.Int64},
    )
    return frame.sort("user_idx", "timestamp")


def oracle(frame: pl.DataFrame, row: int, n: int) -> list[int]:
    """The same user's items in earlier rows, at most the n most recent, oldest first."""
    user = frame["user_idx"][row]
    earlier = [frame["item_idx"][r] for r in range(row) if frame["user_idx"][r] == user]
    return earlier[-n:] if earlier else []


events = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 20)), min_size=1, max_size=40)


@given(events, st.integers(1, 6))
def test_previous_items_match_the_loop(pairs, n):
    frame = sorted_log([u for u, _ in pairs], [i for _, i in pairs])
    histories = UserHistories.from_interactions(frame, num_users=5)
    rows = np.arange(frame.height)
    values, lengths = histories.previous_items(rows, n)
    assert lengths.sum() == len(values)
    pieces = np.split(values, np.cumsum(lengths)[:-1])
    for row, piece in zip(rows, pieces, strict=True):
        assert piece.tolist() == oracle(frame, int(row), n)


def test_history_never_contains_the_event_or_later_ones():
    frame = sorted_log([0, 0, 0, 0], [7, 8, 9, 10])
    histories = UserHistories.from_interactions(frame, num_users=1)
    values, lengths = histories.previous_items(np.array([0, 2]), 10)
    assert lengths.tolist() == [0, 2] and values.tolist() == [7, 8]


def test_latest_items_for_users_with_and_without_events():
    frame = sorted_log([0, 0, 0, 2], [1, 2, 3, 4])
    histories = UserHistories.from_interactions(frame, num_users=3)
    values, lengths = histories.latest_items(np.array([0, 1, 2]), 2)
    assert lengths.tolist() == [2, 0, 1] and values.tolist() == [2, 3, 4]
