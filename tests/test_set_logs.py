"""Logs without timestamps are sets end to end: ingest, the validation split, training
histories and validation do not depend on the input's row order (a file sorted by item
used to be read as time: recall fell below popularity)."""

import numpy as np
import polars as pl
import pytest

from data.synthetic import SyntheticConfig, generate
from features.feature_set import FeatureSet
from features.ingest import ingest
from features.ordering import Ordering
from features.sources import resolve_source
from training.baselines import Popularity
from training.batches import BatchBuilder
from training.config import TowerConfig, TrainConfig
from training.evaluate import eval_task, evaluate
from training.trainer import build_split, train

pytestmark = pytest.mark.slow  # builds models or runs the service: `make test` only

TOWER = TowerConfig(embedding_dim=32, id_dim=32, hidden_dim=64, history_length=20, members=1)
CONFIG = TrainConfig(max_epochs=3, batch_size=256, patience=3, seed=1, refit=False)


@pytest.fixture(scope="module")
def orders(tmp_path_factory) -> dict[str, FeatureSet]:
    """One planted log without timestamps, written in two row orders, ingested."""
    root = tmp_path_factory.mktemp("set-logs")
    cfg = SyntheticConfig(rows=20_000, users=400, items=300, clusters=6, taste=0.9, seed=4)
    generate(root / "data", cfg)
    log = pl.read_parquet(list(resolve_source(root / "data").interactions)).drop("timestamp")
    out = {}
    for name, frame in (
        ("by_item", log.sort("item_id", "user_id")),
        ("shuffled", log.sample(fraction=1.0, shuffle=True, seed=9)),
    ):
        path = root / f"{name}.parquet"
        frame.write_parquet(path)
        ingest(resolve_source(path), root / f"ingest-{name}")
        out[name] = FeatureSet.load(root / f"ingest-{name}")
    return out


def test_a_log_without_timestamps_is_ingested_as_a_set_whatever_its_row_order(orders):
    by_item, shuffled = orders["by_item"], orders["shuffled"]
    assert by_item.ordering is Ordering.SET and shuffled.ordering is Ordering.SET
    assert by_item.interactions.equals(shuffled.interactions)


def test_set_training_batches_never_hold_the_target_and_only_the_users_items(orders):
    features = orders["shuffled"]
    split = build_split(features, CONFIG)
    seen = features.restricted_to(split.train)
    builder = BatchBuilder(seen, TOWER)
    builder.new_epoch(np.random.default_rng(0))
    rows = np.arange(0, seen.interactions.height, 97)
    batch = builder.training_batch(rows)
    bags = batch.features.to_dict()
    history = bags["history"]
    assert bags["recent"].lengths().sum().item() == 0  # no "recent" items in a set
    pieces = np.split(history.values().numpy(), np.cumsum(history.lengths().numpy())[:-1])
    users = seen.histories.user_of(rows)
    for row, user, piece in zip(rows, users, pieces, strict=True):
        mine = seen.histories.items[seen.histories.offsets[user] : seen.histories.offsets[user + 1]]
        others = np.delete(mine, row - seen.histories.offsets[user])
        assert len(piece) == min(TOWER.history_length, len(others))
        assert np.isin(piece, others).all()
        assert seen.histories.items[row] not in piece or seen.histories.items[row] in others


def test_row_order_does_not_change_validation_and_the_model_beats_popularity(orders):
    results = {}
    for name, features in orders.items():
        split = build_split(features, CONFIG)
        results[name] = train(features, split, TOWER, CONFIG, progress=False).best_metrics
    assert results["by_item"]["recall@20"] == pytest.approx(
        results["shuffled"]["recall@20"], abs=0.02
    )
    features = orders["by_item"]
    split = build_split(features, CONFIG)
    task = eval_task(split.valid, features.restricted_to(split.train).histories)
    popularity = evaluate(Popularity.fit(split.train, features.num_items), task)["recall@20"]
    assert results["by_item"]["recall@20"] > 1.5 * popularity, (results, popularity)
