"""The item tower in NumPy, for items added between builds: the same computation as
`training.model.TwoTower`'s item side in evaluation mode, from the version's own files.
A new item has no ID row (its ID bag is empty, as for cold items in a build), so its
vector comes from its categories alone: the metric-learning promise that a new object is
placed in the space from its features, without retraining."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys.core.layout import VersionLayout
from serving.user_tower import TABLE, Layer, load_mlps, run_members
from serving.weights import mapped_tensors
from training.config import Similarity, TowerConfig, legacy_keys
from training.spectral import stored_rank


@dataclass
class ItemTower:
    similarity: Similarity
    skip: bool  # the towers' skip path: the item's bags (ID, empty here, and features) summed
    id_width: int  # of the item ID table's rows (all members)
    side_tables: dict[str, np.ndarray]  # item feature column -> (categories, dim x members)
    mlps: list[list[Layer]]
    branch_rank: int = 0  # the spectral branch's width: a new item has no row there (zeros)

    @classmethod
    def load(cls, version: Path) -> "ItemTower":
        layout = VersionLayout(version)
        spec = json.loads(layout.model_spec.read_text())
        tower = TowerConfig.from_dict(spec["tower"])
        weights = legacy_keys(mapped_tensors(layout.model_weights))
        columns = list(spec["item_categories"])  # the model's order
        return cls(
            similarity=tower.similarity,
            skip=tower.skip,
            id_width=weights[TABLE.format("item")].shape[1],
            side_tables={c: weights[TABLE.format(f"item:{c}")] for c in columns},
            mlps=load_mlps(weights, "item", tower.members or 1),
            branch_rank=stored_rank(layout.spectral),
        )

    def embed(self, categories: dict[str, list[int]]) -> np.ndarray:
        """(members x dim,) the vector of an item without an ID row and these category
        indices per feature column (missing columns: empty bags)."""
        bags = [np.zeros(self.id_width, dtype=np.float32)]
        for column, table in self.side_tables.items():
            rows = np.asarray([r for r in categories.get(column, []) if r < len(table)], np.int64)
            bags.append(
                table[rows].mean(axis=0) if len(rows) else np.zeros(table.shape[1], np.float32)
            )
        vector = run_members(bags, self.mlps, self.similarity, skip=len(bags) if self.skip else 0)
        return np.concatenate([vector, np.zeros(self.branch_rank, np.float32)])
