"""Catalogue changes are checked whole before they are stored, and a stored line no reader
can use never stops a restart or a build (issue 34, probes 3, 8 and 9)."""

import json

import pytest
import test_catalogue
from fastapi.testclient import TestClient
from test_catalogue import KEY, _items, _put, _settings

from features.catalogue_log import ItemChange, append_change, changes_path, read_changes
from serving.app import create_app

pytestmark = pytest.mark.slow

# The catalogue tests' fixtures: one small build for this module, a private copy per test.
built = test_catalogue.built
artifacts = test_catalogue.artifacts
client = test_catalogue.client


def _stored(artifacts) -> list[str]:
    path = changes_path(artifacts)
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize(
    "item", ["1_000", "007", "%D9%A1%D9%A2", "+5", "9" * 25, "x" * 300, "%20", "a%00b", "a%0Db"]
)
def test_a_put_item_id_is_canonical_or_refused(client, artifacts, item):
    """Probe: PUT /admin/items/1_000 created item 1000; 10 kB, NUL, CR, blank IDs and IDs
    beyond 64 bits were accepted."""
    answer = _put(client, item, {"available": True, "features": {"genres": ["genre-01"]}})
    assert answer.status_code in (404, 405, 422), answer.text
    assert _stored(artifacts) == []


@pytest.mark.parametrize(
    "features",
    [
        {},
        {"genres": []},
        {"genres": ["\ud800"]},
        {"genres": ["a\x00b"]},
        {"genres": ["x" * 300]},
        {"genres": [{"nested": 1}]},
        {"genres": [f"g{i}" for i in range(101)]},
    ],
)
def test_feature_values_are_checked_before_a_byte_is_stored(client, artifacts, features):
    answer = client.put(  # ASCII JSON: a lone surrogate travels as its escape
        "/admin/items/7001",
        content=json.dumps({"available": True, "features": features}),
        headers={"X-API-Key": KEY, "content-type": "application/json"},
    )
    assert answer.status_code == 422, answer.text
    assert _stored(artifacts) == []


def test_a_new_item_never_lists_itself_as_similar(client, artifacts):
    added = _put(client, 7002, {"available": True, "features": {"genres": ["genre-01"]}})
    assert added.status_code == 200
    similar = client.get("/v1/items/7002/similar?k=20").json()
    assert 7002 not in _items(similar) and len(similar["items"]) == 20


def test_new_items_are_bounded_between_builds(artifacts, redis_url):
    settings = _settings(artifacts, redis_url).model_copy(update={"max_new_items": 2})
    with TestClient(create_app(settings)) as bounded:
        for item in (8001, 8002):
            assert _put(bounded, item, {"available": True, "features": {"genres": ["genre-02"]}})
        refused = _put(bounded, 8003, {"available": True, "features": {"genres": ["genre-02"]}})
        assert refused.status_code == 422 and "RECSYS_MAX_NEW_ITEMS" in refused.text
        again = _put(bounded, 8001, {"available": False})  # changing a held one is fine
        assert again.status_code == 200


def test_unreadable_stored_changes_are_quarantined_by_every_reader(artifacts, built, redis_url):
    """Probe: a lone surrogate stored through PUT made every restart fail, and every build
    end in a traceback, since every version replays the change log."""
    from test_events import _rebuild

    path = changes_path(artifacts)
    append_change(path, ItemChange(9001, True, {"genres": ["genre-01"]}, 1.0))
    with path.open("a") as handle:
        handle.write('{"item_id":9002,"available":true,"features":{"genres":["\\ud800"]},"at":1}\n')
        handle.write('{"item_id":"\\ud800","available":false,"features":null,"at":1}\n')
        handle.write('{"item_id":9003,"available":"yes","features":null,"at":1}\n')
        handle.write('{"item_id":1e400,"available":true}\n')
        handle.write("not json\n")
    changes, _ = read_changes(path)
    assert [c.item_id for c in changes] == [9001]
    with TestClient(create_app(_settings(artifacts, redis_url))) as restarted:
        assert restarted.get("/readyz").status_code == 200
        assert restarted.get("/v1/items/9001/similar?k=3").status_code == 200
    report = _rebuild(artifacts, built.parent / "data")
    assert report.promoted
    with pytest.raises(ValueError):
        append_change(path, ItemChange("\ud800", True, None, 1.0))
    assert json.loads(_stored(artifacts)[0])["item_id"] == 9001
