"""Item and user tables -> categorical feature bags keyed by dense index.

A column becomes a feature when it describes groups (genre, year, occupation); near-unique
columns (titles, zip codes) are kept for display but not used, since the ID already says
what they say. Multi-valued cells (lists, or text joined by a separator) become bags.
"""

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from features.config import FeatureConfig
from features.sources import CSV_SUFFIXES, scan_table
from features.vocab import ID, INDEX, Vocabulary, reconcile_ids
from recsys.core.errors import DataValidationError


@dataclass(frozen=True)
class SideFeatures:
    """Feature bags for one side (items or users)."""

    key: str  # item_id or user_id
    index: str  # item_idx or user_idx
    raw: pl.DataFrame  # the table as given, with the dense index added, for display
    bags: pl.DataFrame  # index column + one List[UInt32] column of category indices per feature
    vocabs: dict[str, Vocabulary] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)  # column -> why it is not a feature
    null_keys: int = 0
    duplicate_keys: int = 0


def read_side_table(
    path: Path, key: str, columns: dict[str, str] | None = None
) -> tuple[pl.DataFrame, int, int]:
    """Read a side table whole (it has one row per item or user), one row per key.

    Returns the table, the number of rows without a key and the number of repeated keys
    (the first row of each key is kept).
    """
    strings = (key,) if path.suffix.lower() in CSV_SUFFIXES else ()
    frame = scan_table(path, string_columns=strings, columns={key: (columns or {}).get(key, key)})
    names = frame.collect_schema().names()
    if key not in names:
        raise DataValidationError(
            path, key, f"required column is missing (found: {', '.join(names)})"
        )
    try:
        table = frame.collect()
    except pl.exceptions.PolarsError as exc:
        raise DataValidationError(path, None, f"cannot be read ({exc})") from exc
    dtype = table.schema[key]
    if not (dtype.is_integer() or dtype == pl.String):
        raise DataValidationError(path, key, f"expected integer or string IDs, found {dtype}")
    null_keys = table[key].null_count()
    table = table.filter(pl.col(key).is_not_null())
    unique = table.unique(subset=key, keep="first", maintain_order=True)
    return unique, null_keys, table.height - unique.height


def _bucketed(column: pl.Series) -> pl.Series:
    """A continuous column (a price, a rating average) as one category per value: the
    quarter-octave bucket of its magnitude (10.0 and 10.5 share one, 10 and 20 do not).
    Scale-free, needs no statistics of the table, and gives a value the same bucket in
    every build, so category indices stay stable across rebuilds."""
    x = pl.col(column.name).cast(pl.Float64)
    edge = pl.lit(2.0).pow((x.abs().log(2) * 4).floor() / 4).round_sig_figs(3).cast(pl.String)
    label = (
        pl.when(x.is_nan() | x.is_infinite())
        .then(None)
        .when(x == 0)
        .then(pl.lit("0"))
        .when(x < 0)
        .then(pl.lit("<=-") + edge)
        .otherwise(pl.lit(">=") + edge)
    )
    frame = pl.DataFrame({column.name: column})
    return frame.select(pl.concat_list(label).alias(column.name))[column.name]


CATEGORICAL_INTEGERS = 100  # distinct values an integer column may have as categories


def is_bucket_label(text: str) -> bool:
    """Whether a category is one of `_bucketed`'s labels."""
    return text == "0" or text.startswith((">=", "<=-"))


def continuous(column: pl.Series) -> bool:
    """Whether a numeric column is a quantity to bucket rather than a set of categories:
    floats always; integers by their values, not their dtype, when they take more than
    CATEGORICAL_INTEGERS distinct values over a wide range (a duration in ms, a play
    count). Few values (ratings, age groups, years of a catalogue) stay categories, each
    its own: bucketing by magnitude would put every year into one bucket."""
    dtype = column.dtype
    if dtype.is_float() or isinstance(dtype, pl.Decimal):
        return True
    if not dtype.is_integer() or column.n_unique() <= CATEGORICAL_INTEGERS:
        return False
    low, high = column.min(), column.max()
    return low is None or float(low) <= 0 or float(high) >= 4 * float(low)  # type: ignore[arg-type]


