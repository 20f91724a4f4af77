"""Catalogue changes as the service and every build read them alike: feature values are
checked against the item table's types, values are split by one rule, successive changes
merge column by column, and items added between builds count like the version's own in
histories, exclusions and posted events (probe of `PUT /admin/items` on MovieLens-100K)."""

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient
from helpers import private_copy
from test_catalogue import SYNTHETIC, _items, _put, _settings

from features.catalogue_log import ItemChange, append_change, changes_path, merged_item_table
from features.side_tables import feature_values
from serving.app import create_app
from training.config import TrainConfig

pytestmark = pytest.mark.slow

NEW = 77001
YEAR = 2031  # no item of the version has it: a filter on it holds only new items


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The catalogue tests' synthetic log, its item table given an Int32 `year` column
    (eight values: a category, as MovieLens' years are)."""
    from data.synthetic import generate
    from features.sources import resolve_source
    from recsys.pipeline import build

    root = tmp_path_factory.mktemp("catalogue-values")
    generate(root / "data", SYNTHETIC)
    table = root / "data" / "items.parquet"
    items = pl.read_parquet(table)
    year = (1990 + pl.col("item_id") % 8).cast(pl.Int32).alias("year")
    items.with_columns(year).write_parquet(table)
    artifacts = root / "artifacts"
    build(
        resolve_source(root / "data"), artifacts, config=TrainConfig(max_epochs=2), progress=False
    )
    return artifacts


@pytest.fixture
def artifacts(built, tmp_path) -> Path:
    return private_copy(built, tmp_path)


@pytest.fixture
def client(artifacts, redis_url) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(artifacts, redis_url))) as test_client:
        yield test_client


def _stored(artifacts: Path) -> list[dict]:
    path = changes_path(artifacts)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _merged(artifacts: Path, built: Path) -> pl.DataFrame:
    """The item table the next build ingests (the build's own merge of the changes)."""
    out = merged_item_table(
        changes_path(artifacts), built.parent / "data" / "items.parquet", artifacts / "m.parquet"
    )
    assert out is not None
    return pl.read_parquet(out)


def _filtered(client, query: str) -> list:
    return _items(client.get(f"/v1/users/3/recommendations?k=200&{query}").json())


@pytest.mark.parametrize("value", ["abc", 1995.5, True, 2**66, [1995, 1996]])
def test_a_value_the_item_tables_type_cannot_hold_is_refused(client, artifacts, value):
    """Probe: `year` is Int32, yet "abc", 1995.5, true and 2**66 were acknowledged, filed as
    categories by the service and stored as null by the next build."""
    answer = _put(
        client, 99001, {"available": True, "features": {"genres": ["genre-01"], "year": value}}
    )
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert "year" in detail and "Int32" in detail
    assert _stored(artifacts) == []
    assert 99001 not in _filtered(client, "category=year:abc")


def test_a_value_the_type_holds_is_stored_as_every_reader_reads_it(client, artifacts, built):
    for item, year in ((99002, 1999), (99003, "1998"), (99004, 1997.0)):
        answer = _put(client, item, {"available": True, "features": {"year": year}})
        assert answer.status_code == 200, answer.text
    assert [c["features"]["year"] for c in _stored(artifacts)] == [["1999"], ["1998"], ["1997"]]
    assert 99002 in _filtered(client, "category=year:1999")
    merged = _merged(artifacts, built).filter(pl.col("item_id") >= 99002).sort("item_id")
    assert merged["year"].to_list() == [1999, 1998, 1997]
    assert merged.schema["year"] == pl.Int32


def test_a_bar_inside_a_list_value_is_one_value_in_the_service_and_the_build(
    client, artifacts, built
):
    """Probe: the service split "Comedy|Drama" into two genres, the build kept one value."""
    assert _put(client, 99005, {"available": True, "features": {"genres": ["genre-01|genre-02"]}})
    assert 99005 not in _filtered(client, "category=genres:genre-01")
    assert 99005 in _filtered(client, "category=genres:genre-01|genre-02")
    row = _merged(artifacts, built).filter(pl.col("item_id") == 99005)
    assert row["genres"].to_list() == [["genre-01|genre-02"]]
    state = client.app.state.resources.live.state
    served = state.catalogue.new_items["99005"].categories["genres"]
    assert served == set(feature_values(row["genres"], "|")[0].to_list())


