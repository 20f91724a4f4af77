"""Leave-last-out and time cut-off splits."""

import polars as pl
import pytest

from features.splits import leave_last_out, quantile_cutoff, time_cutoff
from recsys.core.errors import RecsysError


@pytest.fixture
def log() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_idx": [0, 0, 0, 1, 1, 2],
            "item_idx": [5, 6, 7, 8, 9, 1],
            "timestamp": [1, 2, 3, 4, 5, 6],
        },
        schema={"user_idx": pl.UInt32, "item_idx": pl.UInt32, "timestamp": pl.Int64},
    )


def test_leave_last_out_holds_out_each_users_latest_event(log):
    split = leave_last_out(log, n_test=1, n_valid=1)
    assert split.test["item_idx"].to_list() == [7]  # user 1 has too few events to spare two
    assert split.valid["item_idx"].to_list() == [6]
    split = leave_last_out(log, n_test=1)
    assert split.test["item_idx"].to_list() == [7, 9]
    assert split.train["row"].to_list() == [0, 1, 3, 5]  # the single-event user trains only
    rows = split.train["row"].to_list() + split.test["row"].to_list()
    assert sorted(rows) == list(range(log.height))


def test_test_events_come_after_the_users_training_events(log):
    split = leave_last_out(log)
    last_train = split.train.group_by("user_idx").agg(pl.col("timestamp").max())
    joined = split.test.join(last_train, on="user_idx", suffix="_train")
    assert (joined["timestamp"] >= joined["timestamp_train"]).all()


def test_time_cutoff(log):
    split = time_cutoff(log, test_from=5, valid_from=4)
    assert split.train["timestamp"].to_list() == [1, 2, 3]
    assert split.valid["timestamp"].to_list() == [4]
    assert split.test["timestamp"].to_list() == [5, 6]
    assert quantile_cutoff(log, 1 / 3) == 5


def test_time_cutoff_needs_timestamps(log):
    without = log.with_columns(pl.lit(None, pl.Int64).alias("timestamp"))
    with pytest.raises(RecsysError, match="timestamps"):
        time_cutoff(without, test_from=1)
