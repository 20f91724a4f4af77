"""What a service worker holds for one version: the recommender (embeddings, mmap'd index,
seen items), the user tower for history-based requests (in NumPy: a worker never imports
torch), and ID lookups."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from features.event_log import events_dir
from features.jagged import CsrBags
from features.ordering import Ordering
from recsys.core import schema as s
from recsys.core.artifacts import read_manifest
from recsys.core.layout import VersionLayout
from serving.fresh import FreshEvents, UserEvents
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
    histories: CsrBags  # per user_idx: item_idx in the order the user tower reads them
    fresh: FreshEvents  # events after what this version absorbed

    @classmethod
    def load(cls, path: Path) -> "VersionState":
        """Load a committed version (under ARTIFACTS/versions/) and the events after it."""
        recommender = Recommender.load(path)  # verifies the manifest and every checksum
        layout = VersionLayout(path)
        summary = read_manifest(layout.data, verify=False)["summary"]
        absorbed = read_manifest(path, verify=False).get("events_absorbed", {})
        ordering = Ordering(summary.get("ordering", Ordering.SEQUENCE.value))
        log = pl.read_parquet(layout.interactions, columns=[s.USER_IDX, s.ITEM_IDX])
        counts = np.bincount(log[s.USER_IDX].to_numpy(), minlength=len(recommender.user_ids))
        fresh = FreshEvents(events_dir(path.parent.parent), absorbed)
        fresh.poll()
        return cls(
            version=recommender.version,
            path=path,
            recommender=recommender,
            tower=UserTower.load(path, ordering),
            items=IdLookup(recommender.item_ids),
            users=IdLookup(recommender.user_ids),
            histories=CsrBags(
                np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                log[s.ITEM_IDX].to_numpy().astype(np.int64),
            ),
            fresh=fresh,
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
        return self.users.index(self.user_key(raw))

    def item_index(self, raw: int | str) -> int | None:
        key = self._raw(raw, self.recommender.item_ids.dtype)
        return None if key is None else self.items.index(key)

    def seen(self, user: int) -> np.ndarray:
        seen = self.recommender.seen
        return seen.values[seen.offsets[user] : seen.offsets[user + 1]]

    def history(self, user: int) -> np.ndarray:
        """The user's items as the version's user tower read them (ingest's order)."""
        return self.histories.values[
            self.histories.offsets[user] : self.histories.offsets[user + 1]
        ]

    def fresh_events(self, raw_user: int | str) -> UserEvents | None:
        """The user's events newer than this version, if any."""
        return self.fresh.of_user(str(self.user_key(raw_user)))

    def embed_history(self, user: int | None, history: list[int]) -> np.ndarray:
        """The user tower applied to a history given in the request (oldest first)."""
        return self.tower.embed(user, history)

    def item_ids(self, indices: np.ndarray) -> list[int | str]:
        return self.items.raw(indices)
