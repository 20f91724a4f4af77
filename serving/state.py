"""What a service worker holds for one version: the recommender (embeddings, mmap'd index,
seen items), the user tower for history-based requests (in NumPy: a worker never imports
torch), and ID lookups."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.event_log import events_dir
from features.event_stream import SharedLog
from features.ordering import Ordering
from recsys.core.artifacts import read_manifest
from recsys.core.layout import VersionLayout
from serving.catalogue import Catalogue, Filters
from serving.fresh import DEFAULT_PER_USER, FreshEvents, UserEvents
from serving.ids import IdLookup
from serving.recommender import Recommender
from serving.user_tower import UserTower


@dataclass
class VersionState:
    version: str
    path: Path
    recommender: Recommender
    tower: UserTower
    items: IdLookup  # raw item ID <-> item_idx
    users: IdLookup  # raw user ID <-> user_idx
    fresh: FreshEvents  # events after what this version absorbed
    catalogue: Catalogue  # hidden and new items, categories for filters

    @classmethod
    def load(
        cls,
        path: Path,
        fresh_per_user: int = DEFAULT_PER_USER,
        shared: SharedLog | None = None,
    ) -> "VersionState":
        """Load a committed version (ARTIFACTS/versions/NAME) and what was posted after it
        (ARTIFACTS/events/, ARTIFACTS/catalogue/)."""
        recommender = Recommender.load(path)  # verifies the manifest and every checksum
        data_manifest = read_manifest(VersionLayout(path).data, verify=False)
        ordering = Ordering(data_manifest["summary"].get("ordering", Ordering.SEQUENCE.value))
        event_weights = data_manifest.get("feature_config", {}).get("event_weights", {})
        absorbed = read_manifest(path, verify=False).get("events_absorbed", {})
        artifacts = path.parent.parent
        events = shared.events if shared else None
        fresh = FreshEvents(events_dir(artifacts), absorbed, event_weights, fresh_per_user, events)
        fresh.poll()
        items = IdLookup(recommender.item_ids)
        return cls(
            version=recommender.version,
            path=path,
            recommender=recommender,
            tower=UserTower.load(path, ordering),
            items=items,
            users=IdLookup(recommender.user_ids),
            fresh=fresh,
            catalogue=Catalogue.load(path, items, shared.catalogue if shared else None),
        )

    @property
    def search_ms(self) -> float:
        """What one k = 100 search of this version took at build time (0 if unmeasured)."""
        retriever = self.recommender.retriever
        params = getattr(retriever, "params", None)
        if params is None:
            return 0.0
        return float(params.serving_query_ms)

    def user_key(self, raw: int | str) -> int | str:
        """The user ID in the vocabulary's type ("7" in a URL is user 7), as answered."""
        key = self.users.typed(raw)
        return raw if key is None else key

    def user_index(self, raw: int | str) -> int | None:
        return self.users.find(raw)

    def item_index(self, raw: int | str) -> int | None:
        return self.items.find(raw)

    def seen(self, user: int) -> np.ndarray:
        seen = self.recommender.seen
        return seen.values[seen.offsets[user] : seen.offsets[user + 1]]

    def history(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """The user's items as the version's user tower read them (ingest's order), and
        their events' weights."""
        rec = self.recommender
        rows = slice(rec.histories.offsets[user], rec.histories.offsets[user + 1])
        return rec.histories.values[rows], rec.history_weights[rows]

    def fresh_events(self, user_key: int | str) -> UserEvents | None:
        """The user's events newer than this version, if any (`user_key`: see user_key)."""
        return self.fresh.of_user(str(user_key))

    def embed_history(
        self, user: int | None, history: list[int], weights: list[float] | None = None
    ) -> np.ndarray:
        """The user tower applied to a history (oldest first), weighted when given."""
        return self.tower.embed(user, history, weights)

    @property
    def scope(self) -> str:
        """What cached answers depend on: the version and the catalogue changes applied."""
        return f"{self.version}.{self.catalogue.generation}"

    def item_ids(self, indices: np.ndarray) -> list[int | str]:
        """Raw IDs of item indices; indices past the version's items are new items."""
        if not self.catalogue.new_items:
            return self.items.raw(indices)
        known = len(self.items)
        new = self.catalogue.new_list()
        return [
            self.items.raw(np.array([i]))[0] if i < known else self.new_item_key(new[i - known].raw)
            for i in indices.tolist()
        ]

    def new_item_key(self, raw: str) -> int | str:
        key = self.items.typed(raw)
        return raw if key is None else key

    def search(
        self, query: np.ndarray, exclude: np.ndarray, k: int, filters: Filters
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best k visible items for a query vector: the version's index (hidden items and
        filters applied) and the new items, scored exactly."""
        shelf = self.catalogue
        ids, scores = self.recommender.for_vector(
            query, exclude, k, shelf.hidden_mask(), shelf.allowed(filters)
        )
        block = shelf.new_block(filters)
        if block is None:
            return ids, scores
        matrix, allowed = block
        known = len(self.items)
        banned = exclude[exclude >= known] - known
        allowed[banned[banned < len(allowed)]] = False
        extra_ids = np.flatnonzero(allowed)
        if not len(extra_ids):
            return ids, scores
        extra_scores = (matrix[extra_ids] @ query).astype(np.float32)
        if len(extra_ids) > k:
            best = np.argpartition(-extra_scores, k - 1)[:k]
            extra_ids, extra_scores = extra_ids[best], extra_scores[best]
        ids = np.concatenate([ids, extra_ids + known])
        scores = np.concatenate([scores.astype(np.float32), extra_scores])
        order = np.lexsort((ids, -scores))[:k]
        return ids[order], scores[order]

    def popular(
        self, exclude: np.ndarray, k: int, filters: Filters
    ) -> tuple[np.ndarray, np.ndarray]:
        """The most popular visible items (new items have no events yet)."""
        shelf = self.catalogue
        return self.recommender.popular(exclude, k, shelf.hidden_mask(), shelf.allowed(filters))
