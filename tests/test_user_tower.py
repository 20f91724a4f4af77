"""The service's NumPy user tower against the PyTorch/TorchRec model it stands for: the same
vectors for known, unknown and anonymous users, with and without features, for every
shape of tower, so that serving without torch cannot drift from training."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from data.synthetic import SyntheticConfig, generate
from features.feature_set import FeatureSet
from features.ingest import ingest
from features.ordering import Ordering
from features.sources import resolve_source
from recsys.core.layout import VersionLayout
from serving.item_tower import ItemTower
from serving.user_tower import UserTower
from training.batches import BatchBuilder
from training.config import Similarity, TowerConfig
from training.export import save_model
from training.model import TwoTower, model_spec

BASE = TowerConfig(embedding_dim=8, hidden_dim=16, history_length=6)


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> tuple[Path, FeatureSet]:
    root = tmp_path_factory.mktemp("tower")
    cfg = SyntheticConfig(rows=2_000, users=60, items=40, clusters=3, seed=2)
    generate(root / "raw", cfg)
    ingest(resolve_source(root / "raw"), root / "data")
    return root, FeatureSet.load(root / "data")


def _version(
    root: Path, features: FeatureSet, tower: TowerConfig, version: Path
) -> tuple[Path, TwoTower]:
    """A version directory with what the NumPy tower reads: the data, the model, and which
    users have an ID row (every other one is unknown)."""
    torch.manual_seed(0)
    spec = model_spec(features, tower)
    model = TwoTower(spec).eval()
    with torch.no_grad():  # non-zero biases and rows everywhere
        for value in model.state_dict().values():
            value.copy_(torch.randn_like(value) * 0.3)
    layout = VersionLayout(version)
    save_model(model.state_dict(), spec, layout.model)
    layout.embeddings.mkdir(parents=True)
    known = np.arange(features.num_users) % 2 == 0
    pl.DataFrame({"known": known}).write_parquet(layout.side_embeddings("users"))
    layout.data.symlink_to(root / "data")
    return version, model


@pytest.mark.parametrize(
    "tower",
    [
        replace(BASE, weighted_bags=True),
        replace(BASE, members=3),
        replace(BASE, hidden_dim=0),
        replace(BASE, similarity=Similarity.DOT, members=2),
        replace(BASE, weighted_bags=False),
        replace(BASE, skip=False),
        replace(BASE, skip=False, hidden_dim=0, members=2),
    ],
    ids=[
        "weighted",
        "three-members",
        "linear",
        "dot-two-members",
        "plain-means",
        "mlp-alone",
        "linear-alone-two-members",
    ],
)
def test_numpy_tower_matches_the_model(features, tower, tmp_path):
    root, data = features
    tower = replace(tower, members=tower.members or 1)
    version, model = _version(root, data, tower, tmp_path / "version")
    numpy_tower = UserTower.load(version, data.ordering)
    builder = BatchBuilder(data, tower)
    builder.known_users = np.arange(data.num_users) % 2 == 0
    rng = np.random.default_rng(1)
    cases = [(0, [3, 4, 5]), (1, [7]), (None, [1, 2, 3, 4, 5, 6, 7, 8, 9]), (2, []), (None, [])]
    cases += [
        (int(u), list(rng.integers(0, data.num_items, rng.integers(0, 12))))
        for u in rng.integers(0, data.num_users, 8)
    ]
    for user, history in cases:
        users = np.array([-1 if user is None else user])
        kjt = builder.users_with_history(users, [np.asarray(history, dtype=np.int64)])
        with torch.no_grad():
            expected = model(kjt)[0][0].numpy()
        np.testing.assert_allclose(numpy_tower.embed(user, history), expected, atol=1e-5)


def test_a_sequence_keeps_a_recent_bag_and_a_set_does_not(features, tmp_path):
    root, data = features
    version, _ = _version(root, data, replace(BASE, members=1), tmp_path / "version")
    sequence = UserTower.load(version, Ordering.SEQUENCE)
    as_set = UserTower.load(version, Ordering.SET)
    history = [1, 2, 3, 4, 5, 6, 7, 8]
    assert not np.allclose(sequence.embed(0, history), as_set.embed(0, history))


@pytest.mark.parametrize(
    "tower",
    [
        replace(BASE, members=1),
        replace(BASE, members=3),
        replace(BASE, hidden_dim=0),
        replace(BASE, skip=False),
    ],
    ids=["one", "three-members", "linear", "mlp-alone"],
)
def test_numpy_item_tower_matches_the_model_for_items_without_an_id_row(features, tower, tmp_path):
    """A new item added between builds is embedded from its categories alone, as a cold
    item is in a build."""
    root, data = features
    assert data.item_bags is not None and data.item_bags.width > 1, "items need features"
    bags = data.item_bags.sort("item_idx")
    version, model = _version(root, data, tower, tmp_path / "version")
    numpy_tower = ItemTower.load(version)
    builder = BatchBuilder(data, tower)
    builder.known_items = np.zeros(data.num_items, dtype=bool)
    items = np.arange(data.num_items)
    with torch.no_grad():
        expected = model(builder.items(items))[1].numpy()
    for item in items.tolist():
        categories = {
            column: [int(c) for c in bags[column][item]]
            for column in bags.columns
            if column != "item_idx"
        }
        np.testing.assert_allclose(numpy_tower.embed(categories), expected[item], atol=1e-5)


@pytest.mark.parametrize("members", [1, 2])
def test_numpy_tower_weighs_history_items_as_the_model_does(features, members, tmp_path):
    """A fresh user's whole history is re-embedded at request time: with weighted bags, the
    NumPy tower must weigh each item by its event's weight as the model does, or the answer
    would jump for reasons unrelated to the user's new event."""
    root, data = features
    rng = np.random.default_rng(3)
    weights = rng.choice([0.1, 0.5, 1.0, 2.0], len(data.histories.items)).astype(np.float32)
    data = replace(data, histories=replace(data.histories, weights=weights))
    tower = replace(BASE, weighted_bags=True, members=members)
    version, model = _version(root, data, tower, tmp_path / "version")
    numpy_tower = UserTower.load(version, data.ordering)
    builder = BatchBuilder(data, tower)
    builder.known_users = np.arange(data.num_users) % 2 == 0
    users = np.arange(0, data.num_users, 5)
    with torch.no_grad():
        expected = model(builder.users_now(users))[0].numpy()
    offsets = data.histories.offsets
    for n, user in enumerate(users.tolist()):
        rows = slice(offsets[user], offsets[user + 1])
        history = data.histories.items[rows].tolist()
        got = numpy_tower.embed(user, history, weights[rows].tolist())
        np.testing.assert_allclose(got, expected[n], atol=1e-5)
        if len(set(weights[rows][-BASE.history_length :].tolist())) > 1:
            assert not np.allclose(numpy_tower.embed(user, history), expected[n], atol=1e-4)
