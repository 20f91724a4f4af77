"""The item catalogue a worker answers from: the version's items, their categories for
filters, and the changes made since (`features.catalogue_log`): hidden items, and new
items placed in the space by the item tower from their features alone.

Why an overlay and not a new index: a version's index is immutable. Hidden items are a
mask checked on every result; new items sit in a small exact index searched beside Annoy
until a build includes them. Each applied change bumps `generation`, which goes into the
cache keys, so no answer cached before a change is served after it."""

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features.catalogue_log import (
    Features,
    ItemChange,
    changes_path,
    item_cells,
    merged_features,
    read_changes,
)
from features.config import FeatureConfig
from features.event_stream import START, CatalogueStream
from features.side_tables import feature_values, is_bucket_label
from features.vocab import ID
from recsys.core.artifacts import read_manifest
from recsys.core.layout import VersionLayout
from serving.ids import IdLookup
from serving.item_tower import ItemTower

Filters = dict[str, list[str]]  # column -> accepted values (text)


class FilterError(ValueError):
    """A filter that names a column the catalogue cannot filter on."""


@dataclass
class CategoryColumn:
    """One item feature column: category text -> index, and each category's items."""

    codes: dict[str, int]
    starts: np.ndarray  # (C + 1,) posting list bounds
    items: np.ndarray  # item_idx grouped by category
    dtype: pl.DataType  # of the column in the item table, for new items' values
    bucketed: bool = False  # the build bucketed its values (a quantity, not categories)
    item_starts: np.ndarray | None = None  # (I + 1,) bounds of each item's categories
    item_codes: np.ndarray | None = None  # category indices, item by item

    @classmethod
    def load(cls, vocab_path: Path, bags: pl.Series, dtype: pl.DataType) -> "CategoryColumn":
        categories = pl.read_parquet(vocab_path)[ID].cast(pl.String).to_list()
        lengths = bags.list.len().fill_null(0).to_numpy()
        values = bags.explode().drop_nulls().to_numpy().astype(np.int64)
        rows = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        order = np.argsort(values, kind="stable")
        counts = np.bincount(values, minlength=len(categories))
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        bucketed = bool(categories) and all(is_bucket_label(c) for c in categories)
        codes = {c: i for i, c in enumerate(categories)}
        item_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(codes, starts, rows[order], dtype, bucketed, item_starts, values)

    def counts_among(self, items: np.ndarray) -> np.ndarray:
        """(C,) how many of `items` (the version's item indices, each once) carry each
        category."""
        assert self.item_starts is not None and self.item_codes is not None
        items = np.unique(items[items < len(self.item_starts) - 1])
        parts = [self.item_codes[self.item_starts[i] : self.item_starts[i + 1]] for i in items]
        codes = np.concatenate([np.unique(p) for p in parts]) if parts else np.zeros(0, np.int64)
        return np.bincount(codes, minlength=len(self.codes))

    def items_with(self, values: list[str]) -> np.ndarray:
        codes = [self.codes[v] for v in values if v in self.codes]
        parts = [self.items[self.starts[c] : self.starts[c + 1]] for c in codes]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def texts(self, cell: Any, separator: str) -> list[str]:
        """A new item's cell of this column (`features.catalogue_log.cell`) as category
        text, the way the build turns the item table's cells into categories."""
        values = feature_values(pl.Series([cell], dtype=self.dtype), separator, self.bucketed)
        if values is None or values[0] is None:
            return []
        return [str(text) for text in values[0] if text is not None]

    def encode(self, texts: list[str]) -> list[int]:
        """Category indices of the texts the version knows (others have no embedding row)."""
        return [self.codes[t] for t in texts if t in self.codes]


@dataclass
class NewItem:
    raw: str
    embedding: np.ndarray
    categories: dict[str, set[str]]  # column -> values as text
    available: bool = True
    features: Features = field(default_factory=dict)  # every column given, as stored


