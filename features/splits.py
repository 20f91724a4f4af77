"""Held-out splits over the cleaned, time-ordered interactions.

Leave-last-out holds out each user's most recent events (the classic next-item protocol);
a time cut-off holds out everything after one moment (closer to a nightly deployment).
"""

from dataclasses import dataclass

import polars as pl

from recsys import schema as s
from recsys.errors import RecsysError

ROW = "row"  # position of the event in the cleaned table (its index in UserHistories)


@dataclass(frozen=True)
class Split:
    """Row sets of one split; `row` indexes the cleaned interactions table."""

    train: pl.DataFrame
    valid: pl.DataFrame
    test: pl.DataFrame


def _with_rows(interactions: pl.DataFrame) -> pl.DataFrame:
    return interactions.with_row_index(ROW)


def leave_last_out(interactions: pl.DataFrame, n_test: int = 1, n_valid: int = 0) -> Split:
    """Each user's last `n_test` events -> test, the `n_valid` before them -> valid.

    Users with too few events to keep at least one for training stay wholly in train.
    """
    if n_test < 0 or n_valid < 0:
        raise ValueError("n_test and n_valid must be >= 0")
    frame = _with_rows(interactions).with_columns(
        (pl.len().over(s.USER_IDX) - pl.int_range(pl.len()).over(s.USER_IDX) - 1)
        .cast(pl.Int64)
        .alias("_from_end"),
        pl.len().over(s.USER_IDX).alias("_n"),
    )
    eligible = pl.col("_n") > n_test + n_valid
    is_test = eligible & (pl.col("_from_end") < n_test)
    is_valid = eligible & ~is_test & (pl.col("_from_end") < n_test + n_valid)
    drop = ["_from_end", "_n"]
    return Split(
        train=frame.filter(~is_test & ~is_valid).drop(drop),
        valid=frame.filter(is_valid).drop(drop),
        test=frame.filter(is_test).drop(drop),
    )


def time_cutoff(interactions: pl.DataFrame, test_from: int, valid_from: int | None = None) -> Split:
    """Events at or after `test_from` -> test; between `valid_from` and it -> valid."""
    if interactions[s.TIMESTAMP].null_count() == interactions.height:
        raise RecsysError("a time cut-off needs timestamps, and this log has none")
    valid_from = test_from if valid_from is None else valid_from
    if valid_from > test_from:
        raise ValueError("valid_from must not be after test_from")
    frame = _with_rows(interactions)
    ts = pl.col(s.TIMESTAMP)
    return Split(
        train=frame.filter(ts < valid_from),
        valid=frame.filter((ts >= valid_from) & (ts < test_from)),
        test=frame.filter(ts >= test_from),
    )


def quantile_cutoff(interactions: pl.DataFrame, fraction: float) -> int:
    """The timestamp that leaves the last `fraction` of events after it."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    value = interactions[s.TIMESTAMP].quantile(1.0 - fraction, interpolation="higher")
    if value is None:
        raise RecsysError("a time cut-off needs timestamps, and this log has none")
    return int(value)
