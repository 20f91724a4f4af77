"""The two-tower model: one TorchRec EmbeddingBagCollection holds every table (the item
ID table serves the item tower and both history bags of the user tower), and an MLP per
tower maps pooled features to the shared embedding space.

With `members` > 1 the model is a deep ensemble: every table is `members` times as wide,
member m owns the m-th slice of each row and its own MLPs (each trained alone as a
one-member model: `training.ensemble`). The served vector is the members' embeddings
side by side, scaled so that its dot products are the members' average."""

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from features.feature_set import FeatureSet
from recsys.core import schema as s
from training.batches import HISTORY, RECENT, FeatureKeys, feature_keys, side_key
from training.config import USER_SUMMED, Similarity, TowerConfig
from training.dropout import ByteDropout


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the model: sizes from the data plus the tower config."""

    num_users: int
    num_items: int
    user_categories: dict[str, int] = field(default_factory=dict)  # column -> categories
    item_categories: dict[str, int] = field(default_factory=dict)
    tower: TowerConfig = field(default_factory=TowerConfig)

    @property
    def keys(self) -> FeatureKeys:
        return feature_keys(list(self.user_categories), list(self.item_categories))

    @property
    def members(self) -> int:
        return self.tower.members or 1

    def table_rows(self) -> dict[str, int]:
        """Rows of the table each feature key looks up."""
        rows = {s.ITEM_ID: self.num_items, HISTORY: self.num_items, RECENT: self.num_items}
        rows[s.USER_ID] = self.num_users
        for side, categories in (("user", self.user_categories), ("item", self.item_categories)):
            rows.update({side_key(side, column): size for column, size in categories.items()})
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tower": self.tower.to_dict()}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> "ModelSpec":
        return cls(
            num_users=payload["num_users"],
            num_items=payload["num_items"],
            user_categories=dict(payload["user_categories"]),
            item_categories=dict(payload["item_categories"]),
            tower=TowerConfig.from_dict(payload["tower"]),
        )


def model_spec(features: FeatureSet, tower: TowerConfig) -> ModelSpec:
    """The model a log's sizes and categories call for."""
    return ModelSpec(
        num_users=features.num_users,
        num_items=features.num_items,
        user_categories=features.category_counts.get("users", {}),
        item_categories=features.category_counts.get("items", {}),
        tower=tower,
    )


def _tables(spec: ModelSpec) -> list[EmbeddingBagConfig]:
    """Every table; with weighted bags each bag is a sum over weights that add up to 1 (a
    weighted mean: `training.batches` normalises them)."""
    cfg, members = spec.tower, spec.members
    pooling = PoolingType.SUM if cfg.weighted_bags else PoolingType.MEAN
    tables = [
        EmbeddingBagConfig(
            name="item_table",
            embedding_dim=cfg.id_width * members,
            num_embeddings=max(1, spec.num_items),
            feature_names=[s.ITEM_ID, HISTORY, RECENT],
            pooling=pooling,
        ),
        EmbeddingBagConfig(
            name="user_table",
            embedding_dim=cfg.id_width * members,
            num_embeddings=max(1, spec.num_users),
            feature_names=[s.USER_ID],
            pooling=pooling,
        ),
    ]
    for side, categories in (("user", spec.user_categories), ("item", spec.item_categories)):
        for column, size in categories.items():
            key = side_key(side, column)
            tables.append(
                EmbeddingBagConfig(
                    name=f"{key}_table",
                    embedding_dim=cfg.feature_width * members,
                    num_embeddings=max(1, size),
                    feature_names=[key],
                    pooling=pooling,
                )
            )
    return tables


def _mlp(inputs: int, hidden: int, out: int, skip: bool) -> nn.Module:
    """A hidden layer, or with `hidden` 0 one linear map. Beside a skip path its last layer
    starts at zero, so training starts from the plain factorisation model."""
    if hidden == 0:
        last = nn.Linear(inputs, out)
        mlp: nn.Module = last
    else:
        first, last = nn.Linear(inputs, hidden), nn.Linear(hidden, out)
        mlp = nn.Sequential(first, nn.GELU(), last)
    if skip:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return mlp


class TwoTower(nn.Module):
    def __init__(self, spec: ModelSpec, device: torch.device | None = None) -> None:
        super().__init__()
        self.spec = spec
        cfg = spec.tower
        self.ebc = EmbeddingBagCollection(
            tables=_tables(spec), is_weighted=bool(cfg.weighted_bags), device=device
        )
        keys = spec.keys
        self.user_keys = list(keys.user)
        self.item_keys = list(keys.item)
        user_in = 3 * cfg.id_width + cfg.feature_width * len(spec.user_categories)
        item_in = cfg.id_width + cfg.feature_width * len(spec.item_categories)
        members = range(spec.members)
        out = cfg.width
        hidden, skip = cfg.hidden_dim, cfg.skip
        self.user_mlps = nn.ModuleList(_mlp(user_in, hidden, out, skip) for _ in members)
        self.item_mlps = nn.ModuleList(_mlp(item_in, hidden, out, skip) for _ in members)
        # On the pooled inputs while training: regularises the embedding rows feeding them.
        self.dropout = ByteDropout(cfg.dropout)

    def _tower(
        self, pooled: dict[str, Tensor], keys: list[str], mlps: nn.ModuleList, summed: int
    ) -> Tensor:
        """Each member's MLP on its slice of the pooled features, plus (with the skip path)
        the sum of the first `summed` of them -> (B, members x dim)."""
        members, cfg = self.spec.members, self.spec.tower
        # (B, members, width) per key, side by side: member m's inputs are row m.
        inputs = torch.cat([pooled[k].unflatten(1, (members, -1)) for k in keys], dim=2)
        inputs = self.dropout(inputs)
        out = torch.stack([mlp(inputs[:, m]) for m, mlp in enumerate(mlps)], dim=1)
        if cfg.skip:
            out = out + inputs[..., : summed * cfg.id_width].unflatten(-1, (summed, -1)).sum(-2)
        if self.spec.tower.similarity is Similarity.COSINE:
            out = F.normalize(out, dim=-1)
        return out.flatten(1) / math.sqrt(members)

    def forward(self, features: KeyedJaggedTensor) -> tuple[Tensor, Tensor]:
        """(user embeddings, item embeddings), each (B, members x embedding_dim): the
        vectors the index holds."""
        pooled = self.ebc(features).to_dict()
        # The skip path sums the user's ID row and history means, and the item's ID row and
        # feature rows (LightFM's item: a cold item is its categories' rows). User features
        # are priors shared by whole groups: summed too, they pulled each group's users to
        # one point (a warm rebuild's recall fell 0.779 -> 0.726 in tests/test_nightly.py).
        user = self._tower(pooled, self.user_keys, self.user_mlps, USER_SUMMED)
        item = self._tower(pooled, self.item_keys, self.item_mlps, len(self.item_keys))
        return user, item
