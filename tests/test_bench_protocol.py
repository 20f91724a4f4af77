"""The benchmark protocols themselves: a split that changed from run to run made every
figure of the quality-without-timestamps table irreproducible."""

import polars as pl
from bench.quality_sets import holdout_files


def test_the_random_holdout_is_the_same_whatever_the_row_order(tmp_path):
    events = pl.DataFrame(
        {"user_id": [u for u in range(40) for _ in range(10)], "item_id": list(range(400))}
    ).with_columns(pl.col("item_id") % 57)
    shuffled = events.sample(fraction=1.0, shuffle=True, seed=3)
    first_train, first_test = holdout_files(events, tmp_path / "a")
    second_train, second_test = holdout_files(shuffled, tmp_path / "b")
    assert first_test.sort("user_id", "item_id").equals(second_test.sort("user_id", "item_id"))
    assert pl.read_parquet(first_train).equals(pl.read_parquet(second_train))
    assert first_test.height > 0
