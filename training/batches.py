"""Mini-batches as TorchRec KeyedJaggedTensors, cut on the host with vectorised NumPy.

All features of both towers go into one KJT, keys in the EmbeddingBagCollection's own
feature order, so no permute is needed (fbgemm's jagged ops have no CUDA kernels in the
CPU build; finished tensors can be moved to a device as they are).
"""

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torchrec import KeyedJaggedTensor

from features.feature_set import FeatureSet
from features.jagged import CsrBags
from features.ordering import Ordering
from recsys.core import schema as s
from training.collective import all_sum
from training.config import TowerConfig

Jagged = tuple[np.ndarray, np.ndarray]  # (values, lengths)
# (values, lengths, weights): a bag whose items count by their events' weights.
Weighted = tuple[np.ndarray, np.ndarray, np.ndarray]
Part = Jagged | Weighted

HISTORY = "history"
RECENT = "recent"


def side_key(side: str, column: str) -> str:
    return f"{side}:{column}"


@dataclass(frozen=True)
class FeatureKeys:
    """Feature names of each tower, and the order of all keys in a batch."""

    user: tuple[str, ...]
    item: tuple[str, ...]
    order: tuple[str, ...]


def feature_keys(user_columns: list[str], item_columns: list[str]) -> FeatureKeys:
    user = (s.USER_ID, HISTORY, RECENT, *(side_key("user", c) for c in user_columns))
    item = (s.ITEM_ID, *(side_key("item", c) for c in item_columns))
    # The table order of training.model.TwoTower: item table (item_id, history, recent),
    # user table, then side-feature tables.
    order = (s.ITEM_ID, HISTORY, RECENT, s.USER_ID, *user[3:], *item[1:])
    return FeatureKeys(user, item, order)


@dataclass
class Batch:
    features: KeyedJaggedTensor
    item_ids: torch.Tensor  # (B,) positive item of each row
    user_ids: torch.Tensor  # (B,) user of each row (the softmax's users' correction)