@dataclass
class Catalogue:
    """Per version: category columns, the item tower, and the changes applied so far."""

    items: IdLookup  # the version's item IDs
    columns: dict[str, CategoryColumn]
    tower: ItemTower | None
    separator: str
    changes: Path
    hidden: np.ndarray = field(init=False)  # (I,) bool
    new_items: dict[str, NewItem] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)  # new item -> its place in order
    generation: int = 0
    any_hidden: bool = False
    offset: int = 0
    stream: CatalogueStream | None = None  # the hosts' shared changes, read after the file's
    position: str = START  # the stream's last entry applied
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _block: tuple[np.ndarray, np.ndarray] | None = None  # new items' (N, D) and available

    def __post_init__(self) -> None:
        self.hidden = np.zeros(len(self.items), dtype=bool)

    @classmethod
    def load(
        cls, version: Path, items: IdLookup, stream: CatalogueStream | None = None
    ) -> "Catalogue":
        layout = VersionLayout(version)
        summary = read_manifest(layout.data, verify=False)
        separator = summary.get("feature_config", {}).get(
            "multi_value_separator", FeatureConfig().multi_value_separator
        )
        columns: dict[str, CategoryColumn] = {}
        features = layout.side_features("items")
        if features.is_file() and layout.table("items").is_file():
            bags = pl.read_parquet(features).sort("item_idx")
            schema = pl.read_parquet_schema(layout.table("items"))
            for column in bags.columns:
                vocab = layout.side_vocabulary("items", column)
                if column != "item_idx" and vocab.is_file():
                    columns[column] = CategoryColumn.load(vocab, bags[column], schema[column])
        catalogue = cls(
            items,
            columns,
            ItemTower.load(version),
            separator,
            changes_path(version.parent.parent),
            stream=stream,
        )
        catalogue.poll()
        return catalogue

    # -- changes ---------------------------------------------------------------------------

    def poll(self) -> int:
        """Apply the changes written since the last poll; how many."""
        with self._lock:
            changes, self.offset = read_changes(self.changes, self.offset)
            changes += self._shared()
            for change in changes:
                self._apply(change)
            if changes:
                self._block = None
            self.generation += len(changes)
            self.any_hidden = bool(self.hidden.any())
            return len(changes)

    def _shared(self) -> list[ItemChange]:
        """The shared log's changes after the last one applied; an unreachable log is
        logged once per outage and read again on the next poll."""
        stream = self.stream
        if stream is None:
            return []
        read = stream.polled(lambda: stream.read_after(self.position))
        if read is None:
            return []
        changes, self.position = read
        return changes

    def _apply(self, change: ItemChange) -> None:
        raw = str(change.item_id)
        index = self.items.find(raw)
        if index is not None:
            self.hidden[index] = not change.available
            return
        known = self.new_items.get(raw)
        if change.features is not None and self.tower is not None:
            features = merged_features(known.features if known else None, change.features)
            self._place(raw, features or {}, change.available)
        elif known is not None:
            known.available = change.available

    def _place(self, raw: str, features: Features, available: bool) -> None:
        """Embed a new item from every column given to it so far (the latest value of
        each), through the same cells a build writes into the item table."""
        assert self.tower is not None
        schema = {c: column.dtype for c, column in self.columns.items()}
        cells = item_cells(features, schema, self.separator, raw)
        texts = {c: self.columns[c].texts(one, self.separator) for c, one in cells.items()}
        codes = {c: self.columns[c].encode(v) for c, v in texts.items()}
        categories = {c: set(v) for c, v in texts.items()}
        if raw not in self.new_items:
            self.positions[raw] = len(self.new_items)
        embedding = self.tower.embed(codes)
        self.new_items[raw] = NewItem(raw, embedding, categories, available, features)

    # -- requests --------------------------------------------------------------------------

    def hidden_mask(self) -> np.ndarray | None:
        """The hidden items, or None when none is (the fast path)."""
        return self.hidden if self.any_hidden else None

    def new_list(self) -> list[NewItem]:
        """New items in the order they were first added: item index = items + position."""
        return list(self.new_items.values())

    def index_of(self, raw: object) -> int | None:
        """The item index of a request's ID: the version's items first, then the new ones
        (the version's item count plus their position), None for an ID neither holds. Why
        every route resolves IDs here: a new item named in a history, an exclusion or an
        event must be excluded and counted as seen like any other."""
        index = self.items.find(raw)
        if index is not None or not self.new_items:
            return index
        key = self.items.typed(raw)
        position = None if key is None else self.positions.get(str(key))
        return None if position is None else len(self.items) + position

    def vectors(self, indices: np.ndarray) -> np.ndarray:
        """(N, D) the item tower's vectors of new items, by item index."""
        new = self.new_list()
        return np.stack([new[i - len(self.items)].embedding for i in indices.tolist()])

    def check(self, filters: Filters) -> None:
        unknown = sorted(set(filters) - set(self.columns))
        if unknown:
            filterable = ", ".join(sorted(self.columns)) or "none (the version has no item table)"
            raise FilterError(
                f"cannot filter on {', '.join(unknown)}; filterable columns: {filterable}"
            )

    def shared_category(self, items: np.ndarray) -> Filters:
        """The category most of `items` share, as a filter (`{"genres": ["Horror"]}`), or
        none: among the values held by at least half of them (and two), the one with the
        most information, count x log(lift), lift being its share among them over its share
        of the catalogue (tf-idf's weighting: all ten in a genre of 3% of the catalogue
        beats all ten in a language of 60%). Bucketed quantities do not count: a price
        range is no interest. What a user just did, named by the catalogue's own columns."""
        items = np.unique(items[items < len(self.items)])
        needed = max(2, -(-len(items) // 2))
        best: tuple[float, str, str] | None = None
        for name, column in self.columns.items():
            if column.bucketed or column.item_codes is None or len(items) < needed:
                continue
            counts = column.counts_among(items)
            sizes = np.diff(column.starts)
            for code in np.flatnonzero(counts >= needed).tolist():
                lift = (counts[code] / len(items)) / (sizes[code] / max(1, len(self.items)))
                weight = float(counts[code] * np.log(lift))
                if weight > 0 and (best is None or weight > best[0]):
                    text = next(t for t, c in column.codes.items() if c == code)
                    best = (weight, name, text)
        return {} if best is None else {best[1]: [best[2]]}

    def allowed(self, filters: Filters) -> np.ndarray | None:
        """(I,) bool: the version's items that pass every filter (None: no filters)."""
        if not filters:
            return None
        self.check(filters)
        mask = np.ones(len(self.items), dtype=bool)
        for column, values in filters.items():
            hit = np.zeros(len(self.items), dtype=bool)
            hit[self.columns[column].items_with(values)] = True
            mask &= hit
        return mask

    def new_block(self, filters: Filters) -> tuple[np.ndarray, np.ndarray] | None:
        """The new items' embeddings (N, D), stacked once per change rather than per
        request (10,000 new items made every miss 50-110 ms), and which of them may be
        answered: available and passing every filter. None without new items."""
        block = self._block
        if block is None:
            new = self.new_list()
            if not new:
                return None
            block = (
                np.stack([item.embedding for item in new]).astype(np.float32),
                np.array([item.available for item in new], dtype=bool),
            )
            self._block = block
        matrix, available = block
        mask = available.copy()
        if filters:
            for n, item in enumerate(self.new_list()):
                if mask[n] and not all(
                    item.categories.get(c, set()) & set(v) for c, v in filters.items()
                ):
                    mask[n] = False
        return matrix, mask

    def new_candidates(self, filters: Filters) -> list[tuple[int, NewItem]]:
        """(item index, new item) of the new items that are available and pass every
        filter; a new item's index is the version's item count plus its position."""
        return [
            (len(self.items) + n, item)
            for n, item in enumerate(self.new_list())
            if item.available
            and all(item.categories.get(c, set()) & set(v) for c, v in filters.items())
        ]
