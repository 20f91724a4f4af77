"""Logs without time are sets: the ordering decision, tie-aware and set-mode histories, and
the random holdout, none of which may depend on row order."""

import numpy as np
import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from features.history import UserHistories
from features.ordering import Ordering, detect_ordering
from features.splits import random_holdout, validation_split

SCHEMA = {"user_idx": pl.UInt32, "item_idx": pl.UInt32, "timestamp": pl.Int64}


def log(users: list[int], items: list[int], timestamps: list[int | None]) -> pl.DataFrame:
    frame = pl.DataFrame(
        {"user_idx": users, "item_idx": items, "timestamp": timestamps}, schema=SCHEMA
    )
    return frame.sort("user_idx", "timestamp", maintain_order=True)


def test_a_log_without_timestamps_is_a_set():
    decision = detect_ordering(log([0, 0, 1], [1, 2, 3], [None, None, None]))
    assert decision.ordering is Ordering.SET and "no timestamps" in decision.reason


def test_a_log_stamped_with_one_date_is_a_set_and_distinct_times_are_a_sequence():
    same_day = log([0, 0, 0, 1, 1], [1, 2, 3, 4, 5], [7, 7, 7, 7, 7])
    assert detect_ordering(same_day).ordering is Ordering.SET
    timed = log([0, 0, 0, 1, 1], [1, 2, 3, 4, 5], [1, 2, 3, 1, 2])
    decision = detect_ordering(timed)
    assert decision.ordering is Ordering.SEQUENCE and "ties" in decision.reason


def test_users_with_few_events_at_distinct_times_are_a_sequence():
    # Two events per user at different times: nothing is simultaneous (a measure that
    # counted the event itself read this as 50% ties, a set).
    pairs = log([0, 0, 1, 1, 2], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5])
    decision = detect_ordering(pairs)
    assert decision.ordering is Ordering.SEQUENCE and "0.0%" in decision.reason


def test_simultaneous_events_are_not_each_others_history():
    frame = log([0, 0, 0, 0], [7, 8, 9, 10], [1, 2, 2, 3])
    histories = UserHistories.from_interactions(frame, 1)
    values, lengths = histories.previous_items(np.array([0, 1, 2, 3]), 10)
    # Rows 1 and 2 share timestamp 2: neither sees the other; row 3 sees both.
    assert lengths.tolist() == [0, 1, 1, 3] and values.tolist() == [7, 7, 7, 8, 9]


def test_previous_items_refuse_a_set():
    histories = UserHistories.from_interactions(log([0], [1], [None]), 1, Ordering.SET)
    with pytest.raises(ValueError, match="set"):
        histories.previous_items(np.array([0]), 5)


@given(
    st.lists(st.integers(1, 12), min_size=1, max_size=6),
    st.integers(1, 8),
    st.integers(0, 10_000),
)
def test_set_histories_are_other_items_of_the_same_user_without_repeats(sizes, n, seed):
    users = np.repeat(np.arange(len(sizes)), sizes)
    items = np.arange(len(users))  # distinct items, so a repeat would be visible
    frame = log(users.tolist(), items.tolist(), [None] * len(users))
    histories = UserHistories.from_interactions(frame, len(sizes), Ordering.SET)
    order, position = histories.shuffled(np.random.default_rng(seed))
    rows = np.arange(len(users))
    values, lengths = histories.other_items(rows, n, position, order)
    pieces = np.split(values, np.cumsum(lengths)[:-1])
    for row, piece in zip(rows.tolist(), pieces, strict=True):
        mine = set(items[users == users[row]].tolist()) - {int(items[row])}
        assert len(piece) == min(n, len(mine))
        assert len(set(piece.tolist())) == len(piece)  # drawn without replacement
        assert set(piece.tolist()) <= mine  # the user's other items, never the event's own


def user_item_log(rng: np.random.Generator, users: int = 30, per_user: int = 12) -> pl.DataFrame:
    rows = [(u, int(i)) for u in range(users) for i in rng.choice(200, per_user, replace=False)]
    return pl.DataFrame(
        {"user_idx": [u for u, _ in rows], "item_idx": [i for _, i in rows]},
        schema={"user_idx": pl.UInt32, "item_idx": pl.UInt32},
    ).with_columns(pl.lit(None, pl.Int64).alias("timestamp"))


def pairs(frame: pl.DataFrame) -> set[tuple[int, int]]:
    return set(zip(frame["user_idx"].to_list(), frame["item_idx"].to_list(), strict=True))


def test_random_holdout_takes_a_share_of_each_users_items_whatever_the_row_order():
    frame = user_item_log(np.random.default_rng(0))
    by_item = frame.sort("user_idx", "item_idx")
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=3).sort(
        "user_idx", maintain_order=True
    )
    first, second = random_holdout(by_item, 0.25), random_holdout(shuffled, 0.25)
    assert pairs(first.valid) == pairs(second.valid)
    per_user = first.valid.group_by("user_idx").len()["len"]
    assert per_user.len() == 30 and (per_user == 3).all()  # 25% of 12
    assert not pairs(first.train) & pairs(first.valid)


def test_random_holdout_limits_users_and_keeps_small_users_in_training():
    frame = pl.concat(
        [
            user_item_log(np.random.default_rng(1)),
            pl.DataFrame(
                {"user_idx": [99], "item_idx": [5], "timestamp": [None]},
                schema={**SCHEMA},
            ),
        ]
    )
    split = random_holdout(frame, 0.5, max_users=10)
    assert split.valid["user_idx"].n_unique() == 10
    assert 99 in split.train["user_idx"].to_list()
    assert split.train.height + split.valid.height == frame.height


def test_a_repeated_item_is_held_out_with_all_its_events():
    frame = log([0, 0, 0, 0], [1, 1, 2, 3], [None] * 4)
    for seed in range(10):
        split = random_holdout(frame, 0.4, seed=seed)
        assert not pairs(split.train) & pairs(split.valid)


def test_validation_split_follows_the_ordering():
    frame = log([0, 0, 0], [1, 2, 3], [1, 2, 3])
    assert validation_split(frame, Ordering.SEQUENCE, 0.2, None).valid["item_idx"].to_list() == [3]
    held = validation_split(frame, Ordering.SET, 0.34, None).valid
    assert held.height == 1
