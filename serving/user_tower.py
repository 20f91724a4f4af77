"""The user tower in NumPy, for request-time histories: the same computation as
`training.model.TwoTower` in evaluation mode (the tests hold the two to 1e-5), from the
version's own files, so that a service worker never imports torch or TorchRec (about
330 MB of a worker's memory went to importing them).

Per member m of the towers: each user-side bag (the user's ID, the history, the recent
items, each user feature) is the mean of its rows' m-th slices (an empty bag is zeros),
the bags side by side go through the member's MLP (Linear, exact GELU, Linear; or one
Linear), towers with a skip path add the ID and history bags, cosine towers normalise,
and the members' vectors are joined side by side and divided by sqrt(members). A version
with the spectral branch (`training.spectral`) appends the history's part of it."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from scipy.special import erf

from features.jagged import CsrBags
from features.ordering import Ordering
from recsys.core import schema as s
from recsys.core.layout import VersionLayout
from serving.weights import mapped_tensors
from training.config import USER_SUMMED, Similarity, TowerConfig, legacy_keys
from training.spectral import Spectral

TABLE = "ebc.embedding_bags.{}_table.weight"


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


@dataclass
class Layer:
    weight: np.ndarray  # (out, in)
    bias: np.ndarray  # (out,)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias


def run_members(
    bags: list[np.ndarray], mlps: list[list[Layer]], similarity: Similarity, skip: int = 0
) -> np.ndarray:
    """Member m's MLP on the m-th slices of the pooled bags, side by side, plus (the skip
    path) the sum of the first `skip` bags' slices; the members' vectors (normalised for
    cosine towers) joined and divided by sqrt(members)."""
    members = len(mlps)
    out = []
    for m, layers in enumerate(mlps):
        slices = [b.reshape(members, -1)[m] for b in bags]
        x = np.concatenate(slices)
        for n, layer in enumerate(layers):
            x = layer(x if n == 0 else _gelu(x))
        if skip:
            x = x + np.sum(slices[:skip], axis=0)
        if similarity is Similarity.COSINE:
            x = x / max(float(np.linalg.norm(x)), 1e-12)
        out.append(x)
    return (np.concatenate(out) / math.sqrt(members)).astype(np.float32)


def load_mlps(weights: dict[str, np.ndarray], side: str, members: int) -> list[list[Layer]]:
    """The `side` ("user" or "item") tower's layers of every member."""
    mlps = []
    for m in range(members):
        prefix = f"{side}_mlps.{m}."
        if f"{prefix}weight" in weights:  # a linear tower
            mlps.append([Layer(weights[f"{prefix}weight"], weights[f"{prefix}bias"])])
        else:
            mlps.append(
                [
                    Layer(weights[f"{prefix}{i}.weight"], weights[f"{prefix}{i}.bias"])
                    for i in (0, 2)
                ]
            )
    return mlps


@dataclass
class UserTower:
    tower: TowerConfig
    members: int
    ordering: Ordering
    user_table: np.ndarray  # (users, id_dim x members)
    item_table: np.ndarray  # (items, id_dim x members)
    side_tables: dict[str, np.ndarray]  # user feature column -> (categories, dim x members)
    side_bags: dict[str, CsrBags]  # user feature column -> categories of each user
    known_users: np.ndarray  # (users,) bool: trained with an ID row
    mlps: list[list[Layer]]  # per member: the layers between activations
    branch: Spectral | None = None  # the spectral branch, where the version has one

    @classmethod
    def load(cls, version: Path, ordering: Ordering) -> "UserTower":
        layout = VersionLayout(version)
        spec = json.loads(layout.model_spec.read_text())
        tower = TowerConfig.from_dict(spec["tower"])
        weights = legacy_keys(mapped_tensors(layout.model_weights))
        members = tower.members or 1
        columns = list(spec["user_categories"])  # the model's order (sorted, as stored)
        bags: dict[str, CsrBags] = {}
        if columns and layout.side_features("users").is_file():
            table = pl.read_parquet(layout.side_features("users")).sort(s.USER_IDX)
            bags = {c: CsrBags.from_lists(table[c]) for c in columns}
        known = pl.read_parquet(layout.side_embeddings("users"), columns=["known"])["known"]
        return cls(
            tower=tower,
            members=members,
            ordering=ordering,
            user_table=weights[TABLE.format("user")],
            item_table=weights[TABLE.format("item")],
            side_tables={c: weights[TABLE.format(f"user:{c}")] for c in columns},
            side_bags=bags,
            known_users=known.to_numpy().astype(bool),
            mlps=load_mlps(weights, "user", members),
            branch=Spectral(**mapped_tensors(layout.spectral))
            if layout.spectral.is_file()
            else None,
        )

    def _mean(
        self, table: np.ndarray, rows: np.ndarray, weights: np.ndarray | None = None
    ) -> np.ndarray:
        """The bag's mean row; with weighted bags (and weights given) its rows weighted by
        their events' weights, as the model's sum pooling of normalised weights (a bag
        whose weights are all 0 counts its rows alike)."""
        keep = rows < len(table)
        rows = rows[keep]
        if not len(rows):
            return np.zeros(table.shape[1], np.float32)
        if weights is None or not self.tower.weighted_bags:
            return table[rows].mean(axis=0)
        w = np.asarray(weights, dtype=np.float32)[keep]
        total = float(w.sum())
        if total <= 0:
            return table[rows].mean(axis=0)
        return (w / total) @ table[rows]

    def embed(
        self, user: int | None, history: list[int], weights: list[float] | None = None
    ) -> np.ndarray:
        """(members x dim,) the vector a user with this history (oldest first) gets; `user`
        None is anonymous (no ID, no user features). `weights`: each history item's event
        weight (None: all alike), used when the version weights its bags."""
        cfg = self.tower
        items = np.asarray(history, dtype=np.int64)
        w = None if weights is None else np.asarray(weights, dtype=np.float32)
        recent = cfg.recent_length if self.ordering is Ordering.SEQUENCE and len(items) else 0
        known = user is not None and 0 <= user < len(self.known_users) and self.known_users[user]

        def last(n: int) -> tuple[np.ndarray, np.ndarray | None]:
            if n <= 0 or not len(items):
                return items[:0], None if w is None else w[:0]
            return items[-n:], None if w is None else w[-n:]

        bags = [
            self._mean(self.user_table, np.array([user] if known else [], dtype=np.int64)),
            self._mean(self.item_table, *last(cfg.history_length)),
            self._mean(self.item_table, *last(recent)),
        ]
        for column, table in self.side_tables.items():
            rows = np.zeros(0, dtype=np.int64)
            column_bags = self.side_bags.get(column)
            if user is not None and column_bags is not None and user < len(column_bags.offsets) - 1:
                rows, _ = column_bags.gather(np.array([user]))
            bags.append(self._mean(table, rows))
        summed = USER_SUMMED if cfg.skip else 0
        vector = run_members(bags, self.mlps, cfg.similarity, skip=summed)
        if self.branch is None:
            return vector
        return np.concatenate([vector, self.branch.user(items, w)])
