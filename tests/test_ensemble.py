"""Ensembles: members trained alone, joined into one model whose served vectors score the
members' average; small logs get several members, large ones one."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from data.synthetic import SyntheticConfig, generate
from features.feature_set import FeatureSet
from features.ingest import ingest
from features.sources import resolve_source
from features.splits import leave_last_out
from training.batches import BatchBuilder
from training.config import TowerConfig, TrainConfig, legacy_keys
from training.embed import item_embeddings, user_embeddings_now
from training.ensemble import join_states, member_state
from training.model import TwoTower, model_spec

TOWER = TowerConfig(embedding_dim=16, id_dim=16, hidden_dim=32, history_length=10)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> FeatureSet:
    root = tmp_path_factory.mktemp("planted")
    cfg = SyntheticConfig(rows=3_000, users=120, items=80, clusters=4, taste=0.9, seed=4)
    generate(root / "data", cfg)
    ingest(resolve_source(root / "data"), root / "ingest")
    return FeatureSet.load(root / "ingest")


def test_members_follow_the_log_size():
    assert TowerConfig().resolve(80_000).members == 4  # MovieLens-100K's training events
    assert TowerConfig().resolve(400_000).members == 2
    assert TowerConfig().resolve(1_000_000).members == 1
    assert TowerConfig().resolve(50_000_000).members == 1
    assert TowerConfig(members=2).resolve(10).members == 2  # a setting is never overridden
    with pytest.raises(ValueError, match="members"):
        TowerConfig(members=0)


def _scores(model: TwoTower, builder: BatchBuilder, num_items: int, users: int) -> np.ndarray:
    items = item_embeddings(model, builder, num_items)
    return user_embeddings_now(model, builder, np.arange(users)) @ items.T


def test_joined_model_scores_the_members_average(planted):
    torch.manual_seed(0)
    spec = model_spec(planted, replace(TOWER, members=3))
    joined = TwoTower(spec).eval()
    builder = BatchBuilder(planted, spec.tower)
    single = model_spec(planted, replace(TOWER, members=1))
    members = []
    for m in range(3):
        member = TwoTower(single)
        member.load_state_dict(member_state(joined.state_dict(), spec, m), strict=True)
        members.append(member.eval())
    served = _scores(joined, builder, planted.num_items, planted.num_users)
    average = np.mean(
        [_scores(x, builder, planted.num_items, planted.num_users) for x in members], 0
    )
    np.testing.assert_allclose(served, average, atol=1e-5)
    assert not np.allclose(_scores(members[0], builder, planted.num_items, 5), average[:5])
    # Served vectors of cosine towers stay unit length, as the angular index expects.
    items = item_embeddings(joined, builder, planted.num_items)
    assert items.shape[1] == 3 * TOWER.embedding_dim
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, rtol=1e-5)
    # Splitting and joining again gives the same weights, bit for bit.
    rejoined = join_states([member_state(joined.state_dict(), spec, m) for m in range(3)])
    assert set(rejoined) == set(joined.state_dict())
    for key, value in joined.state_dict().items():
        assert torch.equal(rejoined[key], value), key


def test_weights_saved_before_members_existed_still_load(planted):
    spec = model_spec(planted, replace(TOWER, members=1))
    model = TwoTower(spec)
    old = {
        key.replace("user_mlps.0.", "user_mlp.").replace("item_mlps.0.", "item_mlp."): value
        for key, value in model.state_dict().items()
    }
    assert any(key.startswith("user_mlp.") for key in old)
    again = TwoTower(spec)
    again.load_state_dict(legacy_keys(old), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


@pytest.mark.slow
def test_an_ensemble_trains_each_member_from_its_own_seed(planted):
    from training.trainer import train

    split = leave_last_out(planted.interactions, n_test=0, n_valid=1)
    config = TrainConfig(max_epochs=3, batch_size=256, patience=3, seed=1, refit=False)
    result = train(planted, split, replace(TOWER, members=2), config, progress=False)
    assert result.spec.members == 2
    assert {record["member"] for record in result.history} == {0, 1}
    assert len(result.member_best_epochs) == 2
    first, second = (member_state(result.state, result.spec, m) for m in range(2))
    assert not torch.equal(
        first["ebc.embedding_bags.item_table.weight"],
        second["ebc.embedding_bags.item_table.weight"],
    )
    alone = [
        train(
            planted, split, replace(TOWER, members=1), replace(config, seed=1 + m), progress=False
        )
        for m in range(2)
    ]
    for m, member in enumerate(alone):  # member m is the one-member run of seed + m
        for key, value in member.state.items():
            assert torch.equal(member_state(result.state, result.spec, m)[key], value), key
    # The joined model's own validation figure, not a member's.
    assert result.best_metrics["recall@10"] not in [r.best_metrics["recall@10"] for r in alone]
