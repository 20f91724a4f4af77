"""Held-out splits over the cleaned interactions.

Leave-last-out holds out each user's most recent events (the classic next-item protocol);
a time cut-off holds out everything after one moment (closer to a nightly deployment); a
random holdout takes a share of each user's items, for logs where time does not order
events (`features.ordering`). None of them depends on the input's row order.
"""

from dataclasses import dataclass

import polars as pl

from features.ordering import Ordering, row_key
from recsys.core import schema as s
from recsys.core.errors import RecsysError

ROW = "row"  # position of the event in the cleaned table (its index in UserHistories)
_ORIGINAL = "_original_row"


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


def random_holdout(
    interactions: pl.DataFrame,
    share: float,
    max_users: int | None = None,
    seed: int = 0,
    min_items: int = 2,
) -> Split:
    """A pseudo-random `share` of each user's distinct items -> valid (at least one, and
    at least one left to train on), for at most `max_users` users drawn at random; users
    with fewer than `min_items` items stay wholly in train. Every event of a held-out
    (user, item) pair is held out together, so no item is both trained on and validated.
    Draws hash (user, item), so the split does not depend on row order."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    frame = _with_rows(interactions).with_columns(row_key(seed).alias("_key"))
    frame = frame.with_columns(
        pl.col("_key").n_unique().over(s.USER_IDX).alias("_n"),
        pl.col("_key").rank("dense").over(s.USER_IDX).alias("_rank"),
    )
    eligible = frame.filter(pl.col("_n") >= min_items)[s.USER_IDX].unique()
    if max_users is not None and len(eligible) > max_users:
        keys = pl.DataFrame({s.USER_IDX: eligible}).with_columns(
            pl.col(s.USER_IDX).hash(seed + 1).alias("_user_key")
        )
        eligible = keys.sort("_user_key", s.USER_IDX).head(max_users)[s.USER_IDX]
    held = (
        pl.col(s.USER_IDX).is_in(eligible.implode())
        & (pl.col("_n") >= min_items)
        & (
            pl.col("_rank")
            <= (pl.col("_n") * share).round().clip(1, pl.col("_n") - 1).cast(pl.UInt32)
        )
    )
    drop = ["_key", "_n", "_rank"]
    return Split(
        train=frame.filter(~held).drop(drop),
        valid=frame.filter(held).drop(drop),
        test=frame.clear().drop(drop),
    )


def validation_split(
    interactions: pl.DataFrame,
    ordering: Ordering,
    share: float,
    max_users: int | None,
    seed: int = 0,
    targets: pl.Series | None = None,
) -> Split:
    """The split a build early-stops on: each user's last event when time orders the
    log, a random share of each user's items when it does not.

    `targets` (a boolean per row) limits what is held out to target events (a purchase,
    not a view): each user's last target event, or a share of the items of their target
    events (with every event of a held-out pair, so that no history shows it)."""
    if targets is None:
        if ordering is Ordering.SEQUENCE:
            return leave_last_out(interactions, n_test=0, n_valid=1)
        return random_holdout(interactions, share, max_users, seed)
    frame = _with_rows(interactions)
    chosen = frame.filter(targets)
    if ordering is Ordering.SEQUENCE:
        inner = leave_last_out(chosen.drop(ROW).with_columns(chosen[ROW].alias(_ORIGINAL)), 0, 1)
        held = frame[ROW].is_in(inner.valid[_ORIGINAL])
    else:
        inner = random_holdout(chosen.drop(ROW), share, max_users, seed)
        pairs = inner.valid.select(s.USER_IDX, s.ITEM_IDX).unique().with_columns(_held=True)
        held = frame.join(pairs, on=[s.USER_IDX, s.ITEM_IDX], how="left", maintain_order="left")[
            "_held"
        ].fill_null(False)
    return Split(train=frame.filter(~held), valid=frame.filter(held), test=frame.clear())
