"""Weights and event types count: a shop log whose many light views go to a decoy category
and whose few purchases go to each user's favourite must be recommended the favourite."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from features.events import EventRule, parse_event_weights
from features.sources import resolve_source
from recsys.build_config import BuildConfig
from recsys.core.errors import RecsysError
from recsys.core.versions import read_manifest
from recsys.pipeline import build
from training.config import TowerConfig, TrainConfig
from training.losses import InBatchSoftmaxLoss, NPairLoss, TripletLoss

CATEGORIES, PER_CATEGORY, USERS = 6, 40, 300


def shop_log(root: Path, seed: int = 0) -> Path:
    """85% views (weight 0.1) of a decoy category, 15% purchases (weight 1.0) of the user's
    favourite; an item table with the category."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(USERS):
        favourite = rng.integers(CATEGORIES)
        decoy = (favourite + 1 + rng.integers(CATEGORIES - 1)) % CATEGORIES
        for event, category, count, weight in (
            ("view", decoy, 17, 0.1),
            ("purchase", favourite, 3, 1.0),
        ):
            items = category * PER_CATEGORY + rng.choice(PER_CATEGORY, count, replace=False)
            rows += [(f"u{user}", f"i{i}", event, weight) for i in items]
    root.mkdir(parents=True)
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "event", "weight"], orient="row")
    frame.write_parquet(root / "interactions.parquet")
    items = pl.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(CATEGORIES * PER_CATEGORY)],
            "category": [f"c{i // PER_CATEGORY}" for i in range(CATEGORIES * PER_CATEGORY)],
        }
    )
    items.write_parquet(root / "items.parquet")
    return root


