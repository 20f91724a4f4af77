"""Freshness on a shop's own log (text IDs, event types, an item table with categories):
posted purchases move a user's answer toward what they bought, filters and new items work
on text IDs, and the next build absorbs the events with their IDs as text."""

from pathlib import Path

import polars as pl
import pytest
from fastapi.testclient import TestClient
from test_event_weights import PER_CATEGORY, shop_log

from features.sources import resolve_source
from recsys.build_config import RebuildPolicy
from recsys.pipeline import build
from serving.app import create_app
from serving.settings import ServiceSettings
from training.config import TowerConfig, TrainConfig

pytestmark = pytest.mark.slow

KEY = "shop-admin-key"
TARGETS = TrainConfig(max_epochs=8, batch_size=256, seed=0, target_events=("purchase",))


def _category(item: str) -> str:
    return f"c{int(item[1:]) // PER_CATEGORY}"


def _items(answer: dict) -> list[str]:
    return [i["item_id"] for i in answer["items"]]


def test_a_shop_log_with_text_ids_stays_fresh(tmp_path: Path, redis_url: str) -> None:
    data = shop_log(tmp_path / "shop")
    artifacts = tmp_path / "artifacts"
    build(resolve_source(data), artifacts, TowerConfig(members=1), TARGETS, progress=False)
    settings = ServiceSettings(artifacts=artifacts, redis_url=redis_url, admin_api_key=KEY)
    with TestClient(create_app(settings)) as client:
        before = _items(client.get("/v1/users/u7/recommendations?k=200").json())
        other = _category(before[-1])  # a category far from the user's taste
        bought = [f"i{int(other[1:]) * PER_CATEGORY + n}" for n in range(5)]
        rows = [
            {"user_id": "u7", "item_id": i, "event": "purchase", "timestamp": "2026-11-30 10:00"}
            for i in bought
        ]
        answer = client.post("/v1/events", json={"events": rows}).json()
        assert answer == {"accepted": 5, "rejected": []}
        after = _items(client.get("/v1/users/u7/recommendations?k=200").json())
        ranks = [[n for n, i in enumerate(top) if _category(i) == other] for top in (before, after)]
        # the ID row keeps most of the learned taste: the purchases move, not replace, it
        assert sum(ranks[1][:10]) < sum(ranks[0][:10]), ranks
        assert not set(bought) & set(after)
        # text catalogue: any text is a valid new ID; filters and new items by text
        filtered = client.get(f"/v1/users/u7/recommendations?k=10&category=category:{other}")
        assert {_category(i) for i in _items(filtered.json())} == {other}
        added = client.put(
            "/admin/items/new-bag",
            json={"available": True, "features": {"category": other}},
            headers={"X-API-Key": KEY},
        )
        assert added.status_code == 200 and added.json()["item_id"] == "new-bag"
        similar = client.get("/v1/items/new-bag/similar?k=5").json()
        assert similar["item_id"] == "new-bag" and len(similar["items"]) == 5
        hidden = after[0]
        client.put(f"/admin/items/{hidden}", json={"available": False}, headers={"X-API-Key": KEY})
        assert hidden not in _items(client.get("/v1/users/u7/recommendations?k=10").json())
    rebuilt = build(
        resolve_source(data),
        artifacts,
        TowerConfig(members=1),
        TARGETS,
        progress=False,
        policy=RebuildPolicy(gate=False),
    )
    absorbed = pl.read_parquet(rebuilt.path / "posted_events.parquet")
    assert absorbed["user_id"].to_list() == ["u7"] * 5
    assert absorbed["timestamp"][0] == 1_796_032_800  # 10:00 UTC
    items = pl.read_parquet(rebuilt.path / "data" / "items.parquet")
    assert items.filter(pl.col("item_id") == "new-bag")["category"].to_list() == [other]
