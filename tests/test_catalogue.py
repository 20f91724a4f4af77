"""Catalogue changes between builds and filters at retrieval (issue 15): hidden items leave
every route and stay hidden, new items are embedded from their features and searchable at
once, and category filters return only qualifying items."""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient
from helpers import private_copy, recsys, small_version

from data.synthetic import SyntheticConfig, home_clusters
from recsys.core.versions import VersionStore
from recsys.processes import served
from serving.app import create_app
from serving.index import IndexBackend, IndexTargets
from serving.index_params import IndexParams
from serving.settings import ServiceSettings
from training.config import TrainConfig

pytestmark = pytest.mark.slow

KEY = "admin-key-for-tests"
SYNTHETIC = SyntheticConfig(rows=8_000, users=200, items=120, clusters=4, seed=5)


@pytest.fixture(
    scope="module",
    params=[IndexBackend.AUTO, IndexBackend.HNSW, IndexBackend.PQ],
    ids=lambda b: b.value,
)
def built(tmp_path_factory, request) -> Path:
    """A version served as measured (exact search at this size), one served by an HNSW
    graph and one by the PQ scan: hidden items, new items and filters work the
    same through each."""
    root, index = tmp_path_factory.mktemp("catalogue"), IndexTargets(backend=request.param)
    artifacts = small_version(root, SYNTHETIC, TrainConfig(max_epochs=2), index)
    params = IndexParams.read(VersionStore(artifacts).current() / "index")
    named = {IndexBackend.HNSW: "hnsw", IndexBackend.PQ: "pq"}
    assert params.backend == named.get(request.param, "exact")
    return artifacts


@pytest.fixture
def artifacts(built, tmp_path) -> Path:
    return private_copy(built, tmp_path)


def _settings(artifacts: Path, redis_url: str) -> ServiceSettings:
    return ServiceSettings(artifacts=artifacts, redis_url=redis_url, admin_api_key=KEY)


@pytest.fixture
def client(artifacts, redis_url) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(artifacts, redis_url))) as test_client:
        yield test_client


def _genres(built: Path) -> dict[int, set[str]]:
    items = pl.read_parquet(built.parent / "data" / "items.parquet")
    return {i: set(g) for i, g in zip(items["item_id"], items["genres"], strict=True)}


def _items(answer: dict) -> list:
    return [i["item_id"] for i in answer["items"]]


def _put(client, item, body) -> httpx.Response:
    return client.put(f"/admin/items/{item}", json=body, headers={"X-API-Key": KEY})


@pytest.mark.parametrize("exact_subset", [50_000, 4], ids=["exact-subset", "index-overfetch"])
def test_filters_return_only_qualifying_items(client, built, exact_subset, monkeypatch):
    """Small subsets are scored exactly; larger ones go through the index with over-fetching
    (forced here by lowering the threshold)."""
    monkeypatch.setattr("serving.recommender.EXACT_SUBSET", exact_subset)
    genres = _genres(built)
    rare = "genre-01"
    qualifying = {i for i, g in genres.items() if rare in g}
    answer = client.get(f"/v1/users/3/recommendations?k=10&category=genres:{rare}").json()
    assert _items(answer) and set(_items(answer)) <= qualifying
    assert len(answer["items"]) == min(10, len(qualifying))
    either = client.get(
        "/v1/users/3/recommendations?k=30&category=genres:genre-01&category=genres:genre-02"
    ).json()
    assert len(either["items"]) == 30
    assert all(genres[i] & {"genre-01", "genre-02"} for i in _items(either))
    posted = client.post(
        "/v1/recommendations", json={"user_id": 3, "k": 5, "categories": {"genres": [rare]}}
    ).json()
    assert set(_items(posted)) <= qualifying
    similar = client.get(f"/v1/items/0/similar?k=5&category=genres:{rare}").json()
    assert set(_items(similar)) <= qualifying - {0}
    session = client.post(
        "/v1/recommendations", json={"history": [0, 1], "k": 5, "categories": {"genres": [rare]}}
    ).json()
    assert set(_items(session)) <= qualifying - {0, 1}
    unknown_user = client.get(f"/v1/users/nobody/recommendations?k=5&category=genres:{rare}")
    assert set(_items(unknown_user.json())) <= qualifying
    assert client.get("/v1/users/3/recommendations?category=colour:red").status_code == 422
    assert client.get("/v1/users/3/recommendations?category=no-colon").status_code == 422
    none = client.get("/v1/users/3/recommendations?category=genres:no-such-genre").json()
    assert none["items"] == []


def test_a_hidden_item_leaves_every_route_and_stays_hidden(client, artifacts, redis_url):
    top = _items(client.get("/v1/users/3/recommendations?k=10").json())[0]
    popular = _items(client.get("/v1/users/nobody/recommendations?k=10").json())[0]
    for item in {top, popular}:
        assert _put(client, item, {"available": False}).status_code == 200
    assert top not in _items(client.get("/v1/users/3/recommendations?k=10").json())
    assert popular not in _items(client.get("/v1/users/nobody/recommendations?k=10").json())
    assert client.get(f"/v1/items/{top}/similar").status_code == 404
    for item in range(0, 120, 7):
        answer = client.get(f"/v1/items/{item}/similar?k=20")
        assert answer.status_code == 404 or not {top, popular} & set(_items(answer.json()))
    session = client.post("/v1/recommendations", json={"history": [1, 2], "k": 50}).json()
    assert not {top, popular} & set(_items(session))
    batch = recsys(
        "recommend", "--artifacts", artifacts, "--out", artifacts / "r.parquet", "--k", 20
    )
    assert batch.returncode == 0
    assert f"{len({top, popular})} hidden item(s) left out" in batch.stdout
    assert not {top, popular} & set(pl.read_parquet(artifacts / "r.parquet")["item_id"])
    with TestClient(create_app(_settings(artifacts, redis_url))) as restarted:
        assert top not in _items(restarted.get("/v1/users/3/recommendations?k=10").json())
        assert _put(restarted, top, {"available": True}).status_code == 200
        assert top in _items(restarted.get("/v1/users/3/recommendations?k=10").json())
    # without the admin key: refused
    assert client.put(f"/admin/items/{top}", json={"available": False}).status_code == 401