def favourite_share(version: Path, log: pl.DataFrame, k: int = 10) -> float:
    """Share of each user's top-k unseen items in the category of their purchases."""
    users = pl.read_parquet(version / "embeddings/users.parquet")
    items = pl.read_parquet(version / "embeddings/items.parquet")
    user_emb = np.asarray(users["embedding"].to_list(), dtype=np.float32)
    item_emb = np.asarray(items["embedding"].to_list(), dtype=np.float32)
    item_ids = items["item_id"].to_list()
    scores = user_emb @ item_emb.T
    hits = total = 0
    by_user = {u: g for (u,), g in log.group_by("user_id")}
    for row, user in enumerate(users["user_id"].to_list()):
        events = by_user[user]
        seen = set(events["item_id"].to_list())
        bought = events.filter(pl.col("event") == "purchase")["item_id"][0]
        favourite = int(bought[1:]) // PER_CATEGORY
        top = [item_ids[i] for i in np.argsort(-scores[row]) if item_ids[i] not in seen][:k]
        hits += sum(int(i[1:]) // PER_CATEGORY == favourite for i in top)
        total += len(top)
    return hits / total


TOWER = TowerConfig(members=1)
FAST = TrainConfig(max_epochs=8, batch_size=256, seed=0)


@pytest.mark.slow
def test_weights_and_target_events_follow_the_purchases(tmp_path):
    data = shop_log(tmp_path / "shop")
    log = pl.read_parquet(data / "interactions.parquet")
    shares = {}
    for name, config in (
        ("unweighted", TrainConfig(**{**FAST.__dict__, "event_weights": {"view": 1.0}})),
        ("weight column", FAST),
        ("purchases as targets", TrainConfig(**{**FAST.__dict__, "target_events": ("purchase",)})),
    ):
        report = build(resolve_source(data), tmp_path / name, TOWER, config, progress=False)
        shares[name] = favourite_share(report.path, log)
        manifest = read_manifest(report.path)
        assert manifest["events"]["target_events"] == (list(config.target_events) or "all")
        # Bags weigh their items only where the weights differ (plain means train faster).
        assert report.train.spec.tower.weighted_bags is (name != "unweighted")
    # Views outnumber purchases 17 to 3: counted alike, they pull answers to the decoy.
    assert shares["unweighted"] < 0.5, shares
    assert shares["weight column"] > shares["unweighted"] + 0.2, shares
    assert shares["purchases as targets"] > 0.8, shares


def test_event_rule_weights_and_targets():
    frame = pl.DataFrame(
        {
            "weight": [0.1, 1.0, 2.0, 0.0],
            "event": ["view", "purchase", "cart", "purchase"],
        },
        schema_overrides={"weight": pl.Float32},
    )
    np.testing.assert_allclose(EventRule().weights(frame), [0.1, 1.0, 2.0, 0.0], rtol=1e-6)
    rule = EventRule({"view": 0.5, "cart": 0.25})
    np.testing.assert_allclose(rule.weights(frame), [0.5, 1.0, 0.25, 0.0])
    targets = EventRule(target_events=("purchase",))
    assert targets.is_target(frame).to_list() == [False, True, False, False]  # weight 0: never
    with pytest.raises(ValueError, match="finite and >= 0"):
        EventRule({"view": -1.0})


def test_event_settings_parse_from_flags_and_files():
    assert parse_event_weights("purchase=1, cart=0.5,view=0.1") == {
        "purchase": 1.0,
        "cart": 0.5,
        "view": 0.1,
    }
    with pytest.raises(ValueError, match="EVENT=WEIGHT"):
        parse_event_weights("purchase")
    config = BuildConfig().with_overrides(
        {"train": {"event_weights": "view=0.1", "target_events": "purchase,cart"}}
    )
    assert config.train.event_weights == {"view": 0.1}
    assert config.train.target_events == ("purchase", "cart")
    again = BuildConfig().with_overrides(config.to_dict())  # as stored in a version
    assert again.train == config.train
    for bad in ({"event_weights": {"view": "heavy"}}, {"target_events": [1]}):
        with pytest.raises(RecsysError, match=r"\[train\]"):
            BuildConfig().with_overrides({"train": bad})


@pytest.mark.parametrize("loss", [InBatchSoftmaxLoss(0.1), NPairLoss(), TripletLoss()])
def test_weights_are_a_weighted_mean_of_row_terms(loss):
    torch.manual_seed(0)
    query, item = torch.randn(6, 4), torch.randn(6, 4)
    ids = torch.arange(6)
    assert loss(query, item, ids, torch.ones(6)).item() == pytest.approx(
        loss(query, item, ids).item()
    )
    # One-hot weights give each row's own term; any weights give their weighted mean.
    terms = torch.tensor([loss(query, item, ids, torch.eye(6)[j]).item() for j in range(6)])
    weights = torch.tensor([5.0, 1.0, 0.0, 0.1, 2.0, 1.0])
    expected = (terms * weights).sum() / weights.sum()
    assert loss(query, item, ids, weights).item() == pytest.approx(expected.item(), rel=1e-5)
    if isinstance(loss, InBatchSoftmaxLoss):  # a row's term, by hand
        logits = query @ item.T / 0.1
        by_hand = -(logits[2, 2] - torch.logsumexp(logits[2], 0))
        assert terms[2].item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.parametrize("configured", [{}, {"purchase": 1_000.0}])
def test_no_event_counts_more_than_ten_times_the_median_weight(tmp_path, configured):
    """Two events at the largest weight a post may carry (10^6) once dominated the next
    build's loss, bags and spectral degrees: their items became every item's nearest
    neighbours. Weights a build's own settings give an event type are not capped."""
    from features.config import FeatureConfig
    from features.feature_set import FeatureSet
    from features.ingest import ingest

    rows = [(u, i, "view", 1.0) for u in range(20) for i in range(u % 7, u % 7 + 5)]
    rows += [(0, 1, "view", 1e6), (1, 2, "purchase", 1.0), (2, 3, "view", 0.5)]
    (tmp_path / "log").mkdir()
    log = tmp_path / "log" / "interactions.parquet"
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "event", "weight"], orient="row")
    frame.write_parquet(log)
    ingest(resolve_source(log), tmp_path / "ingest", FeatureConfig(event_weights=configured))
    table = FeatureSet.load(tmp_path / "ingest").interactions
    views = table.filter(pl.col("event") == "view")["weight"]
    assert views.max() == 10.0  # the 10^6 view, at 10 x the median weight of 1
    assert 0.5 in views.to_list()  # light weights are kept as they are
    purchase = table.filter(pl.col("event") == "purchase")["weight"].to_list()
    assert purchase == [configured.get("purchase", 1.0)]