def test_successive_changes_merge_column_by_column(client, artifacts, built):
    """Probe: a second PUT giving only genres lost the year given before, in the build."""
    first = {"genres": ["genre-01", "genre-02"], "year": 1999}
    assert _put(client, 99001, {"available": True, "features": first}).status_code == 200
    assert _put(client, 99001, {"available": True, "features": {"genres": ["genre-03"]}})
    assert _put(client, 99001, {"available": False}).status_code == 200
    assert _put(client, 99001, {"available": True}).status_code == 200
    assert 99001 in _filtered(client, "category=year:1999")
    assert 99001 in _filtered(client, "category=genres:genre-03")
    assert 99001 not in _filtered(client, "category=genres:genre-01")
    row = _merged(artifacts, built).filter(pl.col("item_id") == 99001)
    assert row["year"].to_list() == [1999] and row["genres"].to_list() == [["genre-03"]]
    # a known item: the columns given replace its cells, the others stay
    assert _put(client, 5, {"available": True, "features": {"year": 1995}}).status_code == 200
    known = _merged(artifacts, built).filter(pl.col("item_id") == 5)
    base = pl.read_parquet(built.parent / "data" / "items.parquet").filter(pl.col("item_id") == 5)
    assert (
        known["year"].to_list() == [1995] and known["genres"].to_list() == base["genres"].to_list()
    )


def test_a_stored_value_the_type_cannot_hold_is_quarantined_by_every_reader(
    artifacts, built, redis_url
):
    """Changes stored before types were checked: the bad column is left as it was."""
    path = changes_path(artifacts)
    append_change(path, ItemChange(99006, True, {"genres": ["genre-01"], "year": ["1999"]}, 1.0))
    append_change(path, ItemChange(99006, True, {"year": ["abc"]}, 2.0))
    row = _merged(artifacts, built).filter(pl.col("item_id") == 99006)
    assert row["genres"].to_list() == [["genre-01"]] and row["year"].to_list() == [None]
    with TestClient(create_app(_settings(artifacts, redis_url))) as restarted:
        assert 99006 in _filtered(restarted, "category=genres:genre-01")
        assert 99006 not in _filtered(restarted, "category=year:abc")


def _add_new(client) -> None:
    answer = _put(
        client, NEW, {"available": True, "features": {"genres": ["genre-01"], "year": YEAR}}
    )
    assert answer.status_code == 200, answer.text


def _recommend(client, body: dict) -> dict:
    answer = client.post("/v1/recommendations", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_an_excluded_new_item_is_never_returned(client):
    """Probe: `exclude: [77001]` returned 77001 and listed it in unknown_items."""
    _add_new(client)
    body = {"history": [5], "k": 5, "categories": {"year": [str(YEAR)]}}
    assert _items(_recommend(client, body)) == [NEW]
    answer = _recommend(client, {**body, "exclude": [NEW]})
    assert NEW not in _items(answer) and answer["unknown_items"] == []


def test_a_new_item_in_a_history_is_seen_and_counts(client):
    """Probe: history [50, 77001] was answered (from the cache) as [50], and history
    [77001] alone with the popular fallback."""
    _add_new(client)
    body = {"history": [5], "k": 5, "categories": {"year": [str(YEAR)]}}
    _recommend(client, body)
    with_new = _recommend(client, {**body, "history": [5, NEW]})
    assert not with_new["cached"] and _items(with_new) == [] and with_new["unknown_items"] == []
    alone = _recommend(client, {"history": [NEW], "k": 3})
    assert not alone["fallback"] and NEW not in _items(alone)
    similar = client.get(f"/v1/items/{NEW}/similar?k=3").json()
    assert _items(alone) == _items(similar)
    mixed = _recommend(client, {"history": [5, NEW], "k": 10})
    plain = _recommend(client, {"history": [5], "k": 10})
    assert [i["score"] for i in mixed["items"]] != [i["score"] for i in plain["items"]]


@pytest.mark.parametrize("user", [1, 987654], ids=["known", "unknown"])
def test_a_posted_event_on_a_new_item_counts_as_seen(client, user):
    """Probe: user 1 posted an event on 77001 and was recommended 77001 back."""
    _add_new(client)
    query = f"k=5&category=year:{YEAR}"
    before = client.get(f"/v1/users/{user}/recommendations?{query}").json()
    assert _items(before) == [NEW] if user == 1 else before["fallback"]  # popular: no events
    events = {"events": [{"user_id": user, "item_id": NEW}]}
    posted_events = client.post("/v1/events", json=events)
    assert posted_events.status_code == 202 and posted_events.json()["accepted"] == 1
    after = client.get(f"/v1/users/{user}/recommendations?{query}").json()
    assert _items(after) == [] and not after["fallback"]
    posted = _recommend(client, {"user_id": user, "k": 5, "categories": {"year": [str(YEAR)]}})
    assert _items(posted) == []
    unfiltered = client.get(f"/v1/users/{user}/recommendations?k=20").json()
    assert NEW not in _items(unfiltered) and not unfiltered["fallback"]
    assert np.isfinite([i["score"] for i in unfiltered["items"]]).all()