class BatchBuilder:
    """Turns event rows, users or items into KJTs for the two-tower model."""

    def __init__(self, features: FeatureSet, tower: TowerConfig) -> None:
        self.histories = features.histories
        self.tower = tower
        self.user_bags = _side_bags(features.user_bags, features.num_users)
        self.item_bags = _side_bags(features.item_bags, features.num_items)
        self.keys = feature_keys(list(self.user_bags), list(self.item_bags))
        self.item_of_row = features.histories.items
        # Items and users seen in training keep their ID; others are embedded from features.
        self.known_items = np.ones(features.num_items, dtype=bool)
        self.known_users = np.ones(features.num_users, dtype=bool)
        self.table_rows: np.ndarray | None = None  # per key in `keys.order`; see limit_to
        self._shuffle: tuple[np.ndarray, np.ndarray] | None = None  # see new_epoch

    def limit_to(self, table_rows: dict[str, int]) -> None:
        """Let a model with smaller tables (an older version) read these grown features:
        indices past its tables (new items in histories, new categories) are left out of
        the bags, as if absent. IDs of new users and items must be marked unknown too."""
        self.table_rows = np.array([table_rows[k] for k in self.keys.order], dtype=np.int64)

    def mark_known(self, train: pl.DataFrame) -> None:
        """Only users and items with training events use their ID rows; the others are
        embedded from history and side features alone (cold start). Counted over every
        rank's training events, so all ranks agree."""
        items = np.bincount(train[s.ITEM_IDX].to_numpy(), minlength=len(self.known_items))
        users = np.bincount(train[s.USER_IDX].to_numpy(), minlength=len(self.known_users))
        self.known_items, self.known_users = all_sum(items) > 0, all_sum(users) > 0

    def _assemble(self, parts: dict[str, Part], size: int) -> KeyedJaggedTensor:
        """One KJT of every key; with weighted bags each bag's weights are normalised to
        sum to 1 (the tables sum-pool), so an unweighted bag is its plain mean."""
        empty = (np.zeros(0, dtype=np.int64), np.zeros(size, dtype=np.int64))
        bags: list[Weighted] = []
        for position, key in enumerate(self.keys.order):
            part = parts.get(key, empty)
            values, lengths = part[0], part[1]
            weights = part[2] if len(part) == 3 else np.ones(len(values), dtype=np.float32)
            if self.table_rows is not None:
                values, lengths, weights = _within(
                    values, lengths, weights, int(self.table_rows[position])
                )
            bags.append((values, lengths, weights))
        pooled = None
        if self.tower.weighted_bags:
            pooled = torch.from_numpy(np.concatenate([_normalised(w, n) for _, n, w in bags]))
        return KeyedJaggedTensor.from_lengths_sync(
            keys=list(self.keys.order),
            values=torch.from_numpy(np.concatenate([v for v, _, _ in bags])),
            lengths=torch.from_numpy(np.concatenate([n for _, n, _ in bags])),
            weights=pooled,
        )

    def _ids(self, ids: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return ids[keep], keep.astype(np.int64)

    def _user_parts(
        self, users: np.ndarray, history: Part, recent: Part, keep_id: np.ndarray
    ) -> dict[str, Part]:
        parts: dict[str, Part] = {
            s.USER_ID: self._ids(users, keep_id),
            HISTORY: history,
            RECENT: recent,
        }
        for column, bags in self.user_bags.items():
            parts[side_key("user", column)] = bags.gather(users)
        return parts

    def _item_parts(self, items: np.ndarray, keep_id: np.ndarray) -> dict[str, Part]:
        parts: dict[str, Part] = {s.ITEM_ID: self._ids(items, keep_id)}
        for column, bags in self.item_bags.items():
            parts[side_key("item", column)] = bags.gather(items)
        return parts

    def new_epoch(self, rng: np.random.Generator) -> None:
        """Draw this epoch's order of each user's items (a set's history samples)."""
        if self.histories.ordering is Ordering.SET:
            self._shuffle = self.histories.shuffled(rng)

    def _bag(self, rows: np.ndarray, lengths: np.ndarray) -> Weighted:
        """Event rows -> their items, weighted by the events' weights."""
        return self.histories.items[rows], lengths, self.histories.weights_of(rows)

    def _histories_of(self, rows: np.ndarray) -> tuple[Part, Part]:
        """(history, recent) bags of training events: the items before each event in a
        sequence; in a set, other items of the user drawn at random (no recent bag)."""
        cfg, histories = self.tower, self.histories
        if histories.ordering is Ordering.SEQUENCE:
            return (
                self._bag(*histories.previous_rows(rows, cfg.history_length)),
                self._bag(*histories.previous_rows(rows, cfg.recent_length)),
            )
        if self._shuffle is None:
            self._shuffle = histories.shuffled(np.random.default_rng(0))
        order, position = self._shuffle
        history = self._bag(*histories.other_rows(rows, cfg.history_length, position, order))
        return history, _empty(len(rows))

    def _latest(self, users: np.ndarray) -> tuple[Part, Part]:
        """(history, recent) bags of users after all their events in the histories."""
        history = self._bag(*self.histories.latest_rows(users, self.tower.history_length))
        if self.histories.ordering is Ordering.SET:
            return history, _empty(len(users))
        return history, self._bag(*self.histories.latest_rows(users, self.tower.recent_length))

    def training_batch(self, rows: np.ndarray, rng: np.random.Generator | None = None) -> Batch:
        """Event rows -> users with their history as of the event (never the event's own
        item), and the event's item."""
        rows = np.asarray(rows, dtype=np.int64)
        users = self.histories.user_of(rows)
        items = self.item_of_row[rows]
        history, recent = self._histories_of(rows)
        size = len(rows)
        if rng is not None and self.tower.id_dropout > 0:
            keep_user = rng.random(size) >= self.tower.id_dropout
            keep_item = rng.random(size) >= self.tower.id_dropout
        else:
            keep_user = keep_item = np.ones(size, dtype=bool)
        parts = self._user_parts(users, history, recent, keep_user & self.known_users[users])
        parts.update(self._item_parts(items, keep_item & self.known_items[items]))
        return Batch(self._assemble(parts, size), torch.from_numpy(items), torch.from_numpy(users))

    def users_now(self, users: np.ndarray) -> KeyedJaggedTensor:
        """Users after all their events in the histories (for recommendations, and for
        validation when the histories hold only the training events)."""
        users = np.asarray(users, dtype=np.int64)
        history, recent = self._latest(users)
        return self._assemble(
            self._user_parts(users, history, recent, self.known_users[users]), len(users)
        )

    def users_with_history(
        self, users: np.ndarray, histories: list[np.ndarray]
    ) -> KeyedJaggedTensor:
        """Users given by the caller's own recent items (oldest first), as in a session.
        A user of -1 is anonymous: no ID and no user features, only the history."""
        users = np.asarray(users, dtype=np.int64)
        anonymous = users < 0
        safe = np.where(anonymous, 0, users)

        def jagged(n: int) -> tuple[np.ndarray, np.ndarray]:
            cut = [np.asarray(h, dtype=np.int64)[-n:] for h in histories]
            values = np.concatenate(cut) if cut else np.zeros(0, dtype=np.int64)
            return values, np.array([len(c) for c in cut], dtype=np.int64)

        keep_id = ~anonymous & self.known_users[safe]
        recent = (
            _empty(len(users))
            if self.histories.ordering is Ordering.SET
            else jagged(self.tower.recent_length)
        )
        parts = self._user_parts(safe, jagged(self.tower.history_length), recent, keep_id)
        for key, part in list(parts.items()):
            if key.startswith("user:") and anonymous.any():
                values, lengths = part[0], part[1]
                keep = np.repeat(~anonymous, lengths)
                parts[key] = (values[keep], np.where(anonymous, 0, lengths))
        return self._assemble(parts, len(users))

    def items(self, items: np.ndarray) -> KeyedJaggedTensor:
        items = np.asarray(items, dtype=np.int64)
        return self._assemble(self._item_parts(items, self.known_items[items]), len(items))


def _empty(size: int) -> Jagged:
    return np.zeros(0, dtype=np.int64), np.zeros(size, dtype=np.int64)


def _within(values: np.ndarray, lengths: np.ndarray, weights: np.ndarray, rows: int) -> Weighted:
    """A jagged feature without the values that are not rows of a `rows`-row table."""
    keep = values < rows
    if keep.all():
        return values, lengths, weights
    bag = np.repeat(np.arange(len(lengths)), lengths)
    kept = np.bincount(bag[keep], minlength=len(lengths)).astype(np.int64)
    return values[keep], kept, weights[keep]


def _normalised(weights: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Weights scaled to sum to 1 within each bag; a bag whose weights are all 0 counts its
    items alike."""
    if not len(weights):
        return weights.astype(np.float32)
    bag = np.repeat(np.arange(len(lengths)), lengths)
    totals = np.bincount(bag, weights=weights, minlength=len(lengths))
    empty = totals[bag] <= 0
    if empty.any():
        weights = np.where(empty, 1.0, weights)
        totals = np.bincount(bag, weights=weights, minlength=len(lengths))
    return (weights / totals[bag]).astype(np.float32)


def _side_bags(table, rows: int) -> dict[str, CsrBags]:
    if table is None:
        return {}
    index = table.columns[0]
    table = table.sort(index)
    if table.height != rows:
        raise ValueError(f"feature table has {table.height} rows, expected {rows}")
    return {c: CsrBags.from_lists(table[c]) for c in table.columns[1:]}
