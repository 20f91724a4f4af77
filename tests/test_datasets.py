"""The data sets under data/: MovieLens-100K from PyPI and the synthetic generator."""

import numpy as np
import polars as pl
import pytest

from data.checkins import CheckinConfig
from data.checkins import generate as generate_checkins
from data.synthetic import SyntheticConfig, generate, home_clusters
from features.ingest import ingest
from features.sources import resolve_source


def test_movielens_100k_has_its_known_shape(movielens_dir):
    inter = pl.read_parquet(movielens_dir / "interactions.parquet")
    items = pl.read_parquet(movielens_dir / "items.parquet")
    users = pl.read_parquet(movielens_dir / "users.parquet")
    assert inter.shape == (100_000, 4)
    assert (inter["user_id"].n_unique(), inter["item_id"].n_unique()) == (943, 1682)
    assert items.height == 1682 and users.height == 943
    assert items.filter(pl.col("item_id") == 1)["genres"].to_list() == [
        ["Animation", "Children's", "Comedy"]
    ]
    assert set(users["gender"].unique()) == {"M", "F"}


def test_movielens_ingests_cleanly_with_side_features(movielens_dir, tmp_path):
    report = ingest(resolve_source(movielens_dir), tmp_path / "out")
    assert (report.read, report.kept, report.rejected) == (100_000, 100_000, 0)
    assert report.side_tables["items"]["features"]["genres"] == 19
    assert set(report.side_tables["users"]["features"]) == {"age", "gender", "occupation"}


def test_synthetic_log_has_exact_size_and_planted_taste(tmp_path):
    cfg = SyntheticConfig(
        rows=30_000, users=500, items=400, clusters=8, taste=0.8, chunk_rows=7_000
    )
    generate(tmp_path, cfg)
    log = pl.read_parquet(tmp_path / "interactions")
    assert log.height == 30_000
    assert len(list((tmp_path / "interactions").glob("*.parquet"))) > 1
    user_home, item_cluster = home_clusters(cfg)
    share = np.mean(user_home[log["user_id"].to_numpy()] == item_cluster[log["item_id"].to_numpy()])
    # 80% from the home cluster plus 1/8 of the popularity draws landing there by chance.
    assert 0.80 < share < 0.86
    counts = log["item_id"].value_counts()["count"].sort(descending=True)
    assert counts[0] > 10 * counts[len(counts) // 2]  # power-law popularity


def test_synthetic_generation_is_reproducible(tmp_path):
    cfg = SyntheticConfig(rows=2_000, seed=7)
    first = pl.read_parquet(generate(tmp_path / "a", cfg) / "interactions")
    second = pl.read_parquet(generate(tmp_path / "b", cfg) / "interactions")
    assert first.equals(second)


def test_checkin_log_is_sparse_local_and_reproducible(tmp_path):
    """Shaped like public sparse benchmarks: distinct (user, item) pairs, no timestamp,
    about `events_per_user` per user with the 10-event floor, and local: a user's places
    (beyond the share drawn anywhere by popularity) sit in few cities."""
    cfg = CheckinConfig(rows=60_000, seed=3)
    log = pl.read_parquet(generate_checkins(tmp_path / "a", cfg) / "interactions.parquet")
    assert log.columns == ["user_id", "item_id"] and not log.is_duplicated().any()
    assert log.equals(
        pl.read_parquet(generate_checkins(tmp_path / "b", cfg) / "interactions.parquet")
    )
    per_user = log.group_by("user_id").len()["len"]
    assert 0.7 * cfg.events_per_user < per_user.mean() < 1.1 * cfg.events_per_user
    assert per_user.min() >= 5 and log.height / (cfg.n_users * cfg.n_items) < 0.02
    city = pl.read_parquet(tmp_path / "a" / "items.parquet")

    def top_city_share(events: pl.DataFrame) -> float:
        return (
            events.join(city, on="item_id")
            .group_by("user_id")
            .agg(pl.col("city").value_counts(sort=True).struct.field("count").first() / pl.len())[
                "count"
            ]
            .mean()
        )

    # The same users with their items shuffled among them have no home city.
    shuffled = log.with_columns(pl.col("item_id").shuffle(seed=1))
    assert top_city_share(log) > top_city_share(shuffled) + 0.1


def test_a_wider_popularity_spread_puts_more_check_ins_on_the_top_places(tmp_path):
    """`popularity_spread` (the benchmark's `--popularity-spread`) skews the log towards
    a few places, as public logs where popularity alone scores higher are."""

    def top_share(spread: float) -> float:
        cfg = CheckinConfig(rows=20_000, popularity_spread=spread, seed=3)
        log = pl.read_parquet(
            generate_checkins(tmp_path / str(spread), cfg) / "interactions.parquet"
        )
        counts = log["item_id"].value_counts()["count"].sort(descending=True)
        return float(counts.head(max(1, len(counts) // 100)).sum() / log.height)

    assert top_share(2.5) > 1.3 * top_share(1.5)  # 0.149 against 0.096 (seed 3)


@pytest.mark.slow  # builds a model
def test_a_movielens_version_serves_with_titles_over_its_side_features(movielens_dir, tmp_path):
    """Two item features (genres, year) and three user features: the served towers read
    the features by name, whatever order the tables list them in."""
    from fastapi.testclient import TestClient

    from features.sources import resolve_source
    from recsys.pipeline import build
    from serving.app import create_app
    from serving.settings import ServiceSettings
    from training.config import TrainConfig

    build(resolve_source(movielens_dir), tmp_path / "a", config=TrainConfig(max_epochs=1))
    settings = ServiceSettings(artifacts=tmp_path / "a", redis_url=None, reload_poll_seconds=0)
    with TestClient(create_app(settings)) as client:
        answer = client.get("/v1/users/1/recommendations", params={"k": 5})
        assert answer.status_code == 200 and len(answer.json()["items"]) == 5
        session = client.post("/v1/recommendations", json={"history": [50, 172, 181], "k": 3})
        assert session.status_code == 200 and len(session.json()["items"]) == 3
        assert client.get("/readyz").json()["index"]["backend"] == "exact"  # 1,682 items
