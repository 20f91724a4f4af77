"""The towers' skip path: a new model is matrix factorisation (ID row plus history means,
dotted with the item's row), which the MLP then corrects. Without it the MLP alone mapped
sparse logs' rows, and a default build scored 0.68x ALS on the sparse check-in log."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchrec import KeyedJaggedTensor

from recsys.core import schema as s
from training.batches import HISTORY, RECENT
from training.config import TowerConfig
from training.model import ModelSpec, TwoTower

DIM, MEMBERS = 8, 2


def _model(**tower: object) -> TwoTower:
    torch.manual_seed(0)
    cfg = TowerConfig(embedding_dim=DIM, hidden_dim=16, members=MEMBERS, **tower)  # type: ignore[arg-type]
    return TwoTower(ModelSpec(num_users=4, num_items=6, tower=cfg)).eval()


def _batch() -> KeyedJaggedTensor:
    """Two rows: user 1 with history [0, 2, 3] and recent [3], item 5; user 2 with an empty
    history, item 4."""
    keys = [s.ITEM_ID, HISTORY, RECENT, s.USER_ID]
    values = [[5, 4], [0, 2, 3], [3], [1, 2]]
    lengths = [[1, 1], [3, 0], [1, 0], [1, 1]]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.tensor([v for part in values for v in part]),
        lengths=torch.tensor([n for part in lengths for n in part]),
    )


def _member_vectors(rows: torch.Tensor) -> torch.Tensor:
    """(B, members x dim) sums of rows -> the served vector of a cosine tower."""
    return F.normalize(rows.unflatten(1, (MEMBERS, DIM)), dim=-1).flatten(1) / math.sqrt(MEMBERS)


def test_a_new_model_with_the_skip_path_is_matrix_factorisation():
    model = _model()
    items = model.ebc.embedding_bags["item_table"].weight.detach()
    users = model.ebc.embedding_bags["user_table"].weight.detach()
    with torch.no_grad():
        user, item = model(_batch())
    first = users[1] + items[[0, 2, 3]].mean(0) + items[3]
    expected_users = _member_vectors(torch.stack([first, users[2]]))
    torch.testing.assert_close(user, expected_users)
    torch.testing.assert_close(item, _member_vectors(items[[5, 4]]))


def test_without_the_skip_path_the_mlp_alone_maps_the_rows():
    model = _model(skip=False)
    items = model.ebc.embedding_bags["item_table"].weight.detach()
    with torch.no_grad():
        _, item = model(_batch())
    assert not torch.allclose(item, _member_vectors(items[[5, 4]]), atol=1e-3)


def test_table_widths_follow_the_embedding_size_and_the_skip_path_needs_them_equal():
    assert TowerConfig(embedding_dim=32).id_dim == TowerConfig(embedding_dim=32).feature_dim == 32
    assert TowerConfig(embedding_dim=32, id_dim=48, skip=False).id_dim == 48
    for widths in ({"id_dim": 48}, {"feature_dim": 16}):
        with pytest.raises(ValueError, match="must equal embedding_dim"):
            TowerConfig(embedding_dim=32, **widths)  # type: ignore[arg-type]


def test_versions_from_before_the_skip_path_load_without_it():
    payload = TowerConfig(embedding_dim=16).to_dict()
    del payload["skip"]
    assert TowerConfig.from_dict(payload).skip is False
    assert TowerConfig.from_dict(TowerConfig().to_dict()).skip is True
