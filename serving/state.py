"""What a service worker holds for one version: the recommender (embeddings, mmap'd index,
seen items), the user tower for history-based requests (in NumPy: a worker never imports
torch), and ID lookups."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from features.ordering import Ordering
from recsys.core.artifacts import read_manifest
from recsys.core.layout import VersionLayout
from serving.recommender import Recommender
from serving.user_tower import UserTower


@dataclass
class VersionState:
    version: str
    path: Path
    recommender: Recommender
    tower: UserTower
    item_list: list[int | str]  # item_idx -> raw item ID, a list: indexing it beats a gather
    item_lookup: dict[object, int]  # raw item ID -> item_idx
    user_lookup: dict[object, int]

    @classmethod
    def load(cls, path: Path) -> "VersionState":
        recommender = Recommender.load(path)  # verifies the manifest and every checksum
        summary = read_manifest(VersionLayout(path).data, verify=False)["summary"]
        ordering = Ordering(summary.get("ordering", Ordering.SEQUENCE.value))
        item_list = recommender.item_ids.to_list()
        return cls(
            version=recommender.version,
            path=path,
            recommender=recommender,
            tower=UserTower.load(path, ordering),
            item_list=item_list,
            item_lookup={v: i for i, v in enumerate(item_list)},
            user_lookup={v: i for i, v in enumerate(recommender.user_ids.to_list())},
        )

    @property
    def search_ms(self) -> float:
        """What one k = 100 search of this version took at build time (0 if unmeasured)."""
        retriever = self.recommender.retriever
        params = getattr(retriever, "params", None)
        if params is None:
            return 0.0
        return params.exact_query_ms if params.backend == "exact" else params.query_ms

    def _raw(self, raw: object, dtype: pl.DataType) -> int | str | None:
        """A request's ID (always text in a URL) in the vocabulary's own type."""
        if dtype == pl.Int64:
            try:
                return int(str(raw))
            except ValueError:
                return None
        return str(raw)

    def user_key(self, raw: int | str) -> int | str:
        """The user ID in the vocabulary's type ("7" in a URL is user 7), as answered."""
        key = self._raw(raw, self.recommender.user_ids.dtype)
        return raw if key is None else key

    def user_index(self, raw: int | str) -> int | None:
        return self.user_lookup.get(self.user_key(raw))

    def item_index(self, raw: int | str) -> int | None:
        return self.item_lookup.get(self._raw(raw, self.recommender.item_ids.dtype))

    def seen(self, user: int) -> np.ndarray:
        seen = self.recommender.seen
        return seen.values[seen.offsets[user] : seen.offsets[user + 1]]

    def embed_history(self, user: int | None, history: list[int]) -> np.ndarray:
        """The user tower applied to a history given in the request (oldest first)."""
        return self.tower.embed(user, history)

    def item_ids(self, indices: np.ndarray) -> list[int | str]:
        ids = self.item_list
        return [ids[i] for i in indices.tolist()]