def test_a_new_item_is_embedded_from_its_features_and_found(client, built, artifacts):
    user_home, item_cluster = home_clusters(SYNTHETIC)
    genres = _genres(built)
    cluster = 2
    genre = sorted(genres[int(np.flatnonzero(item_cluster == cluster)[0])])[0]
    assert _put(client, 5000, {"available": True}).status_code == 422  # no features
    assert _put(client, 5000, {"available": True, "features": {"colour": "red"}}).status_code == 422
    added = _put(client, 5000, {"available": True, "features": {"genres": [genre]}})
    assert added.status_code == 200 and added.json()["new"] is True
    similar = client.get("/v1/items/5000/similar?k=5").json()
    assert len(similar["items"]) == 5 and similar["item_id"] == 5000
    everything = client.get("/v1/items/0/similar?k=200").json()
    assert 5000 in _items(everything)
    filtered = client.get(f"/v1/users/3/recommendations?k=200&category=genres:{genre}").json()
    assert 5000 in _items(filtered)
    # users of the item's cluster rank it higher than the others do
    ranks = {True: [], False: []}
    for user in range(0, 200, 4):
        answer = _items(client.get(f"/v1/users/{user}/recommendations?k=200").json())
        ranks[bool(user_home[user] == cluster)].append(answer.index(5000))
    assert np.mean(ranks[True]) < np.mean(ranks[False])
    assert _put(client, 5000, {"available": False}).status_code == 200
    assert 5000 not in _items(client.get("/v1/items/0/similar?k=200").json())


def test_hiding_reaches_every_worker_within_two_seconds(artifacts, redis_url):
    env = {"REDIS_URL": redis_url, "RECSYS_ADMIN_API_KEY": KEY}
    with served(artifacts, env=env, workers=2) as base:
        top = _items(httpx.get(f"{base}/v1/users/3/recommendations?k=10").json())[0]
        for _ in range(10):  # warm both workers' caches with the item in the answer
            httpx.get(f"{base}/v1/users/3/recommendations?k=10")
        hidden = httpx.put(
            f"{base}/admin/items/{top}", json={"available": False}, headers={"X-API-Key": KEY}
        )
        assert hidden.status_code == 200
        time.sleep(2.0)
        for _ in range(20):  # new connections: both workers answer
            answer = httpx.get(f"{base}/v1/users/3/recommendations?k=10").json()
            assert top not in _items(answer)
    stored = (artifacts / "catalogue" / "changes.jsonl").read_text().splitlines()
    assert [json.loads(line)["available"] for line in stored] == [False]


def test_the_next_build_keeps_hidden_items_hidden_and_takes_new_items(
    client, built, artifacts, redis_url
):
    from features.sources import resolve_source
    from recsys.build_config import RebuildPolicy
    from recsys.pipeline import build
    from training.config import TowerConfig

    top = _items(client.get("/v1/users/3/recommendations?k=10").json())[0]
    _put(client, top, {"available": False})
    _put(client, 5001, {"available": True, "features": {"genres": ["genre-03", "genre-04"]}})
    report = build(
        resolve_source(built.parent / "data"),
        artifacts,
        TowerConfig(members=1),
        TrainConfig(max_epochs=1),
        progress=False,
        policy=RebuildPolicy(gate=False),
    )
    items = pl.read_parquet(report.path / "data" / "items.parquet")
    assert items.filter(pl.col("item_id") == 5001)["genres"].to_list() == [["genre-03", "genre-04"]]
    assert items.height == 121
    with TestClient(create_app(_settings(artifacts, redis_url))) as rebuilt:
        answer = rebuilt.get("/v1/users/3/recommendations?k=10").json()
        assert answer["model_version"] == report.version
        assert top not in _items(answer)
        assert rebuilt.get("/v1/items/5001/similar?k=3").status_code == 200


def test_new_items_merge_into_a_table_under_the_shops_own_names(tmp_path):
    from features.catalogue_log import ItemChange, append_change, merged_item_table

    table = tmp_path / "items.csv"
    table.write_text("sku,category,price\nA-1,shoes|red,10.5\nA-2,hats,3.0\n")
    changes = tmp_path / "changes.jsonl"
    append_change(changes, ItemChange("A-3", True, {"category": ["bags", "blue"]}))
    append_change(changes, ItemChange("A-1", True, {"price": ["12.0"]}))
    append_change(changes, ItemChange("A-3", False))  # hidden later: features kept
    out = merged_item_table(changes, table, tmp_path / "merged.parquet", {"item_id": "sku"})
    assert out is not None
    merged = pl.read_parquet(out).sort("sku")
    assert merged["sku"].to_list() == ["A-1", "A-2", "A-3"]
    assert merged["category"].to_list() == ["shoes|red", "hats", "bags|blue"]
    assert merged["price"].to_list() == [12.0, 3.0, None]
