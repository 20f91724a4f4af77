"""Room in a known user's answer for what their new events share (issue 34: on
MovieLens-100K 10 posted events of a genre absent from the top 20 gave it 0.00 of user 1's
next 20, and 0.03 on average on the log without timestamps; target 0.2)."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient
from helpers import private_copy

from data.synthetic import SyntheticConfig, generate
from features.sources import resolve_source
from recsys.core.versions import VersionStore
from recsys.pipeline import build
from serving.app import create_app
from serving.settings import ServiceSettings
from serving.state import VersionState
from training.config import TrainConfig

pytestmark = pytest.mark.slow  # builds a model

SYNTHETIC = SyntheticConfig(rows=12_000, users=150, items=160, clusters=4, taste=0.9, seed=11)
SHELVES = 8  # a category the planted clusters know nothing of: the model cannot infer it


def _shelf(item: int) -> int:
    return (item * 7) % SHELVES


@pytest.fixture(scope="module")
def shelved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("focus")
    data = generate(root / "data", SYNTHETIC)
    items = pl.read_parquet(data / "items.parquet")
    items = items.with_columns(
        pl.col("item_id").map_elements(_shelf, return_dtype=pl.Int64).alias("shelf"),
        (pl.col("item_id") * 13.7 + 1).alias("price"),  # a quantity: never an interest
    )
    items.write_parquet(data / "items.parquet")
    build(
        resolve_source(data), root / "artifacts", config=TrainConfig(max_epochs=3), progress=False
    )
    return root / "artifacts"


def test_the_shared_category_is_what_most_new_events_have_and_is_no_quantity(shelved):
    catalogue = VersionState.load(VersionStore(shelved).current()).catalogue
    shelf = catalogue.columns["shelf"]
    items = catalogue.items
    of_shelf = [i for i in range(len(items)) if _shelf(int(items.raw(np.array([i]))[0])) == 3]
    assert catalogue.shared_category(np.array(of_shelf[:10])) == {"shelf": ["3"]}
    mixed = np.array(of_shelf[:4] + [i for i in range(len(items)) if i not in of_shelf][:6])
    assert "shelf" not in catalogue.shared_category(mixed)  # 4 of 10 is no shared interest
    assert catalogue.shared_category(np.array(of_shelf[:1])) == {}  # one event is none
    assert "price" in catalogue.columns and catalogue.columns["price"].bucketed
    assert shelf.counts_among(np.array(of_shelf[:10] * 2))[shelf.codes["3"]] == 10


def test_ten_events_of_a_shelf_absent_from_the_top_20_take_a_share_of_the_next(shelved, tmp_path):
    artifacts = private_copy(shelved, tmp_path)
    settings = ServiceSettings(artifacts=artifacts, redis_url=None)
    shares = []
    with TestClient(create_app(settings)) as client:
        for user in range(0, 150, 15):
            before = client.get(f"/v1/users/{user}/recommendations?k=20").json()["items"]
            counts = np.bincount([_shelf(i["item_id"]) for i in before], minlength=SHELVES)
            shelf = int(np.argmin(counts))
            picks = [i for i in range(SYNTHETIC.items) if _shelf(i) == shelf][-10:]
            events = [{"user_id": user, "item_id": i} for i in picks]
            assert client.post("/v1/events", json={"events": events}).status_code == 202
            after = client.get(f"/v1/users/{user}/recommendations?k=20").json()["items"]
            shares.append(np.mean([_shelf(i["item_id"]) == shelf for i in after]))
            assert not {i["item_id"] for i in after} & set(picks)  # what they did is seen
            scores = [i["score"] for i in after]
            assert scores == sorted(scores, reverse=True)  # one ranking, the model's scores
            posted = client.post("/v1/recommendations", json={"user_id": user, "k": 20}).json()[
                "items"
            ]
            assert [i["item_id"] for i in posted] == [i["item_id"] for i in after]
    assert min(shares) >= 0.2 and np.mean(shares) >= 0.3, shares