def feature_values(
    column: pl.Series, separator: str, bucketed: bool | None = None
) -> pl.Series | None:
    """The column as lists of text values, or None if it cannot be a feature. `bucketed`:
    whether the build bucketed it (None: decide from the column, as a build does)."""
    dtype = column.dtype
    if bucketed if bucketed is not None else continuous(column):
        return _bucketed(column)
    if isinstance(dtype, pl.List):
        return column.cast(pl.List(pl.String))
    if dtype == pl.String and column.str.contains(separator, literal=True).any():
        return column.str.split(separator).list.eval(pl.element().str.strip_chars())
    categorical = isinstance(dtype, pl.Categorical | pl.Enum)
    if dtype == pl.String or dtype.is_integer() or dtype == pl.Boolean or categorical:
        return pl.select(pl.concat_list(column.cast(pl.String))).to_series()
    return None


@dataclass(frozen=True)
class ColumnVerdict:
    """What one side-table column becomes: its feature values, or why it is none."""

    values: pl.Series | None  # lists of category text per row; None: not a feature
    categories: pl.Series  # the distinct-able category texts (empty if not a feature)
    kind: str  # "category", "multi-valued category", "bucketed number" or "ignored"
    reason: str = ""  # why it is not a feature

    def describe(self) -> str:
        if self.values is None:
            return f"not a feature: {self.reason}"
        return f"{self.kind} feature ({self.categories.n_unique():,} values)"


def column_verdict(column: pl.Series, config: FeatureConfig) -> ColumnVerdict:
    """Decide one column as a build does: a feature (category, multi-valued category or
    bucketed number) or not, and why; `build_side_features` and `recsys build --dry-run`
    both ask here."""
    none = pl.Series(column.name, [], pl.String)
    values = feature_values(column, config.multi_value_separator)
    if values is None:
        why = f"{column.dtype} column (not text, numbers or lists)"
        return ColumnVerdict(None, none, "ignored", why)
    categories = values.explode().drop_nulls()
    categories = categories.filter(categories != "")
    bucketed = continuous(column)
    near_unique = categories.n_unique() > max(1.0, config.max_category_ratio * len(categories))
    if near_unique and not bucketed:  # buckets group values already: a few per octave
        why = "near-unique values (say no more than the ID)"
        return ColumnVerdict(None, none, "ignored", why)
    longest = values.list.len().max()
    multi = isinstance(longest, int) and longest > 1
    kind = "bucketed number" if bucketed else "multi-valued category" if multi else "category"
    return ColumnVerdict(values, categories, kind)


def _encode(values: pl.Series, vocab: Vocabulary) -> pl.Series:
    """Lists of category text -> lists of category indices (empty list when missing)."""
    name = values.name
    categories = vocab.to_frame().rename({ID: name, INDEX: "_category"})
    rows = pl.DataFrame({name: values}).with_row_index("_row")
    encoded = (
        rows.explode(name)
        .join(categories, on=name, how="inner")
        .group_by("_row")
        .agg(pl.col("_category"))
    )
    bags = rows.select("_row").join(encoded, on="_row", how="left").sort("_row")
    return bags["_category"].fill_null([]).cast(pl.List(pl.UInt32)).rename(name)


def build_side_features(
    table: pl.DataFrame,
    key: str,
    index: str,
    id_vocab: Vocabulary,
    config: FeatureConfig,
    previous: dict[str, Vocabulary] | None = None,
) -> SideFeatures:
    """Encode each usable column of `table` as bags of category indices.

    `id_vocab` must already contain every key of the table. `previous` holds the category
    vocabularies of an earlier run, which keep their indices.
    """
    previous = previous or {}
    keys = reconcile_ids(key, id_vocab.dtype, table[key])
    lookup = id_vocab.to_frame().rename({ID: key, INDEX: index})
    raw = table.with_columns(keys.alias(key)).join(lookup, on=key, how="left")
    bags = raw.select(index)
    vocabs: dict[str, Vocabulary] = {}
    ignored: dict[str, str] = {}
    for name in table.columns:
        if name == key:
            continue
        verdict = column_verdict(table[name], config)
        if verdict.values is None:
            ignored[name] = verdict.reason
            continue
        values, categories = verdict.values, verdict.categories
        vocab = previous.get(name, Vocabulary.empty(name, text=True)).extend(categories)
        vocabs[name] = vocab
        bags = bags.with_columns(_encode(values.rename(name), vocab))
    every_index = pl.DataFrame({index: pl.int_range(len(id_vocab), dtype=pl.UInt32, eager=True)})
    bags = every_index.join(bags, on=index, how="left").with_columns(
        pl.col(name).fill_null([]) for name in vocabs
    )
    return SideFeatures(key, index, raw, bags.sort(index), vocabs, ignored)
