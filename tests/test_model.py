"""The towers' skip path: a new model is matrix factorisation (ID row plus history means,
dotted with the item's row), which the MLP then corrects. Without it the MLP alone mapped
sparse logs' rows, and a default build scored 0.68x ALS on the sparse check-in log."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchrec import KeyedJaggedTensor

from recsys.build_config import BuildConfig
from recsys.core import schema as s
from training.batches import HISTORY, RECENT
from training.config import TowerConfig, member_width
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
    tower = TowerConfig(embedding_dim=32)
    assert tower.id_width == tower.feature_width == 32
    assert TowerConfig(embedding_dim=32, id_dim=48, skip=False).id_width == 48
    for widths in ({"id_dim": 48}, {"feature_dim": 16}):
        with pytest.raises(ValueError, match="must equal embedding_dim"):
            TowerConfig(embedding_dim=32, **widths)  # type: ignore[arg-type]


def test_table_widths_alone_need_no_embedding_size_without_the_skip_path():
    """`[tower] id_dim = 48` with `skip = false` was refused while the embedding size was
    left to the log ("need embedding_dim set too"), although only the skip path ties the
    tables' width to it."""
    tower = TowerConfig(id_dim=48, feature_dim=16, skip=False).resolve(800_000, id_rows=70_000)
    assert (tower.embedding_dim, tower.id_width, tower.feature_width) == (256, 48, 16)
    with pytest.raises(ValueError, match="set embedding_dim too"):
        TowerConfig(id_dim=48)  # the skip path: the log's width would refuse 48 later


def test_versions_from_before_the_skip_path_load_without_it():
    payload = TowerConfig(embedding_dim=16).to_dict()
    del payload["skip"]
    assert TowerConfig.from_dict(payload).skip is False
    assert TowerConfig.from_dict(TowerConfig().to_dict()).skip is True


def test_a_changed_embedding_size_carries_the_tables_with_it(tmp_path: Path) -> None:
    """`[tower] embedding_dim = 128` over the defaults (a settings file, a flag, the stored
    settings of the last build) once failed: the defaults had fixed the tables at 64."""
    settings = BuildConfig().with_overrides({"tower": {"embedding_dim": 128}})
    assert settings.tower.id_width == settings.tower.feature_width == 128
    stored = tmp_path / "build_config.toml"
    stored.write_text(BuildConfig().to_toml())
    again = BuildConfig.from_file(stored)
    assert again.with_overrides({"tower": {"embedding_dim": 32}}).tower.id_width == 32


def test_the_default_width_shares_the_served_vector_and_stays_64_for_huge_catalogues():
    assert [member_width(m) for m in (1, 2, 3, 4, 8)] == [256, 128, 80, 64, 64]
    assert member_width(1, id_rows=70_000) == 256  # tens of thousands of users and items
    assert member_width(1, id_rows=500_000) == 128
    assert member_width(1, id_rows=2_000_000) == 64  # a million users and a million items
    small = TowerConfig().resolve(80_000, id_rows=2_600)  # MovieLens-100K: as before
    assert (small.members, small.embedding_dim, small.output_dim) == (4, 64, 256)
    large = TowerConfig().resolve(800_000, id_rows=70_000)
    assert (large.members, large.embedding_dim, large.output_dim) == (1, 256, 256)
    assert TowerConfig(embedding_dim=32).resolve(800_000).embedding_dim == 32  # a setting
