"""A build run without a terminal (cron) says what it does, stage by stage and epoch by
epoch, and what ingest made of the log; integer quantities are bucketed like floats
(issue 34: a cron build printed nothing for 10-25 minutes; `duration_ms` was dropped)."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from helpers import recsys

from data.synthetic import SyntheticConfig, generate
from features.config import FeatureConfig
from features.side_tables import CATEGORICAL_INTEGERS, build_side_features, continuous
from features.vocab import Vocabulary


def test_integer_quantities_are_bucketed_and_few_valued_integers_stay_categories():
    rng = np.random.default_rng(0)
    durations = pl.Series("duration_ms", rng.integers(30_000, 600_000, 2_000))
    years = pl.Series("year", rng.integers(1922, 1999, 2_000))  # many rows, 77 values
    ages = pl.Series("age", rng.integers(7, 74, 2_000))
    assert continuous(durations) and not continuous(years) and not continuous(ages)
    assert continuous(pl.Series("price", [1.5, 2.5]))
    assert years.n_unique() <= CATEGORICAL_INTEGERS
    table = pl.DataFrame({"item_id": np.arange(2_000), "duration_ms": durations, "year": years})
    ids = Vocabulary.empty("item_id", text=False).extend(table["item_id"])
    side = build_side_features(table, "item_id", "item_idx", ids, FeatureConfig())
    assert "duration_ms" in side.vocabs, side.ignored  # was dropped as near-unique
    assert 4 <= len(side.vocabs["duration_ms"]) <= 20  # quarter-octave buckets, not 2,000
    assert len(side.vocabs["year"]) == years.n_unique()


@pytest.mark.slow
def test_a_build_without_a_terminal_prints_a_line_per_stage_and_epoch(tmp_path: Path):
    generate(tmp_path / "data", SyntheticConfig(rows=3_000, users=80, items=60, seed=1))
    extra = tmp_path / "data" / "interactions" / "zz-duplicates.parquet"
    log = pl.read_parquet(tmp_path / "data" / "interactions")
    log.head(5).write_parquet(extra)  # five duplicate events, counted and said
    bad = log.head(2).with_columns(pl.lit(None, pl.Int64).alias("user_id"))
    bad.write_parquet(tmp_path / "data" / "interactions" / "zz-rejects.parquet")
    done = recsys(
        "build", "--data", tmp_path / "data", "--artifacts", tmp_path / "art", "--epochs", "2"
    )
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "\r" not in err  # no progress-bar redraws in a log file
    for stage in ("ingest", "fit", "embed", "index", "commit", "promote"):
        assert f"stage {stage} done" in err, err[-2000:]
    assert "epoch 1/2:" in err and "loss" in err and "valid recall@" in err
    assert "ingest: read" in err and "duplicates" in err
    table = " ".join(done.stdout.split())  # the summary: duplicates, reject reasons, columns
    assert "duplicates collapsed │ 5" in table, done.stdout
    assert "rejected: null user_id │ 2" in table, done.stdout
    assert "items table" in table and "features: genres" in table, done.stdout
    assert "training from scratch: no current version" in err
    again = recsys("build", "--data", tmp_path / "data", "--artifacts", tmp_path / "art")
    assert again.returncode in (0, 3), again.stderr
    assert "warm start from" in again.stderr or "training from scratch" in again.stderr
