"""`recsys evaluate` reads a grown log as the version read its own (issue 34: it ingested
with our column names, without the event weights and without the item table, so a shop
whose files say `customer` and `sku` could not evaluate, and the towers scored every item
without its features)."""

from pathlib import Path

import polars as pl
import pytest
from helpers import recsys

from data.synthetic import SyntheticConfig, generate

pytestmark = pytest.mark.slow  # builds a model


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A version built from files with the shop's own column names, and its grown log."""
    root = tmp_path_factory.mktemp("shop")
    synthetic = generate(
        root / "synthetic",
        SyntheticConfig(rows=6_000, users=150, items=120, clusters=4, taste=0.9, seed=5),
    )
    names = {"user_id": "customer", "item_id": "sku", "timestamp": "ts"}
    log = pl.read_parquet(synthetic / "interactions").rename(names)
    cutoff = log["ts"].quantile(0.8)
    (root / "log").mkdir()
    log.filter(pl.col("ts") <= cutoff).write_parquet(root / "log" / "events.parquet")
    log.write_parquet(root / "grown.parquet")
    items = root / "items.parquet"
    pl.read_parquet(synthetic / "items.parquet").rename({"item_id": "sku"}).write_parquet(items)
    artifacts = root / "artifacts"
    built = recsys(
        "build", "--data", root / "log", "--items", items, "--artifacts", artifacts,
        "--columns", "user_id=customer,item_id=sku,timestamp=ts", "--epochs", "1",
        "--no-progress",
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    return artifacts, root / "grown.parquet", items


def test_a_grown_log_in_the_shops_names_is_evaluated_without_repeating_them(shop):
    artifacts, grown, items = shop
    plain = recsys("evaluate", "--artifacts", artifacts, "--data", grown)
    assert plain.returncode == 0, plain.stderr
    assert "after" in plain.stdout  # the events after the version's log are the test
    explicit = recsys(
        "evaluate", "--artifacts", artifacts, "--data", grown, "--items", items,
        "--columns", "user_id=customer,item_id=sku,timestamp=ts",
    )  # fmt: skip
    assert explicit.returncode == 0, explicit.stderr
    assert plain.stdout == explicit.stdout  # the recorded item table was used: same scores


def test_a_held_out_file_in_the_shops_names_is_read_with_the_recorded_mapping(shop, tmp_path):
    artifacts, grown, _ = shop
    held_out = tmp_path / "held_out.parquet"
    pl.read_parquet(grown).tail(500).write_parquet(held_out)
    result = recsys("evaluate", "--artifacts", artifacts, "--test", held_out)
    assert result.returncode == 0, result.stderr
    assert "held-out events of held_out.parquet" in " ".join(result.stdout.split())
